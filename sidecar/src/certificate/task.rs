//! The executor of one certificate's steps: it observes the Secret and the Lease, asks
//! [`decide`] what to do, performs that (API calls, the order, waits) and feeds the result
//! back into the [`State`]. Every decision is in [`super::state`] and every date in
//! [`super::schedule`]; what is here is I/O, logs, Events and metrics.

use std::{sync::Arc, time::Duration};

use k8s_openapi::api::{coordination::v1::Lease, core::v1::Secret};
use kube::{Api, Client};
use rand::Rng;
use sidecert_contract::CertificateSpec;
use sidecert_runtime::{Election, LeaseSpec};
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{
    schedule::{RESTART_BACKOFF, RESTART_RESET_AFTER, Window, delay_until},
    state::{Failure, Observed, Settings, State, Step, decide},
    x509::{Held, rfc3339},
};
use crate::{
    acme::{AcmeHttp, OrderRequest},
    challenge::{
        lease::{LeasePublisher, watch_challenges},
        responder::ChallengeStore,
        route::{RouteGate, Routed},
    },
    dir::write_dir,
    error::{Error, Result},
    kube::{
        account::Accounts,
        events::PodEvents,
        lease::{election_field_manager, read_failures, write_failures},
        secret::{WriteMeta, classify, watch_secret, write_secret},
    },
    metrics::Metrics,
    options::RunOptions,
    reload::call_reload_url,
};

/// The shortest Lease duration the sidecar allows.
pub const MIN_LEASE: Duration = Duration::from_secs(5);
/// The holder renews the Lease at least this long before it expires.
pub const MIN_LEASE_GRACE: Duration = Duration::from_secs(2);

/// What every certificate task of this Pod shares.
pub struct Context {
    pub opts: RunOptions,
    pub client: Client,
    pub secrets: Api<Secret>,
    pub leases: Api<Lease>,
    pub http: AcmeHttp,
    pub accounts: Accounts,
    pub metrics: Metrics,
    pub challenges: ChallengeStore,
    pub events: PodEvents,
    /// Base URL of this replica's responder.
    pub self_url: String,
}

