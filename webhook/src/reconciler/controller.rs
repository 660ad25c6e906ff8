//! The controller wiring: the Ingress controller, the Namespace and Service watches that
//! requeue Ingresses, one reconcile, and the retry policy.

use std::{future::Future, sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Namespace, Service},
    networking::v1::Ingress,
};
use kube::{
    Api, ResourceExt,
    runtime::{
        controller::{Action, Controller},
        reflector::ObjectRef,
        watcher,
    },
};
use sidecert_runtime::Backoff;

use crate::{
    error::{Error, Result},
    kube::claims::PROVISIONAL_RELEASE_AFTER,
    mutate::{ingress::is_annotated, namespace::may_serve},
    reconciler::{
        cleanup::{CLEANUP_INTERVAL, claim_holders, clean_namespace, may_clean, served_live},
        context::Reconciler,
        plan::ingresses_for_service,
        prune::{PRUNE_INTERVAL, prune_namespace},
    },
};

/// The requeue after failed reconciles of one Ingress: 2 s, 4 s, 8 s ... up to 5 minutes.
pub const RETRY: Backoff = Backoff::new(Duration::from_secs(2), Duration::from_secs(300));

async fn reconcile(ingress: Arc<Ingress>, ctx: Arc<Reconciler>) -> Result<Action> {
    let ns = ingress.namespace().unwrap_or_default();
    if !ctx.namespace_enabled(&ns) {
        return Ok(Action::await_change());
    }
    let key = format!("{ns}/{}", ingress.name_any());
    // The cached Ingress can lag behind (a Service event may come first): act on the current
    // one, so a stale view never removes what a fresh annotation just asked for.
    let fresh = Api::<Ingress>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&ingress.name_any())
        .await;
    let ingress = match fresh {
        Ok(Some(i)) => Arc::new(i),
        Ok(None) => return Ok(Action::await_change()),
        Err(e) => {
            let e = Error::from(e);
            ctx.metrics
                .reconciles
                .with_label_values(&[e.metric_label()])
                .inc();
            return Err(e);
        }
    };
    let result = if is_annotated(&ingress) {
        ctx.ensure(&ingress, &ns)
            .await
            .map(|()| Action::requeue(ctx.settings.interval))
    } else {
        ctx.remove(&ingress, &ns).await.map(|()| Action::await_change())
    };
    let label = match &result {
        Ok(_) => {
            ctx.failures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
            "ok"
        }
        Err(e) => e.metric_label(),
    };
    ctx.metrics.reconciles.with_label_values(&[label]).inc();
    result
}

fn error_policy(ingress: Arc<Ingress>, error: &Error, ctx: Arc<Reconciler>) -> Action {
    let key = format!(
        "{}/{}",
        ingress.namespace().unwrap_or_default(),
        ingress.name_any()
    );
    let n = {
        let mut failures = ctx.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = failures.entry(key.clone()).or_insert(0);
        *n += 1;
        *n
    };
    let wait = RETRY.delay(n);
    tracing::warn!(ingress = key, error = %error, retry_in = ?wait, "reconcile failed");
    Action::requeue(wait)
}

/// Runs the controller until `stop` resolves (then lets running reconciles finish).
pub async fn run_controller(ctx: Arc<Reconciler>, stop: impl Future<Output = ()> + Send + Sync + 'static) {
    let client = ctx.client.clone();
    let controller = Controller::new(Api::<Ingress>::all(client.clone()), watcher::Config::default());
    let by_namespace = controller.store();
    let by_service = controller.store();
    controller
        .watches(
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default().labels(&ctx.settings.namespace_selector),
            move |ns| {
                let name = ns.name_any();
                by_namespace
                    .state()
                    .into_iter()
                    .filter(|i| i.metadata.namespace.as_deref() == Some(name.as_str()))
                    .map(|i| ObjectRef::from_obj(i.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .watches(
            Api::<Service>::all(client),
            watcher::Config::default(),
            move |svc| ingresses_for_service(&by_service.state(), &svc),
        )
        .graceful_shutdown_on(stop)
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "reconciler");
            }
        })
        .await;
}

/// How often the leader looks at every host claim: a fifth of the shortest release delay,
/// between 10 s and 5 minutes.
pub fn sweep_interval(release_after: Duration) -> Duration {
    (release_after.min(PROVISIONAL_RELEASE_AFTER) / 5)
        .clamp(Duration::from_secs(10), Duration::from_secs(300))
}

