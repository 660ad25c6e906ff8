//! `sidecert-sidecar run`: the per-Pod wiring — the responder, the metrics server, and one
//! task per certificate ([`crate::certificate::task`]).

use std::sync::Arc;

use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

pub use crate::options::RunOptions;
use crate::{
    acme::AcmeHttp,
    certificate::task::{Context, certificate_task},
    challenge::responder::{Responder, bind, self_url, serve_metrics, serve_responder},
    error::{Error, Result},
    kube::{account::Accounts, events::PodEvents},
    metrics::Metrics,
};

/// Runs until `shutdown` is cancelled; then releases every Lease and returns.
pub async fn run(opts: RunOptions, client: Client, shutdown: CancellationToken) -> Result<()> {
    let metrics = Metrics::new()?;
    let http = AcmeHttp::new(opts.config.acme_ca_bundle.as_deref(), Some(metrics.clone()))?;
    let responder = Responder::with_metrics(metrics.clone());
    let listener = bind(opts.http01_listen).await?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io(opts.http01_listen, e))?;
    let metrics_listener = bind(opts.metrics_listen).await?;
    tracing::info!(http01 = %addr, metrics = %opts.metrics_listen, "serving");
    let servers = [
        tokio::spawn(serve_responder(listener, responder.clone(), shutdown.clone())),
        tokio::spawn(serve_metrics(metrics_listener, metrics.clone(), shutdown.clone())),
    ];
    let secrets = Api::namespaced(client.clone(), &opts.namespace);
    let cfg = &opts.config;
    let cx = Arc::new(Context {
        accounts: Accounts::new(
            secrets.clone(),
            http.clone(),
            cfg.acme_server.clone(),
            cfg.acme_email.clone(),
            cfg.eab_secret.clone(),
        ),
        secrets,
        leases: Api::namespaced(client.clone(), &opts.namespace),
        events: PodEvents::new(client.clone(), &opts.pod, &opts.namespace),
        self_url: self_url(addr),
        challenges: responder.store.clone(),
        client,
        http,
        metrics,
        opts,
    });
    let tasks: Vec<_> = cx
        .opts
        .config
        .certificates
        .iter()
        .cloned()
        .map(|spec| tokio::spawn(certificate_task(cx.clone(), spec, shutdown.clone())))
        .collect();
    responder.set_ready(true);
    for t in tasks {
        if let Err(e) = t.await {
            tracing::error!(error = %e, "certificate task");
        }
    }
    shutdown.cancel();
    for s in servers {
        let _ = s.await;
    }
    Ok(())
}