/// Runs one certificate until `shutdown`, restarting its loop (with backoff) when a watch
/// or the Lease fails.
pub async fn certificate_task(cx: Arc<Context>, spec: CertificateSpec, shutdown: CancellationToken) {
    let settings = Settings {
        domains: spec.domains.clone(),
        ari: cx.opts.ari,
        retry: super::schedule::retry_backoff(cx.opts.retry_base, cx.opts.retry_cap),
    };
    let mut st = State::new(settings, OffsetDateTime::now_utc(), rand::rng().random::<f64>());
    let mut restarts = 0;
    loop {
        let started = tokio::time::Instant::now();
        match certificate_loop(&cx, &spec, &mut st, &shutdown).await {
            Ok(()) => return,
            Err(e) => {
                if started.elapsed() > RESTART_RESET_AFTER {
                    restarts = 0;
                }
                restarts += 1;
                let wait = RESTART_BACKOFF.jittered(restarts, st.jitter);
                tracing::error!(secret = spec.secret_name, error = %e, retry_in = ?wait, "certificate loop failed, restarting");
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        last_write(&cx, &spec, &mut st).await;
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
async fn last_write(cx: &Context, spec: &CertificateSpec, st: &mut State) {
    let Some(u) = st.unwritten.take() else {
        return;
    };
    let name = &spec.secret_name;
    let meta = WriteMeta {
        issuer_url: &cx.opts.config.acme_server,
        renew_at: st.renew_moment(&u.info.lifetime, OffsetDateTime::now_utc()),
    };
    let write = write_secret(&cx.secrets, name, &u, &meta);
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
    cx: &Arc<Context>,
    spec: &CertificateSpec,
    st: &mut State,
    shutdown: &CancellationToken,
) -> Result<()> {
    let name = spec.secret_name.clone();
    let lease = spec.lease_name();
    let m = &cx.metrics;

    // Every replica follows the published challenges and the Secret.
    let challenges = tokio::spawn(watch_challenges(
        cx.leases.clone(),
        lease.clone(),
        cx.challenges.clone(),
    ));
    let initial = cx.secrets.get_opt(&name).await?;
    let (secret_tx, mut secret_rx) = watch::channel(initial);
    let secret_watch = tokio::spawn(watch_secret(cx.secrets.clone(), name.clone(), secret_tx));
    let _guard = AbortOnDrop(vec![challenges, secret_watch]);

    let identity = format!(
        "{}-{:08x}",
        cx.opts.pod.name.as_deref().unwrap_or("sidecert"),
        rand::rng().random::<u32>()
    );
    let election = Election::join(
        cx.client.clone(),
        LeaseSpec {
            namespace: &cx.opts.namespace,
            name: &lease,
            identity: &identity,
            field_manager: election_field_manager(&identity),
            duration: cx.opts.lease_duration,
            min: MIN_LEASE,
            min_grace: MIN_LEASE_GRACE,
        },
    )
    .await?;
    let mut leader_rx = election.leader.clone();
    // A new round starts as the holder of nothing: the first one reads the failure record.
    st.follow();

    // The Secret was found to be someone else's, and that was said (once until it changes).
    let mut refused = false;
    let result = loop {
        let now = OffsetDateTime::now_utc();
        let secret = classify(
            secret_rx.borrow_and_update().as_ref(),
            &spec.domains,
            &cx.opts.config.acme_server,
            now,
        );
        let leader = *leader_rx.borrow_and_update();
        let seen = Observed {
            secret: &secret,
            leader,
        };
        m.leader.with_label_values(&[&name]).set(i64::from(leader));
        m.ready
            .with_label_values(&[&name])
            .set(i64::from(st.serving(&secret, now)));
        if let Some(h) = &st.held {
            m.not_after
                .with_label_values(&[&name])
                .set(h.info.lifetime.not_after.unix_timestamp() as f64);
        }
        let step = decide(st, &seen, now);
        refused &= matches!(step, Step::NotOurs);
        if let Step::Order { .. } | Step::Wait { .. } = step
            && let Some(renew_at) = st.renew_at(now)
        {
            m.renew_at
                .with_label_values(&[&name])
                .set(renew_at.unix_timestamp() as f64);
        }
        match step {
            Step::Adopt {
                cert,
                foreign,
                reload,
            } => {
                tracing::info!(secret = name, not_after = %cert.info.lifetime.not_after, "certificate from the Secret");
                if foreign {
                    tracing::info!(
                        secret = name,
                        "the certificate in the Secret is from another ACME server; replacing it"
                    );
                }
                st.adopt(cert.clone(), foreign);
                landed(cx, &cert, reload).await;
            }
            Step::Settled => st.settled(),
            Step::Lead => {
                let record = read_failures(&cx.leases, &lease).await;
                st.lead(&record);
            }
            Step::Follow => st.follow(),
            Step::Restore => {
                tracing::warn!(secret = name, "the Secret lost the certificate; writing it again");
                st.restore();
            }
            Step::Write { cert, renew_at } => {
                let meta = WriteMeta {
                    issuer_url: &cx.opts.config.acme_server,
                    renew_at,
                };
                match write_secret(&cx.secrets, &name, &cert, &meta).await {
                    Ok(()) => {
                        tracing::info!(secret = name, "certificate written to the Secret");
                        if st.written(OffsetDateTime::now_utc()) {
                            reload(cx);
                        }
                    }
                    Err(e) => {
                        let wait = st.write_failed(OffsetDateTime::now_utc());
                        tracing::warn!(secret = name, error = %e, retry_in = ?wait, "writing the Secret failed; keeping the certificate in memory");
                        m.failures.with_label_values(&[&name, e.metric_label()]).inc();
                        if matches!(e, Error::ForeignSecret(_)) {
                            cx.events.publish(true, "SecretNotOurs", e.to_string()).await;
                        }
                    }
                }
            }
            Step::Backoff { until } => {
                tokio::select! {
                    _ = shutdown.cancelled() => break Ok(()),
                    _ = tokio::time::sleep(delay_until(until, now)) => {}
                }
                st.woke();
            }
            Step::AskAri(id) => {
                let answer = ask_ari(cx, &name, &id).await;
                st.ari_answer(answer, OffsetDateTime::now_utc());
            }
            Step::Order { replaces } => {
                if order(cx, spec, st, replaces, &mut leader_rx, shutdown, now).await {
                    break Ok(());
                }
            }
            Step::NotOurs => {
                if !refused {
                    refused = true;
                    tracing::warn!(
                        secret = name,
                        "the Secret is not sidecert's; no certificate is ordered or written for it until it is handed over (label app.kubernetes.io/managed-by=sidecert) or deleted"
                    );
                    let e = Error::ForeignSecret(name.clone());
                    m.failures.with_label_values(&[&name, e.metric_label()]).inc();
                    cx.events.publish(true, "SecretNotOurs", e.to_string()).await;
                }
                // Only a change of the Secret can end this; a change of the Lease is looked
                // at again (the leader gauge follows it, an ended Lease task ends the round).
                tokio::select! {
                    _ = shutdown.cancelled() => break Ok(()),
                    r = secret_rx.changed() => if r.is_err() { break Err(Error::order("Secret watch ended")) },
                    r = leader_rx.changed() => if r.is_err() { break Err(Error::order("Lease task ended")) },
                }
                continue;
            }
            Step::Wait { until } => {
                tokio::select! {
                    _ = shutdown.cancelled() => break Ok(()),
                    r = secret_rx.changed() => if r.is_err() { break Err(Error::order("Secret watch ended")) },
                    r = leader_rx.changed() => if r.is_err() { break Err(Error::order("Lease task ended")) },
                    _ = tokio::time::sleep(delay_until(until, now)) => {},
                }
                st.woke();
            }
        }
    };
    if shutdown.is_cancelled() {
        last_write(cx, spec, st).await;
    }
    m.leader.with_label_values(&[&name]).set(0);
    // The Lease task releases once every receiver is gone.
    drop(leader_rx);
    election.release().await;
    result
}

/// Runs [`Step::Order`], aborting cleanly if the Lease is lost or we are told to stop, and
/// feeds the outcome into `st`. True when the loop is to end (shutdown).
async fn order(
    cx: &Arc<Context>,
    spec: &CertificateSpec,
    st: &mut State,
    replaces: Option<instant_acme::CertificateIdentifier<'static>>,
    leader_rx: &mut watch::Receiver<bool>,
    shutdown: &CancellationToken,
    started: OffsetDateTime,
) -> bool {
    let name = &spec.secret_name;
    let lease = spec.lease_name();
    let m = &cx.metrics;
    // A Retry-After left from an earlier, unrelated request does not count.
    let _ = cx.http.take_retry_after();
    let mut account_used = None;
    let outcome = tokio::select! {
        biased;
        _ = shutdown.cancelled() => Err(Error::Shutdown),
        _ = lost(leader_rx) => Err(Error::LostLease),
        r = order_once(cx, spec, replaces, &mut account_used) => r,
    };
    match outcome {
        Ok(issued) => {
            m.orders.with_label_values(&["issued"]).inc();
            let renewal = st.held.is_some();
            let not_after = issued.info.lifetime.not_after;
            let record = st.issued(
                issued.clone(),
                OffsetDateTime::now_utc(),
                rand::rng().random::<f64>(),
            );
            if let Some(record) = record {
                write_failures(&cx.leases, &lease, Some(&record)).await;
            }
            cx.events
                .publish(
                    false,
                    if renewal { "Renewed" } else { "Issued" },
                    format!(
                        "certificate for {} issued, valid until {}",
                        spec.domains.join(", "),
                        rfc3339(not_after)
                    ),
                )
                .await;
            landed(cx, &issued, false).await;
        }
        Err(Error::Shutdown) => {
            // Still the holder until the release: take the challenges back.
            let publisher = publisher(cx, spec);
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                crate::acme::Publisher::withdraw(&publisher),
            )
            .await;
            return true;
        }
        Err(Error::LostLease) => {
            tracing::warn!(secret = name, "lost the Lease during the order; aborted");
            m.orders.with_label_values(&["aborted"]).inc();
            st.order_aborted();
        }
        Err(e) => {
            let label = if matches!(e, Error::Validation { .. }) {
                "validation_failed"
            } else {
                "failed"
            };
            m.orders.with_label_values(&[label]).inc();
            m.failures.with_label_values(&[name, e.metric_label()]).inc();
            let failure = match &e {
                Error::Validation { domains, .. } => Failure::Validation {
                    domains: domains
                        .split(',')
                        .filter(|d| !d.is_empty())
                        .map(str::to_owned)
                        .collect(),
                },
                _ => Failure::Other,
            };
            let retry_after = cx.http.take_retry_after().map(OffsetDateTime::from);
            let (record, wait) = st.order_failed(
                &failure,
                started,
                OffsetDateTime::now_utc(),
                rand::rng().random(),
                retry_after,
            );
            write_failures(&cx.leases, &lease, Some(&record)).await;
            tracing::warn!(secret = name, error = %e, failures = st.failures, retry_in = ?wait, "order failed");
            cx.events
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
                cx.accounts.replace_forgotten(id).await;
            } else if matches!(e, Error::Acme(_) | Error::Kube(_)) {
                // The account may be stale: re-read its Secret next time.
                cx.accounts.forget().await;
            }
        }
    }
    false
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

/// [`Step::AskAri`]: the CA's window and when to ask again, or none (unsupported, or an
/// error: the 1/3 rule then applies).
async fn ask_ari(
    cx: &Context,
    name: &str,
    id: &instant_acme::CertificateIdentifier<'static>,
) -> Option<(Window, Duration)> {
    let account = cx.accounts.get().await.ok()?;
    match account.renewal_info(id).await {
        Ok((info, retry)) => {
            let w = Window {
                start: info.suggested_window.start,
                end: info.suggested_window.end,
            };
            tracing::debug!(secret = name, start = %w.start, end = %w.end, "ARI window");
            Some((w, retry))
        }
        Err(instant_acme::Error::Unsupported(_)) => None,
        Err(e) => {
            tracing::debug!(error = %e, "ARI unavailable, using the 1/3 rule");
            None
        }
    }
}

/// One order; `account_used` says with which account (its URL).
async fn order_once(
    cx: &Arc<Context>,
    spec: &CertificateSpec,
    replaces: Option<instant_acme::CertificateIdentifier<'static>>,
    account_used: &mut Option<String>,
) -> Result<Held> {
    let account = cx.accounts.get().await?;
    *account_used = Some(account.id().to_owned());
    let cfg = &cx.opts.config;
    let req = OrderRequest {
        domains: spec.domains.clone(),
        profile: cfg.acme_profile.clone(),
        replaces,
        key_algorithm: cfg.key_algorithm,
    };
    let inner = publisher(cx, spec);
    // An Ingress certificate: after the self-check, wait until the Ingress routes to this
    // Pod set (the solver Service's endpoints) before telling the CA.
    let gate = spec.solver_service.clone().map(|service| RouteGate {
        client: cx.client.clone(),
        namespace: cx.opts.namespace.clone(),
        service,
        wait: cx.opts.route_wait,
        settle: cx.opts.route_settle,
        events: cx.events.clone(),
        http01_port: cfg.http01_port,
    });
    let publisher = Routed {
        inner,
        gate,
        domains: spec.domains.clone(),
    };
    crate::acme::order(&account, &req, &publisher).await
}

fn publisher(cx: &Context, spec: &CertificateSpec) -> LeasePublisher {
    LeasePublisher {
        api: cx.leases.clone(),
        lease: spec.lease_name(),
        store: cx.challenges.clone(),
        self_url: cx.self_url.clone(),
    }
}

/// A new certificate is in effect: the directory, the reload URL.
async fn landed(cx: &Arc<Context>, held: &Held, reload: bool) {
    if let Some(dir) = &cx.opts.cert_dir
        && let Err(e) = write_dir(dir, &held.chain_pem, &held.key_pem).await
    {
        tracing::warn!(error = %e, "writing the certificate directory");
    }
    if reload {
        self::reload(cx);
    }
}

/// Calls the reload URL, if any, after the configured delay (in the background).
fn reload(cx: &Context) {
    if let Some(url) = cx.opts.config.reload_url.clone() {
        let delay = cx.opts.reload_delay;
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