/// While this replica leads, releases again and again the claims no object of their
/// namespace uses any more.
pub async fn sweep_claims(ctx: Arc<Reconciler>) {
    let Some(claims) = ctx.claims.clone() else {
        return;
    };
    let mut tick = tokio::time::interval(sweep_interval(ctx.settings.host_claim_release_after));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let in_use = |ns: &str, uid: Option<&str>| ctx.hosts_in_use(ns, uid);
        match claims
            .sweep(&ctx.client, &ctx.settings.namespace_selector, in_use)
            .await
        {
            Ok(released) => {
                for _ in released {
                    ctx.action("host_claim_released");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot look at the host claims"),
        }
    }
}

/// While this replica leads, cleans up after sidecert in the namespaces it served (they hold
/// its host claims) and no longer serves ([`crate::reconciler::cleanup`]): one the caches do
/// not have is asked about live first, so a namespace labelled a moment ago keeps what it has.
pub async fn clean_unserved(ctx: Arc<Reconciler>) {
    let mut tick = tokio::time::interval(CLEANUP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Namespaces it may not clean, said once.
    let mut told = std::collections::BTreeSet::new();
    loop {
        tick.tick().await;
        let own = &ctx.settings.own_namespace;
        // Only namespaces this release served: they hold its host claims. Each is looked at
        // on its own (no list across the cluster: strict RBAC grants none).
        let found = match claim_holders(&ctx.client, own).await {
            Ok(holders) => holders,
            Err(e) => {
                tracing::warn!(error = %e, "cannot look for namespaces to clean up");
                continue;
            }
        };
        for ns in found
            .iter()
            .filter(|ns| may_serve(ns, own) && !ctx.namespace_enabled(ns))
        {
            match served_live(&ctx.client, ns, &ctx.settings.namespace_selector).await {
                Ok(false) => {}
                Ok(true) => continue,
                Err(e) => {
                    tracing::warn!(namespace = ns, error = %e, "cannot tell whether the namespace is served");
                    continue;
                }
            }
            // A namespace strict RBAC no longer lists: the webhook may not act there.
            match may_clean(&ctx.client, ns).await {
                Ok(true) => {
                    told.remove(ns);
                }
                Ok(false) => {
                    if told.insert(ns.clone()) {
                        tracing::warn!(
                            namespace = ns,
                            "sidecert no longer serves this namespace and may not clean up there (dropped from \
                             rbac.namespaces while labelled?): its Roles, RoleBindings, solver Services and \
                             HTTP-01 paths stay"
                        );
                    }
                    continue;
                }
                Err(e) => {
                    tracing::warn!(namespace = ns, error = %e, "cannot tell whether sidecert may clean up");
                    continue;
                }
            }
            let (cleaned, _) = clean_namespace(&ctx.client, ns, Some(&ctx.settings.namespace_selector)).await;
            if !cleaned.is_empty() {
                ctx.action("namespace_cleaned");
                cleaned.log(ns, "sidecert no longer serves the namespace");
            }
        }
    }
}

/// While this replica leads, prunes the sidecars' Roles in the served namespaces
/// ([`crate::reconciler::prune`]).
pub async fn prune_roles(ctx: Arc<Reconciler>) {
    let mut tick = tokio::time::interval(PRUNE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let own = &ctx.settings.own_namespace;
        let served: Vec<String> = ctx
            .namespaces
            .state()
            .iter()
            .map(|ns| ns.name_any())
            .filter(|ns| may_serve(ns, own))
            .collect();
        for ns in served {
            match prune_namespace(&ctx.client, &ns).await {
                Ok(pruned) => {
                    for role in &pruned.marked {
                        tracing::debug!(
                            namespace = ns,
                            role,
                            "marked the Role for pruning on the next pass"
                        );
                    }
                    for role in &pruned.narrowed {
                        ctx.action("role_narrowed");
                        tracing::info!(
                            namespace = ns,
                            role,
                            "took names no Pod asks for any more off the Role"
                        );
                    }
                    for role in &pruned.deleted {
                        ctx.action("role_deleted");
                        tracing::info!(
                            namespace = ns,
                            role,
                            "deleted the Role and RoleBinding of a ServiceAccount with no injected Pod left"
                        );
                    }
                }
                Err(e) => tracing::warn!(namespace = ns, error = %e, "cannot prune the sidecars' Roles"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(RETRY.delay(1), Duration::from_secs(2));
        assert_eq!(RETRY.delay(3), Duration::from_secs(8));
        assert_eq!(RETRY.delay(40), Duration::from_secs(300));
    }
}
