//! `sidecert-sidecar run`: the per-Pod wiring — the responder, the metrics server, and one
//! task per certificate ([`crate::certificate::task`]).

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use kube::{Api, Client};
use sidecert_contract::{PodIdentity, SidecarConfig};
use tokio_util::sync::CancellationToken;

use crate::{
    acme::AcmeHttp,
    certificate::task::{Context, certificate_task},
    challenge::responder::{Responder, bind, self_url, serve_metrics, serve_responder},
    error::{Error, Result},
    kube::{account::Accounts, events::PodEvents},
    metrics::Metrics,
};

/// Everything `run` needs beyond the contract's configuration.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub config: SidecarConfig,
    pub pod: PodIdentity,
    pub namespace: String,
    pub http01_listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub cert_dir: Option<PathBuf>,
    pub ari: bool,
    pub retry_base: Duration,
    pub retry_cap: Duration,
    pub lease_duration: Duration,
    /// Upper bound of the wait for the solver Service's endpoints (Ingress certificates).
    pub route_wait: Duration,
    /// Delay after they appear, for the ingress controller to pick them up.
    pub route_settle: Duration,
    /// Wait before calling the reload URL (the files must be where the app reads them).
    pub reload_delay: Duration,
}

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
        pod_name: opts.pod.name.clone(),
        cert_dir: opts.cert_dir.clone(),
        ari: opts.ari,
        retry_base: opts.retry_base,
        retry_cap: opts.retry_cap,
        lease_duration: opts.lease_duration,
        route_wait: opts.route_wait,
        route_settle: opts.route_settle,
        reload_delay: opts.reload_delay,
        namespace: opts.namespace.clone(),
        config: opts.config.clone(),
        client,
        http,
        metrics,
    });
    let tasks: Vec<_> = cx
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
