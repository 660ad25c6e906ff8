//! `sidecert-webhook serve`: HTTPS admission server plus a plain-HTTP metrics server.

use std::{pin::pin, sync::Arc, time::Duration};

use actix_web::{App, HttpResponse, HttpServer, web};
use sidecert_contract::hosts::{AllowedDomains, DomainPolicy};
use sidecert_runtime::{Backoff, shutdown_signal};

use crate::{
    admission::{http::AppState, limits::Limits, reviewer::Reviewer},
    config::{CleanupArgs, ServeArgs, TlsSource},
    error::{Error, Result},
    https::{HttpsSettings, serve_https},
    kube::{cache::Cache, claims::HostClaims, client::client, executor::Executor, namespaces::NamespaceGate},
    metrics::Metrics,
    mutate::{
        container::{AcmeDefaults, SidecarSettings},
        context::Context,
        lookup::Lookup,
    },
    readiness::Readiness,
    reconciler,
    tls::{
        self,
        manager::SelfSigned,
        resolver::{ReloadingResolver, client_roots, server_config},
        settings::{SERVICE_ACCOUNT_NAMESPACE_FILE, own_namespace},
    },
};

/// The waits between attempts to set up the serving certificate: 1 s, 2 s, ... up to 30 s.
pub const SERVING_SETUP_RETRY: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));

async fn metrics_handler(metrics: web::Data<Metrics>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(metrics.render())
}

/// Where the serving certificate comes from, flags resolved.
enum Serving {
    Files(std::path::PathBuf, std::path::PathBuf),
    SelfSigned(tls::Settings),
}

pub use crate::https::KEEP_ALIVE;

/// A listening socket as actix-web's `HttpServer::bind` makes it: address reuse, a backlog of
/// 1024 (the kernel's default of 128 is short for a burst of new connections).
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)?.into_std()
}

/// Runs the server until SIGTERM/SIGINT; see [`serve_until`].
pub async fn serve(args: ServeArgs) -> Result<()> {
    serve_until(args, shutdown_signal()).await
}

/// `cleanup`: what the chart's pre-delete hook runs ([`reconciler::cleanup::uninstall`]).
pub async fn cleanup(args: CleanupArgs) -> Result<()> {
    let namespace = match args.namespace.as_deref().map(str::trim) {
        Some(ns) if !ns.is_empty() => ns.to_owned(),
        _ => own_namespace(
            std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE_FILE).ok(),
            std::env::var("POD_NAMESPACE").ok(),
        )
        .map_err(|_| Error::Config("cleanup needs sidecert's namespace: give --namespace".to_owned()))?,
    };
    let client = client(args.kubeconfig.as_deref()).await?;
    reconciler::cleanup::uninstall(
        &client,
        &namespace,
        &args.webhook_configuration_name,
        &args.deployment,
        &args.namespace_selector,
        args.timeout,
    )
    .await
}

/// The release namespace: `--namespace`, else the Pod's own.
fn release_namespace(args: &ServeArgs) -> Result<String> {
    match args.self_signed.namespace.as_deref().map(str::trim) {
        Some(ns) if !ns.is_empty() => Ok(ns.to_owned()),
        _ => own_namespace(
            std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE_FILE).ok(),
            std::env::var("POD_NAMESPACE").ok(),
        )
        .map_err(|_| {
            Error::Config(
                "the reconciler's leader Lease needs a namespace: give --namespace, run in a Pod, \
                 set POD_NAMESPACE, or turn the reconciler off with --reconcile=false"
                    .to_owned(),
            )
        }),
    }
}

