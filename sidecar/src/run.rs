//! `sidecert-sidecar run`: the per-Pod loop — responder, metrics, and one task per
//! certificate (elect, order when due, write the Secret, follow the Secret otherwise).

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use instant_acme::Account;
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Secret};
use kube::ResourceExt;
use kube::{Api, Client};
use rand::Rng;
use sidecert_contract::{CertificateSpec, PodIdentity, SidecarConfig, account_secret_name, annotations};
use time::OffsetDateTime;
use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;

use crate::{
    Error, Result,
    acme::{AcmeHttp, OrderRequest, Publisher},
    events::PodEvents,
    issue::self_url,
    leader::{
        Election, FailureRecord, LeasePublisher, read_failures, watch_challenges, watch_secret,
        write_failures,
    },
    metrics::Metrics,
    reload::call_reload_url,
    responder::{Responder, bind, serve_metrics, serve_responder},
    route::{RouteGate, Routed},
    schedule::{Lifetime, ValidationLimiter, Window, backoff, delay_until, plan},
    store::{
        Held, WriteMeta, load_or_create_account, read_eab, replace_account, valid_held, write_dir,
        write_secret,
    },
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

struct Shared {
    opts: RunOptions,
    client: Client,
    secrets: Api<Secret>,
    leases: Api<Lease>,
    http: AcmeHttp,
    metrics: Metrics,
    responder: Responder,
    events: PodEvents,
    /// The namespace's account, and the resourceVersion of the Secret it was read from.
    account: Mutex<Option<(Account, Option<String>)>>,
    self_url: String,
}

impl Shared {
    async fn account(&self) -> Result<Account> {
        let mut g = self.account.lock().await;
        if let Some((a, _)) = g.as_ref() {
            return Ok(a.clone());
        }
        let (name, eab) = self.account_source().await?;
        let cfg = &self.opts.config;
        let (account, version) = load_or_create_account(
            &self.secrets,
            &name,
            &self.http,
            &cfg.acme_server,
            cfg.acme_email.as_deref(),
            eab.as_ref(),
        )
        .await?;
        *g = Some((account.clone(), version));
        Ok(account)
    }

    /// The account Secret's name and the EAB credentials, if any.
    async fn account_source(&self) -> Result<(String, Option<crate::acme::Eab>)> {
        let cfg = &self.opts.config;
        let eab = match &cfg.eab_secret {
            Some(name) => Some(read_eab(&self.secrets, name).await?),
            None => None,
        };
        Ok((
            account_secret_name(&cfg.acme_server, cfg.acme_email.as_deref()),
            eab,
        ))
    }

    /// The CA no longer knows the account `forgotten` (its URL): replace it in the Secret,
    /// unless this replica already moved on to another one (a second order that failed
    /// with the same stale account must not replace the new one).
    async fn replace_forgotten_account(&self, forgotten: &str) {
        let mut g = self.account.lock().await;
        let Some((current, version)) = g.as_ref() else {
            return; // Re-read from the Secret at the next order.
        };
        if current.id() != forgotten {
            return;
        }
        let version = version.clone();
        *g = None;
        let replaced = async {
            let (name, eab) = self.account_source().await?;
            let cfg = &self.opts.config;
            tracing::warn!(
                secret = name,
                "the ACME server does not know the account; replacing it"
            );
            replace_account(
                &self.secrets,
                &name,
                version.as_deref(),
                &self.http,
                &cfg.acme_server,
                cfg.acme_email.as_deref(),
                eab.as_ref(),
            )
            .await
        };
        match replaced.await {
            Ok(account) => *g = Some(account),
            Err(e) => tracing::warn!(error = %e, "replacing the ACME account; retried with the next order"),
        }
    }
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
    let shared = Arc::new(Shared {
        secrets: Api::namespaced(client.clone(), &opts.namespace),
        leases: Api::namespaced(client.clone(), &opts.namespace),
        events: PodEvents::new(client.clone(), &opts.pod, &opts.namespace),
        self_url: self_url(addr),
        client,
        http,
        metrics,
        responder: responder.clone(),
        account: Mutex::new(None),
        opts,
    });
    let tasks: Vec<_> = shared
        .opts
        .config
        .certificates
        .iter()
        .cloned()
        .map(|spec| tokio::spawn(certificate_task(shared.clone(), spec, shutdown.clone())))
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

/// The state of one certificate in this replica.
struct CertState {
    spec: CertificateSpec,
    /// The certificate being served (from the Secret or fresh).
    held: Option<Held>,
    /// Issued but not yet in the Secret: kept in memory, never lost.
    unwritten: Option<Held>,
    /// The held certificate came from another ACME server than the configured one (the
    /// Secret's issuer-url says so): replace it now rather than at its renewal time.
    foreign: bool,
    failures: u32,
    write_failures: u32,
    not_before: OffsetDateTime,
    limiter: ValidationLimiter,
    ari: Option<(Window, tokio::time::Instant)>,
    jitter: f64,
    /// Last write (or restore) of the Secret by this replica.
    last_write: Option<tokio::time::Instant>,
    /// A certificate this replica issued: call the reload URL once the Secret holds it.
    reload_after_write: bool,
}

async fn certificate_task(shared: Arc<Shared>, spec: CertificateSpec, shutdown: CancellationToken) {
    // The state outlives a failed loop: an issued certificate not yet written, the failure
    // count, the backoff and the validation limit all carry over to the restart.
    let mut st = CertState {
        spec: spec.clone(),
        held: None,
        unwritten: None,
        foreign: false,
        failures: 0,
        write_failures: 0,
        not_before: OffsetDateTime::now_utc(),
        limiter: ValidationLimiter::default(),
        ari: None,
        jitter: rand::rng().random::<f64>(),
        last_write: None,
        reload_after_write: false,
    };
    let mut restarts = 0;
    loop {
        let started = tokio::time::Instant::now();
        match certificate_loop(&shared, &mut st, &shutdown).await {
            Ok(()) => return,
            Err(e) => {
                // A loop that ran for a while before failing starts the count afresh.
                if started.elapsed() > Duration::from_secs(600) {
                    restarts = 0;
                }
                restarts += 1;
                let wait = backoff(
                    restarts,
                    Duration::from_secs(5),
                    Duration::from_secs(300),
                    st.jitter,
                );
                tracing::error!(secret = spec.secret_name, error = %e, retry_in = ?wait, "certificate loop failed, restarting");
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        last_write(&shared, &mut st).await;
                        return;
                    }
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// On the way out with an issued certificate the Secret does not hold yet: one last,
/// bounded try, so it is not lost with this process if the API server answers at all.
async fn last_write(shared: &Shared, st: &mut CertState) {
    let Some(u) = st.unwritten.take() else {
        return;
    };
    let name = &st.spec.secret_name;
    let meta = WriteMeta {
        issuer_url: &shared.opts.config.acme_server,
        renew_at: renew_moment(st, &u.info.lifetime, OffsetDateTime::now_utc()),
    };
    let write = write_secret(&shared.secrets, name, &u, &meta);
    match tokio::time::timeout(Duration::from_secs(3), write).await {
        Ok(Ok(())) => tracing::info!(secret = name, "certificate written to the Secret on the way out"),
        Ok(Err(e)) => {
            tracing::error!(secret = name, error = %e, "stopping with an issued certificate the Secret could not take; the next holder of the Lease orders again");
        }
        Err(_) => {
            tracing::error!(
                secret = name,
                "stopping with an issued certificate the Secret could not take in time; the next holder of the Lease orders again"
            );
        }
    }
}

async fn certificate_loop(
    shared: &Arc<Shared>,
    st: &mut CertState,
    shutdown: &CancellationToken,
) -> Result<()> {
    let spec = st.spec.clone();
    let name = spec.secret_name.clone();
    let lease = spec.lease_name();
    let m = &shared.metrics;

    // Every replica follows the published challenges and the Secret.
    let challenges = tokio::spawn(watch_challenges(
        shared.leases.clone(),
        lease.clone(),
        shared.responder.store.clone(),
    ));
    let initial = shared.secrets.get_opt(&name).await?;
    let (secret_tx, mut secret_rx) = watch::channel(initial);
    let secret_watch = tokio::spawn(watch_secret(shared.secrets.clone(), name.clone(), secret_tx));
    let _guard = AbortOnDrop(vec![challenges, secret_watch]);

    let identity = format!(
        "{}-{:08x}",
        shared.opts.pod.name.as_deref().unwrap_or("sidecert"),
        rand::rng().random::<u32>()
    );
    let election = Election::start(
        shared.client.clone(),
        &shared.opts.namespace,
        &lease,
        &identity,
        shared.opts.lease_duration,
    )
    .await?;
    let mut leader_rx = election.leader.clone();
    let mut was_leader = false;

    let result = loop {
        let now = OffsetDateTime::now_utc();
        // What the Secret holds.
        let from_secret = secret_rx.borrow_and_update().as_ref().and_then(|s| {
            let issuer = s.annotations().get(annotations::ISSUER_URL).cloned();
            valid_held(s, &spec.domains, now).map(|h| (h, issuer))
        });
        if let Some((h, issuer)) = from_secret
            && st.held.as_ref().is_none_or(|c| c.chain_pem != h.chain_pem)
        {
            tracing::info!(secret = name, not_after = %h.info.lifetime.not_after, "certificate from the Secret");
            // Newer means issued later, not valid longer: a renewal on a shorter profile (or
            // from a CA with shorter lifetimes) must not lose to the certificate it replaces.
            let newer = st
                .held
                .as_ref()
                .is_none_or(|c| c.info.lifetime.not_before <= h.info.lifetime.not_before);
            if newer {
                let first = st.held.is_none();
                // Another holder succeeded: its backoff is over.
                st.failures = 0;
                st.foreign = issuer.is_some_and(|i| i != shared.opts.config.acme_server);
                if st.foreign {
                    tracing::info!(
                        secret = name,
                        "the certificate in the Secret is from another ACME server; replacing it"
                    );
                }
                st.held = Some(h.clone());
                st.ari = None;
                landed(shared, &h, !first).await;
            }
        }
        if st
            .unwritten
            .as_ref()
            .zip(st.held.as_ref())
            .is_some_and(|(u, h)| u.chain_pem == h.chain_pem && secret_has(&secret_rx, u))
        {
            st.unwritten = None;
        }
        let is_leader = *leader_rx.borrow_and_update();
        if is_leader && !was_leader {
            // A new holder carries on where the last one stopped: backoff and hourly limit.
            let record = read_failures(&shared.leases, &lease).await;
            st.failures = st.failures.max(record.failures);
            if let Ok(t) = OffsetDateTime::from_unix_timestamp(record.not_before) {
                st.not_before = st.not_before.max(t);
            }
            st.limiter.merge(&record.validations);
        }
        was_leader = is_leader;
        // The leader restores a certificate the Secret lost (deleted, overwritten by an
        // older or temporary one), at most every 30 s.
        let restore_guard = Duration::from_secs(30);
        let lost_by_secret = is_leader
            && st.unwritten.is_none()
            && st
                .held
                .as_ref()
                .is_some_and(|h| now < h.info.lifetime.not_after && !secret_has(&secret_rx, h));
        if lost_by_secret
            && st.last_write.is_none_or(|t| t.elapsed() > restore_guard)
            && let Some(h) = &st.held
        {
            tracing::warn!(secret = name, "the Secret lost the certificate; writing it again");
            st.unwritten = Some(h.clone());
            continue;
        }
        m.leader.with_label_values(&[&name]).set(i64::from(is_leader));
        let ready = st
            .held
            .as_ref()
            .is_some_and(|h| now < h.info.lifetime.not_after && secret_has(&secret_rx, h));
        m.ready.with_label_values(&[&name]).set(i64::from(ready));
        if let Some(h) = &st.held {
            m.not_after
                .with_label_values(&[&name])
                .set(h.info.lifetime.not_after.unix_timestamp() as f64);
        }

        // 1. A certificate we issued must reach the Secret, leader or not.
        if let Some(u) = st.unwritten.clone() {
            let renew_at = renew_moment(st, &u.info.lifetime, now);
            let meta = WriteMeta {
                issuer_url: &shared.opts.config.acme_server,
                renew_at,
            };
            match write_secret(&shared.secrets, &name, &u, &meta).await {
                Ok(()) => {
                    tracing::info!(secret = name, "certificate written to the Secret");
                    st.last_write = Some(tokio::time::Instant::now());
                    st.unwritten = None;
                    st.write_failures = 0;
                    if std::mem::take(&mut st.reload_after_write) {
                        reload(shared);
                    }
                    continue;
                }
                Err(e) => {
                    st.write_failures += 1;
                    let wait = backoff(
                        st.write_failures,
                        Duration::from_secs(2),
                        Duration::from_secs(60),
                        st.jitter,
                    );
                    tracing::warn!(secret = name, error = %e, retry_in = ?wait, "writing the Secret failed; keeping the certificate in memory");
                    tokio::select! {
                        _ = shutdown.cancelled() => break Ok(()),
                        _ = tokio::time::sleep(wait) => continue,
                    }
                }
            }
        }

        // 2. When is the next order due?
        let mut due = now;
        if let Some(h) = st.held.clone() {
            if is_leader {
                refresh_ari(shared, st, &h).await;
            }
            let renew_at = if st.foreign {
                now
            } else {
                renew_moment(st, &h.info.lifetime, now)
            };
            m.renew_at
                .with_label_values(&[&name])
                .set(renew_at.unix_timestamp() as f64);
            due = renew_at;
        }
        due = due
            .max(st.not_before)
            .max(st.limiter.allowed_at(&spec.domains, now));

        if is_leader && due <= now {
            // 3. Order, aborting cleanly if the Lease is lost or we are told to stop. A
            // Retry-After left from an earlier, unrelated request does not count.
            let _ = shared.http.take_retry_after();
            let mut account_used = None;
            let outcome = tokio::select! {
                biased;
                _ = shutdown.cancelled() => Err(Error::Shutdown),
                _ = lost(&mut leader_rx) => Err(Error::LostLease),
                r = order_once(shared, st, &mut account_used) => r,
            };
            match outcome {
                Ok(issued) => {
                    m.orders.with_label_values(&["issued"]).inc();
                    let renewal = st.held.is_some();
                    if st.failures > 0 {
                        // The backoff is over; the failed validations still count for
                        // the CA's hour.
                        let record = FailureRecord {
                            validations: st.limiter.to_record(),
                            ..Default::default()
                        };
                        write_failures(&shared.leases, &lease, Some(&record)).await;
                    }
                    st.failures = 0;
                    st.foreign = false;
                    st.ari = None;
                    st.not_before = OffsetDateTime::now_utc()
                        + crate::schedule::min_reorder_interval(issued.info.lifetime);
                    st.jitter = rand::rng().random::<f64>();
                    let held = Held::from(issued);
                    shared
                        .events
                        .publish(
                            false,
                            if renewal { "Renewed" } else { "Issued" },
                            format!(
                                "certificate for {} issued, valid until {}",
                                spec.domains.join(", "),
                                crate::cert::rfc3339(held.info.lifetime.not_after)
                            ),
                        )
                        .await;
                    st.unwritten = Some(held.clone());
                    st.held = Some(held.clone());
                    // The directory now; the reload URL once the Secret holds it too.
                    st.reload_after_write = true;
                    landed(shared, &held, false).await;
                }
                Err(Error::Shutdown) => {
                    // Still the holder until the release below: take the challenges back.
                    let publisher = publisher(shared, &spec);
                    let _ = tokio::time::timeout(Duration::from_secs(2), publisher.withdraw()).await;
                    break Ok(());
                }
                Err(Error::LostLease) => {
                    tracing::warn!(secret = name, "lost the Lease during the order; aborted");
                    m.orders.with_label_values(&["aborted"]).inc();
                }
                Err(e) => {
                    st.failures += 1;
                    let label = if matches!(e, Error::Validation { .. }) {
                        "validation_failed"
                    } else {
                        "failed"
                    };
                    m.orders.with_label_values(&[label]).inc();
                    m.failures.with_label_values(&[&name, e.metric_label()]).inc();
                    if let Error::Validation { domains, .. } = &e {
                        let mut failed: Vec<&str> = domains.split(',').filter(|d| !d.is_empty()).collect();
                        if failed.is_empty() {
                            // The CA did not say which: count it against every domain.
                            failed = spec.domains.iter().map(String::as_str).collect();
                        }
                        for d in failed {
                            st.limiter.record_failure(d, now);
                        }
                    }
                    let mut wait = backoff(
                        st.failures,
                        shared.opts.retry_base,
                        shared.opts.retry_cap,
                        rand::rng().random(),
                    );
                    if let Some(at) = shared.http.take_retry_after()
                        && let Ok(d) = at.duration_since(std::time::SystemTime::now())
                    {
                        wait = wait.max(d);
                    }
                    st.not_before = OffsetDateTime::now_utc() + wait;
                    let record = FailureRecord {
                        failures: st.failures,
                        not_before: st.not_before.unix_timestamp(),
                        validations: st.limiter.to_record(),
                    };
                    write_failures(&shared.leases, &lease, Some(&record)).await;
                    tracing::warn!(secret = name, error = %e, failures = st.failures, retry_in = ?wait, "order failed");
                    shared
                        .events
                        .publish(
                            true,
                            "Failed",
                            format!(
                                "order for {} failed (attempt {}, next in {}s): {e}",
                                spec.domains.join(", "),
                                st.failures,
                                wait.as_secs()
                            ),
                        )
                        .await;
                    if e.is_account_unknown()
                        && let Some(id) = &account_used
                    {
                        // The CA has forgotten the account (reset, or deactivated): replace it.
                        shared.replace_forgotten_account(id).await;
                    } else if matches!(e, Error::Acme(_) | Error::Kube(_)) {
                        // The account may be stale: re-read its Secret next time.
                        *shared.account.lock().await = None;
                    }
                }
            }
            continue;
        }

        // 4. Wait for something to change.
        let mut sleep = if is_leader {
            delay_until(due, now).min(Duration::from_secs(6 * 3600))
        } else {
            Duration::from_secs(3600)
        };
        if lost_by_secret && let Some(t) = st.last_write {
            let wake = (t + restore_guard + Duration::from_millis(100))
                .saturating_duration_since(tokio::time::Instant::now());
            sleep = sleep.min(wake);
        }
        let ari_refresh = st
            .ari
            .as_ref()
            .map(|(_, at)| *at)
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(24 * 3600));
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            r = secret_rx.changed() => if r.is_err() { break Err(Error::Order("Secret watch ended".into())) },
            r = leader_rx.changed() => if r.is_err() { break Err(Error::Order("Lease task ended".into())) },
            _ = tokio::time::sleep(sleep) => {},
            _ = tokio::time::sleep_until(ari_refresh), if is_leader => { st.ari = None; },
        }
    };
    if shutdown.is_cancelled() {
        last_write(shared, st).await;
    }
    m.leader.with_label_values(&[&name]).set(0);
    // The Lease task releases once every receiver is gone.
    drop(leader_rx);
    election.release().await;
    result
}

/// True when the Secret holds `held`: its chain and its key, byte for byte (nothing to parse).
fn secret_has(rx: &watch::Receiver<Option<Secret>>, held: &Held) -> bool {
    rx.borrow().as_ref().is_some_and(|s| crate::store::holds(s, held))
}

/// Resolves when `rx` says we are no longer the leader.
async fn lost(rx: &mut watch::Receiver<bool>) {
    loop {
        if !*rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

fn renew_moment(st: &CertState, lifetime: &Lifetime, now: OffsetDateTime) -> OffsetDateTime {
    plan(*lifetime, st.ari.map(|(w, _)| w), now, st.jitter).renew_at
}

async fn refresh_ari(shared: &Arc<Shared>, st: &mut CertState, held: &Held) {
    if !shared.opts.ari || st.ari.is_some() {
        return;
    }
    let Some(id) = held.info.ari_id.clone() else {
        return;
    };
    let Ok(account) = shared.account().await else {
        return;
    };
    match account.renewal_info(&id).await {
        Ok((info, retry)) => {
            let w = Window {
                start: info.suggested_window.start,
                end: info.suggested_window.end,
            };
            let recheck = retry.clamp(Duration::from_secs(10), Duration::from_secs(6 * 3600));
            tracing::debug!(secret = st.spec.secret_name, start = %w.start, end = %w.end, "ARI window");
            st.ari = Some((w, tokio::time::Instant::now() + recheck));
        }
        Err(instant_acme::Error::Unsupported(_)) => {}
        Err(e) => tracing::debug!(error = %e, "ARI unavailable, using the 1/3 rule"),
    }
}

/// One order; `account_used` says with which account (its URL).
async fn order_once(
    shared: &Arc<Shared>,
    st: &CertState,
    account_used: &mut Option<String>,
) -> Result<crate::acme::Issued> {
    let account = shared.account().await?;
    *account_used = Some(account.id().to_owned());
    let cfg = &shared.opts.config;
    // `replaces` only where the CA offers ARI (it answered renewalInfo for this certificate)
    // and for our own certificates.
    let replaces = if shared.opts.ari && st.ari.is_some() && !st.foreign {
        st.held.as_ref().and_then(|h| h.info.ari_id.clone())
    } else {
        None
    };
    let req = OrderRequest {
        domains: st.spec.domains.clone(),
        profile: cfg.acme_profile.clone(),
        replaces,
        key_algorithm: cfg.key_algorithm,
    };
    let inner = publisher(shared, &st.spec);
    // An Ingress certificate: after the self-check, wait until the Ingress routes to this
    // Pod set (the solver Service's endpoints) before telling the CA.
    let gate = st.spec.solver_service.clone().map(|service| RouteGate {
        client: shared.client.clone(),
        namespace: shared.opts.namespace.clone(),
        service,
        wait: shared.opts.route_wait,
        settle: shared.opts.route_settle,
        events: shared.events.clone(),
        http01_port: shared.opts.config.http01_port,
    });
    let publisher = Routed {
        inner,
        gate,
        domains: st.spec.domains.clone(),
    };
    crate::acme::order(&account, &req, &publisher).await
}

fn publisher(shared: &Shared, spec: &CertificateSpec) -> LeasePublisher {
    LeasePublisher {
        api: shared.leases.clone(),
        lease: spec.lease_name(),
        store: shared.responder.store.clone(),
        self_url: shared.self_url.clone(),
    }
}

/// A new certificate is in effect: the directory, the reload URL.
async fn landed(shared: &Arc<Shared>, held: &Held, reload: bool) {
    if let Some(dir) = &shared.opts.cert_dir
        && let Err(e) = write_dir(dir, &held.chain_pem, &held.key_pem).await
    {
        tracing::warn!(error = %e, "writing the certificate directory");
    }
    if reload {
        self::reload(shared);
    }
}

/// Calls the reload URL, if any, after the configured delay (in the background).
fn reload(shared: &Shared) {
    if let Some(url) = shared.opts.config.reload_url.clone() {
        let delay = shared.opts.reload_delay;
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            call_reload_url(&url, 6).await
        });
    }
}

struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}
