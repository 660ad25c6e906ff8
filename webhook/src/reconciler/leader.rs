//! The leader election: one replica reconciles, the holder of a Lease
//! ([`sidecert_runtime::Election`]); it runs the controller while it leads, and stops
//! reconciling and gives the Lease up on shutdown.

use std::{
    hash::{BuildHasher, Hasher},
    sync::Arc,
    time::Duration,
};

use futures::FutureExt;
use kube::Client;
use sidecert_runtime::{Backoff, Election, LeaseSpec};
use tokio::sync::{oneshot, watch};

use crate::{
    kube::{claims::HostClaims, namespaces::namespace_store},
    metrics::Metrics,
    mutate::lookup::Lookup,
    reconciler::{
        context::Reconciler,
        controller::{clean_unserved, prune_roles, run_controller, sweep_claims},
        gateway::reconcile_gateways,
        settings::{CONTROLLER_NAME, Settings},
    },
};

/// The wait before joining the election again: 1 s, 2 s, ... up to 30 s.
pub const REJOIN: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));

/// How long a new leader claims the hosts of the annotated Ingresses before it reconciles.
pub const SEED_TIMEOUT: Duration = Duration::from_secs(60);

/// The Lease the replicas elect a leader on.
#[derive(Debug, Clone)]
pub struct LeaderSettings {
    pub namespace: String,
    pub lease_name: String,
    pub duration: Duration,
}

/// `POD_NAME` or `HOSTNAME` (else `sidecert-webhook`) plus a random suffix: unique even for
/// two replicas in one process, and a restarted Pod never mistakes an old lock for its own.
pub fn default_identity() -> String {
    let base = ["POD_NAME", "HOSTNAME"]
        .into_iter()
        .filter_map(|v| std::env::var(v).ok())
        .map(|v| v.trim().to_owned())
        .find(|v| !v.is_empty())
        .unwrap_or_else(|| CONTROLLER_NAME.to_owned());
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    format!("{base}-{:06x}", h.finish() & 0xff_ffff)
}

/// Elects a leader on the Lease and runs the reconciler while this replica leads, until
/// `shutdown` turns true; then stops reconciling and gives the Lease up.
pub async fn run(
    client: Client,
    lookup: Arc<dyn Lookup>,
    claims: Option<HostClaims>,
    settings: Settings,
    leader: LeaderSettings,
    metrics: Metrics,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut failures: u32 = 0;
    'elect: loop {
        let spec = LeaseSpec {
            namespace: &leader.namespace,
            name: &leader.lease_name,
            identity: &settings.identity,
            field_manager: format!("{CONTROLLER_NAME}-{}", settings.identity),
            duration: leader.duration,
            min: Duration::from_secs(2),
            min_grace: Duration::from_secs(1),
        };
        let mut election = match Election::join(client.clone(), spec).await {
            Ok(e) => e,
            Err(e) => {
                failures = failures.saturating_add(1);
                let wait = REJOIN.delay(failures);
                tracing::warn!(error = %e, lease = leader.lease_name, retry_in = ?wait, "cannot join the leader election");
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = shutdown.wait_for(|s| *s) => return,
                }
                continue;
            }
        };
        failures = 0;
        let is_leader = &mut election.leader;
        tracing::info!(
            identity = settings.identity,
            lease = leader.lease_name,
            "joined the leader election"
        );
        let stopping = loop {
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s) => break true,
                r = is_leader.wait_for(|l| *l) => if r.is_err() { break false },
            }
            tracing::info!(
                identity = settings.identity,
                "leader: starting the Ingress reconciler"
            );
            metrics.leader.set(1);
            let (namespaces, ns_watch) = namespace_store(client.clone(), &settings.namespace_selector);
            let ready = tokio::select! {
                r = namespaces.wait_until_ready() => r.is_ok(),
                _ = shutdown.wait_for(|s| *s) => false,
            };
            let ctx = Arc::new(Reconciler::new(
                client.clone(),
                lookup.clone(),
                claims.clone(),
                namespaces,
                settings.clone(),
                metrics.clone(),
            ));
            // The hosts of the annotated Ingresses are claimed, oldest first, before any is
            // reconciled: where two namespaces ask for a host from before sidecert claimed
            // hosts, the one that asked first keeps it, not the one reconciled first. A
            // shutdown or a lost lead meanwhile ends the term here: no sweep, no controller.
            let seeded = if ready {
                tokio::select! {
                    biased;
                    _ = shutdown.wait_for(|s| *s) => Some(true),
                    r = is_leader.wait_for(|l| !*l) => Some(r.is_err()),
                    r = tokio::time::timeout(SEED_TIMEOUT, ctx.seed_claims()) => {
                        match r {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => tracing::warn!(error = %e, "cannot claim the hosts of the annotated Ingresses"),
                            Err(_) => tracing::warn!(timeout = ?SEED_TIMEOUT, "claiming the hosts of the annotated Ingresses took too long; reconciling"),
                        }
                        None
                    }
                }
            } else {
                Some(true)
            };
            let outcome = match seeded {
                Some(outcome) => Some(outcome),
                None => lead(ctx, is_leader, &mut shutdown).await,
            };
            ns_watch.abort();
            metrics.leader.set(0);
            match outcome {
                Some(true) => break *shutdown.borrow(),
                Some(false) => tracing::info!("lost the lead: reconciler stopped"),
                None => tracing::warn!("the reconciler ended; restarting it"),
            }
        };
        election.release().await;
        if stopping || *shutdown.borrow() {
            break 'elect;
        }
        let wait = REJOIN.delay(failures);
        tracing::warn!(retry_in = ?wait, "leader election ended; joining again");
        tokio::time::sleep(wait).await;
    }
}

/// Runs the claim sweeps, the cleanup of unserved namespaces and the controller until
/// shutdown (`Some(true)`), a lost lead (`Some(false)`, or `Some(true)` if the election
/// ended) or the controller's end (`None`); then stops them, leaving reconciles still
/// running after 5 s.
async fn lead(
    ctx: Arc<Reconciler>,
    is_leader: &mut watch::Receiver<bool>,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<bool> {
    let sweeps = tokio::spawn(sweep_claims(ctx.clone()));
    let cleanups = tokio::spawn(clean_unserved(ctx.clone()));
    let prunes = tokio::spawn(prune_roles(ctx.clone()));
    let gateways = tokio::spawn(reconcile_gateways(ctx.clone()));
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let controller = run_controller(ctx, stop_rx.map(drop));
    tokio::pin!(controller);
    let outcome = tokio::select! {
        biased;
        _ = shutdown.wait_for(|s| *s) => Some(true),
        r = is_leader.wait_for(|l| !*l) => Some(r.is_err()),
        () = &mut controller => None,
    };
    sweeps.abort();
    cleanups.abort();
    prunes.abort();
    gateways.abort();
    let _ = stop_tx.send(());
    if outcome.is_some()
        && tokio::time::timeout(Duration::from_secs(5), &mut controller)
            .await
            .is_err()
    {
        tracing::warn!("reconciles still running after 5 s; leaving them");
    }
    outcome
}