/// Runs the server until `shutdown` resolves, then: `/readyz` turns false at once and every
/// response closes its connection; the reconciler stops and the leader Lease is released; the
/// server keeps serving for `--shutdown-delay` (time for the endpoints to drop this Pod), then
/// stops listening, finishes in-flight reviews (up to `--shutdown-timeout`) and closes idle
/// keep-alive connections. A signal during all that exits at once.
pub async fn serve_until(args: ServeArgs, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    let serving = match args.tls_source().map_err(Error::Config)? {
        TlsSource::Files { cert, key } => Serving::Files(cert, key),
        TlsSource::SelfSigned(ss) => Serving::SelfSigned(tls::Settings::from_args(&ss)?),
    };
    let client = client(args.kubeconfig.as_deref()).await?;
    let cache = Cache::start(client.clone());
    let lookup: Arc<dyn Lookup> = Arc::new(cache.clone());
    let ctx = Context {
        sidecar: SidecarSettings::from_args(&args.mutation),
        acme: AcmeDefaults::from_args(&args.mutation)?,
        lookup: lookup.clone(),
        secrets: Default::default(),
        hosts: Default::default(),
    };
    let metrics = Metrics::new()?;
    let executor = Executor::new(client.clone(), lookup.clone(), args.side_effect_timeout);
    // The release namespace is never served; unknown (certificate files, outside a Pod, no
    // --namespace) leaves only the system namespaces and the opt-in label.
    let namespaces = NamespaceGate::start(
        client.clone(),
        &args.reconciler.reconcile_namespace_selector,
        &release_namespace(&args).unwrap_or_default(),
    );
    // Host claims live in the release namespace; without one (certificate files outside a
    // Pod, no --namespace, --reconcile=false), every host is its namespace's.
    let policy = DomainPolicy {
        cluster: args
            .mutation
            .allowed_domains
            .as_deref()
            .map(AllowedDomains::parse)
            .transpose()
            .map_err(|e| Error::Config(format!("--allowed-domains: {e}")))?,
        namespace: None,
    };
    let claims = match release_namespace(&args) {
        Ok(ns) => Some(HostClaims::new(
            client.clone(),
            &ns,
            policy,
            args.reconciler.host_claim_release_after,
        )),
        // The allowed domains are enforced where hosts are claimed: never silently off.
        Err(e) if policy.cluster.is_some() => {
            return Err(Error::Config(format!("--allowed-domains needs host claims: {e}")));
        }
        Err(_) => {
            tracing::warn!(
                "no release namespace: hosts are not claimed (one owner per host is not enforced)"
            );
            None
        }
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let reconciler = if args.reconciler.enabled {
        let namespace = release_namespace(&args)?;
        let r = &args.reconciler;
        let settings = reconciler::Settings {
            rollout_restart: r.rollout_restart,
            namespace_selector: r.reconcile_namespace_selector.clone(),
            own_namespace: namespace.clone(),
            interval: r.reconcile_interval,
            identity: r
                .leader_identity
                .clone()
                .filter(|i| !i.trim().is_empty())
                .unwrap_or_else(reconciler::default_identity),
            default_profile: args
                .mutation
                .acme_profile
                .clone()
                .filter(|p| !p.trim().is_empty()),
            host_claim_release_after: r.host_claim_release_after,
        };
        let leader = reconciler::LeaderSettings {
            namespace,
            lease_name: r.leader_lease_name.clone(),
            duration: r.leader_lease_duration,
        };
        Some(tokio::spawn(reconciler::run(
            client.clone(),
            lookup,
            claims.clone(),
            settings,
            leader,
            metrics.clone(),
            stop_rx,
        )))
    } else {
        tracing::info!("the Ingress reconciler is off (--reconcile=false)");
        None
    };
    let mut shutdown = pin!(shutdown);
    // With certificate files the API server's trust is the installer's business.
    let ready = Readiness::new(false, matches!(serving, Serving::Files(..)));
    {
        let ready = ready.clone();
        let gate = namespaces.clone();
        tokio::spawn(async move {
            if cache.wait_until_ready().await && gate.wait_until_ready().await {
                ready.set_caches(true);
                tracing::info!("Ingress, Service and Namespace caches ready");
            }
        });
    }

    // Read before anything listens: a bad file stops the start, not the first review.
    let client_roots = match &args.client_ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| Error::io(path, e))?;
            tracing::info!(file = %path.display(), "/mutate requires a client certificate of this CA");
            Some(client_roots(&pem)?)
        }
        None => None,
    };
    let require_client_certificate = client_roots.is_some();
    let tls = match serving {
        Serving::SelfSigned(settings) => {
            // Retried until the API server answers (or a signal): the CA lives in a Secret.
            let start = async {
                let mut failures: u32 = 0;
                loop {
                    match SelfSigned::start(client.clone(), settings.clone(), metrics.clone(), ready.clone())
                        .await
                    {
                        Ok(started) => break started,
                        Err(e) => {
                            failures = failures.saturating_add(1);
                            let wait = SERVING_SETUP_RETRY.delay(failures);
                            tracing::warn!(error = %e, retry_in = ?wait, "cannot set up the serving certificate");
                            tokio::time::sleep(wait).await;
                        }
                    }
                }
            };
            let (manager, resolver) = tokio::select! {
                started = start => started,
                () = &mut shutdown => {
                    let _ = stop_tx.send(true);
                    return Ok(());
                }
            };
            tokio::spawn(manager.run());
            server_config(resolver, client_roots)?
        }
        Serving::Files(cert, key) => {
            let resolver = Arc::new(ReloadingResolver::load(cert, key)?);
            tokio::spawn(resolver.clone().watch(args.tls_reload_interval));
            server_config(resolver, client_roots)?
        }
    };

    let limits = Limits::from_args(&args.limits);
    let state = web::Data::new(
        AppState::new(
            match claims.clone() {
                Some(claims) => Reviewer::new(ctx, metrics.clone(), Some(executor))
                    .with_namespace_gate(namespaces)
                    .with_host_claims(claims),
                None => Reviewer::new(ctx, metrics.clone(), Some(executor)).with_namespace_gate(namespaces),
            },
            ready.clone(),
            &limits,
        )
        .requiring_client_certificate(require_client_certificate),
    );
    let listener = listen(args.listen).map_err(|e| Error::io(args.listen.to_string(), e))?;
    let connections = limits.connection_limiter();
    let settings = HttpsSettings {
        limits,
        workers: args.workers,
        shutdown_timeout: args.shutdown_timeout,
    };
    let https = serve_https(listener, tls, state, connections, &settings)
        .map_err(|e| Error::io(args.listen.to_string(), e))?;
    let metrics_data = web::Data::new(metrics);
    let plain = HttpServer::new(move || {
        App::new()
            .app_data(metrics_data.clone())
            .route("/metrics", web::get().to(metrics_handler))
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(1)
    .bind(args.metrics_listen)
    .map_err(|e| Error::io(args.metrics_listen.to_string(), e))?
    .run();
    tracing::info!(listen = %args.listen, metrics = %args.metrics_listen, "serving");

    let (https_handle, plain_handle) = (https.handle(), plain.handle());
    let mut https = pin!(https);
    let mut plain = pin!(plain);
    tokio::select! {
        r = &mut https => return r.map_err(|e| Error::io(args.listen.to_string(), e)),
        r = &mut plain => return r.map_err(|e| Error::io(args.metrics_listen.to_string(), e)),
        () = &mut shutdown => {}
    }
    tracing::info!(delay = ?args.shutdown_delay, "shutting down: not ready; still serving until the endpoints drop this Pod");
    ready.set_draining();
    let _ = stop_tx.send(true);
    let drain = async {
        tokio::select! {
            () = tokio::time::sleep(args.shutdown_delay) => {}
            _ = &mut https => return,
        }
        tracing::info!("stopped listening; finishing in-flight reviews");
        // Graceful: in-flight reviews finish (up to --shutdown-timeout) and idle keep-alive
        // connections are closed at once.
        // The servers process the stop command only while they are polled: await both together.
        let _ = tokio::join!(
            https_handle.stop(true),
            plain_handle.stop(true),
            &mut https,
            &mut plain
        );
        if let Some(task) = reconciler {
            // The reconciler bounds its own shutdown (running reconciles, Lease release).
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    };
    tokio::select! {
        () = drain => tracing::info!("stopped"),
        () = shutdown_signal() => tracing::warn!("second signal; exiting now"),
    }
    Ok(())
}
