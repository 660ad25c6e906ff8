//! What every reconcile shares (client, executor, Event recorder, settings, metrics), the
//! Events it records, and the two halves of a reconcile: `Reconciler::ensure` for an
//! annotated Ingress, `Reconciler::remove` for one that lost the annotation.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::api::{
    core::v1::{Namespace, ObjectReference, Service},
    networking::v1::Ingress,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ListParams, Patch, PatchParams},
    runtime::{
        events::{Event, EventType, Recorder, Reporter},
        reflector::{ObjectRef, Store},
    },
};
use serde_json::json;
use sidecert_contract::{
    ACME_CHALLENGE_PATH, MANAGED_BY, MANAGED_BY_LABEL, annotations, foreign_secret_warning, lease_name,
};

use crate::{
    error::{Error, Result},
    kube::{
        claims::{Ask, Claimed, HostClaims},
        delete::{Deleted, delete_unchanged},
        executor::Executor,
        namespaces::Served,
    },
    metrics::Metrics,
    mutate::{
        context::HostStanding,
        context::SecretChecks,
        effect::Effect,
        ingress::{
            Plan, effects, is_annotated, plan, route_patch, route_removal_patch, route_removal_patch_for,
            routed_solvers,
        },
        lookup::Lookup,
        namespace::may_serve,
    },
    reconciler::{
        plan::{Removal, guarded, restart_key, solver_removal},
        settings::{CONTROLLER_NAME, Settings},
    },
};

/// What every reconcile shares.
pub struct Reconciler {
    pub(super) client: Client,
    /// Who owns which host (`None`: every host is its namespace's).
    pub(super) claims: Option<HostClaims>,
    pub(super) lookup: Arc<dyn Lookup>,
    pub(super) executor: Executor,
    pub(super) namespaces: Store<Namespace>,
    recorder: Recorder,
    pub(super) settings: Settings,
    pub(super) metrics: Metrics,
    /// Consecutive failures per Ingress (`ns/name`), for the backoff.
    pub(super) failures: Mutex<HashMap<String, u32>>,
    /// The last warning Event per object uid and reason, so a standing problem is reported
    /// once.
    reported: Mutex<HashMap<String, String>>,
}

impl Reconciler {
    pub fn new(
        client: Client,
        lookup: Arc<dyn Lookup>,
        claims: Option<HostClaims>,
        namespaces: Store<Namespace>,
        settings: Settings,
        metrics: Metrics,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: CONTROLLER_NAME.to_owned(),
                instance: Some(settings.identity.clone()),
            },
        );
        Self {
            executor: Executor::new(client.clone(), lookup.clone(), Duration::from_secs(10)),
            client,
            claims,
            lookup,
            namespaces,
            recorder,
            settings,
            metrics,
            failures: Mutex::default(),
            reported: Mutex::default(),
        }
    }

    pub(super) fn namespace_enabled(&self, ns: &str) -> bool {
        may_serve(ns, &self.settings.own_namespace) && self.namespaces.get(&ObjectRef::new(ns)).is_some()
    }

    /// The hosts the cached annotated Ingresses of `ns` ask for, if it is a namespace
    /// served, of uid `uid` (when known); none otherwise.
    pub(super) fn hosts_in_use(&self, ns: &str, uid: Option<&str>) -> BTreeSet<String> {
        let same = self
            .namespaces
            .get(&ObjectRef::new(ns))
            .is_some_and(|n| uid.is_none_or(|uid| n.metadata.uid.as_deref() == Some(uid)));
        if !same || !self.namespace_enabled(ns) {
            return BTreeSet::new();
        }
        let mut ingresses = self.lookup.ingresses(ns);
        // The annotated Gateways and ListenerSets, as the Ingresses that ask for the same.
        ingresses.extend(self.lookup.gateway_ingresses(ns));
        ingresses
            .iter()
            .filter(|i| is_annotated(i))
            .flat_map(|i| {
                plan(i, self.settings.default_profile.as_deref())
                    .hosts()
                    .into_iter()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Claims `hosts` for the served namespace `ns`, within its allowed domains (`None`
    /// without claims). The objects are stored: a claim held is not renewed.
    pub(super) async fn claim_for(&self, ns: &str, hosts: &[&str]) -> Option<Claimed> {
        let claims = self.claims.as_ref()?;
        let served = self
            .namespaces
            .get(&ObjectRef::new(ns))
            .map(|n| Served::of(&n.metadata));
        Some(
            claims
                .claim(ns, served.as_ref(), hosts, Ask::Reconcile, self.executor.budget())
                .await,
        )
    }

    /// Claims the hosts of every annotated Ingress of the served namespaces, oldest Ingress
    /// first (a stored object's creationTimestamp is set): run when a replica starts to lead,
    /// so that Ingresses from before sidecert claimed hosts keep the hosts they asked for
    /// first, whichever the controller happens to reconcile first.
    pub(super) async fn seed_claims(&self) -> Result<()> {
        if self.claims.is_none() {
            return Ok(());
        }
        let mut ingresses: Vec<Ingress> = Api::<Ingress>::all(self.client.clone())
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|i| is_annotated(i) && self.namespace_enabled(&i.namespace().unwrap_or_default()))
            .collect();
        ingresses.sort_by(|a, b| {
            (a.creation_timestamp().map(|t| t.0), a.uid())
                .cmp(&(b.creation_timestamp().map(|t| t.0), b.uid()))
        });
        for ingress in &ingresses {
            let ns = ingress.namespace().unwrap_or_default();
            let plan = plan(ingress, self.settings.default_profile.as_deref());
            let hosts: Vec<&str> = plan.hosts().into_iter().collect();
            self.claim_for(&ns, &hosts).await;
        }
        Ok(())
    }

    /// Claims the plan's hosts for `ns` and leaves out of it those it may not have, with a
    /// `HostNotOwned` (or `HostOwnerUnknown`) warning Event on `target`; what was left out,
    /// `None` when nothing was (or without claims).
    pub(super) async fn claim_plan_hosts(
        &self,
        target: &ObjectReference,
        ns: &str,
        plan: &mut Plan,
    ) -> Option<crate::mutate::context::HostChecks> {
        let hosts: Vec<&str> = plan.hosts().into_iter().collect();
        let checks = self.claim_for(ns, &hosts).await?.checks(false);
        if checks.left_out.is_empty() {
            return None;
        }
        // An Event's note holds 1 kB: the first few warnings, and how many more.
        let warnings: BTreeSet<String> = checks
            .left_out
            .iter()
            .map(|(host, standing)| standing.warning(ns, host))
            .collect();
        let mut note = warnings.iter().take(3).cloned().collect::<Vec<_>>().join("; ");
        if warnings.len() > 3 {
            note.push_str(&format!("; and {} more", warnings.len() - 3));
        }
        let reason = if owner_unknown(&checks.left_out) {
            "HostOwnerUnknown"
        } else {
            "HostNotOwned"
        };
        self.warn_once(target, reason, note).await;
        plan.leave_out_hosts(ns, &checks);
        Some(checks)
    }

    /// Leaves the Secrets of someone else's out of the plan (never written, routed to or
    /// rolled for), with a `SecretNotOurs` warning Event on `target`; whether the owner of
    /// one could not be told in time (the reconcile is then retried with backoff).
    pub(super) async fn leave_out_foreign_secrets(
        &self,
        target: &ObjectReference,
        ns: &str,
        plan: &mut Plan,
    ) -> bool {
        let owners = self
            .executor
            .secret_owners(ns, &plan.secret_names(), self.executor.budget())
            .await;
        let checks = SecretChecks {
            left_out: owners.left_out(),
            checked: None,
        };
        plan.leave_out(ns, &checks);
        if !owners.foreign.is_empty() {
            let note = owners
                .foreign
                .iter()
                .map(|s| foreign_secret_warning(ns, s))
                .collect::<Vec<_>>()
                .join("; ");
            self.warn_once(target, "SecretNotOurs", note).await;
        }
        !owners.unknown.is_empty()
    }

    /// Claims the plan's hosts for `ns` and leaves out the ones it may not have, with a
    /// warning Event; the HTTP-01 paths of those another namespace owns or this one may not
    /// claim (added before the claim, or before sidecert claimed hosts at all) come off the
    /// Ingress. Returns the Ingress as patched, if it was, and whether the owner of a host
    /// could not be told in time (the reconcile is then retried with backoff).
    async fn leave_out_hosts(
        &self,
        ingress: &Ingress,
        ns: &str,
        plan: &mut Plan,
    ) -> Result<(Option<Ingress>, bool)> {
        let Some(checks) = self.claim_plan_hosts(&ingress.object_ref(&()), ns, plan).await else {
            return Ok((None, false));
        };
        let unknown = owner_unknown(&checks.left_out);
        // Only hosts another namespace owns or this one may not claim: a host whose claim is
        // not known in time, or past what one pass claims, keeps its path.
        let gone = |host: &str| {
            checks.left_out.get(host).is_some_and(|s| {
                matches!(
                    s,
                    HostStanding::Claimed | HostStanding::NotAllowed(_) | HostStanding::Unclaimable
                )
            })
        };
        let patch = route_removal_patch_for(ingress, gone);
        if patch.is_empty() {
            return Ok((None, unknown));
        }
        let updated = self
            .remove_paths(
                ingress,
                ns,
                patch,
                "hosts this namespace does not own (claimed by another namespace first, or outside \
                 its allowed domains)",
            )
            .await?;
        Ok((Some(updated), unknown))
    }

    /// Applies `patch` (a [`route_removal_patch_for`], guarded by the Ingress's
    /// resourceVersion) and says so in a `ChallengeRouteRemoved` Event: the path came off
    /// `why`.
    async fn remove_paths(
        &self,
        ingress: &Ingress,
        ns: &str,
        patch: Vec<json_patch::PatchOperation>,
        why: &str,
    ) -> Result<Ingress> {
        let name = ingress.name_any();
        let updated = Api::<Ingress>::namespaced(self.client.clone(), ns)
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Json::<()>(guarded(ingress.resource_version().as_deref(), patch)),
            )
            .await?;
        self.action("route_removed");
        tracing::info!(namespace = ns, ingress = %name, why, "removed the HTTP-01 path");
        self.event(
            &ingress.object_ref(&()),
            EventType::Normal,
            "ChallengeRouteRemoved",
            "Reconcile",
            format!("removed the HTTP-01 path {ACME_CHALLENGE_PATH}: {why}"),
            None,
        )
        .await;
        Ok(updated)
    }

    pub(super) fn action(&self, action: &str) {
        self.metrics.reconciler_actions.with_label_values(&[action]).inc();
    }

    pub(super) async fn event(
        &self,
        target: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
        secondary: Option<ObjectReference>,
    ) {
        let ev = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(note),
            action: action.to_owned(),
            secondary,
        };
        if let Err(e) = self.recorder.publish(&ev, target).await {
            tracing::warn!(error = %e, reason, "cannot record an Event");
        }
    }

    /// A warning Event, unless the same one was the last of its reason for this object (its
    /// uid).
    pub(super) async fn warn_once(&self, target: &ObjectReference, reason: &str, note: String) {
        let uid = format!("{}/{reason}", target.uid.as_deref().unwrap_or_default());
        let fresh = {
            let mut reported = self.reported.lock().unwrap_or_else(|p| p.into_inner());
            reported.insert(uid, note.clone()).as_ref() != Some(&note)
        };
        if fresh {
            self.event(target, EventType::Warning, reason, "Check", note, None)
                .await;
        }
    }

    /// Brings an annotated Ingress's world in line.
    pub(super) async fn ensure(&self, ingress: &Ingress, ns: &str) -> Result<()> {
        let name = ingress.name_any();
        let mut plan = plan(ingress, self.settings.default_profile.as_deref());
        // One owner per host: what another namespace owns is left out, and its path goes.
        let (trimmed, hosts_unknown) = self.leave_out_hosts(ingress, ns, &mut plan).await?;
        let ingress = trimmed.as_ref().unwrap_or(ingress);
        let owners_unknown = self
            .leave_out_foreign_secrets(&ingress.object_ref(&()), ns, &mut plan)
            .await;
        let mut generation_source = ingress.clone();
        let patch = route_patch(&plan);
        if !patch.is_empty() {
            let api = Api::<Ingress>::namespaced(self.client.clone(), ns);
            let hosts: Vec<&str> = plan
                .routes
                .iter()
                .filter(|r| !r.routed)
                .map(|r| r.host.as_str())
                .collect();
            generation_source = api
                .patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Json::<()>(guarded(ingress.resource_version().as_deref(), patch)),
                )
                .await?;
            self.action("route_added");
            tracing::info!(namespace = ns, ingress = %name, "added the HTTP-01 path");
            self.event(
                &ingress.object_ref(&()),
                EventType::Normal,
                "ChallengeRouteAdded",
                "Reconcile",
                format!(
                    "added the HTTP-01 path {ACME_CHALLENGE_PATH} for {} (the admission webhook had not \
                     mutated this Ingress)",
                    hosts.join(", ")
                ),
                None,
            )
            .await;
        }

        // A Secret whose owner could not be told is left out this time; retry with backoff.
        let mut first_error =
            (owners_unknown || hosts_unknown).then(|| Error::Timeout(self.executor.budget()));
        for effect in effects(ingress, ns, &plan) {
            let result = match &effect {
                Effect::SolverService {
                    namespace,
                    name,
                    backend,
                    owner,
                } => self
                    .executor
                    .sync_solver(namespace, name, backend, owner.as_ref())
                    .await
                    .map(|done| {
                        if let Some(action) = done {
                            self.action(action);
                        }
                    }),
                other => self.executor.apply_one(other).await,
            };
            if let Err(e) = result {
                tracing::warn!(namespace = ns, ingress = %name, effect = effect.describe(), error = %e, "reconcile");
                first_error.get_or_insert(e);
            }
        }

        // The certificates' Leases: the sidecar's Role has no `create`, so one deleted (by
        // hand, or with its namespace's Leases) would stop its renewals until a Pod is
        // admitted again. A Lease grants nothing: it is made whether or not a Pod runs yet.
        for secret in &plan.secrets {
            let lease = lease_name(&secret.secret_name);
            if let Err(e) = self.executor.ensure_lease(ns, &lease).await {
                tracing::warn!(namespace = ns, ingress = %name, lease, error = %e, "reconcile");
                first_error.get_or_insert(e);
            }
        }

        let backends: BTreeSet<&str> = plan.routes.iter().map(|r| r.backend.as_str()).collect();
        let mut selectors = Vec::new();
        for backend in backends {
            match self.executor.backend_selector(ns, backend).await {
                Ok(s) => selectors.push(s),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        self.roll(
            &ingress.object_ref(&()),
            "Ingress",
            ns,
            &selectors,
            &restart_key(&generation_source),
        )
        .await?;
        first_error.map_or(Ok(()), Err)
    }

    /// Takes sidecert's additions off an Ingress that lost the annotation. Secrets stay.
    pub(super) async fn remove(&self, ingress: &Ingress, ns: &str) -> Result<()> {
        let name = ingress.name_any();
        let routed = routed_solvers(ingress);
        let patch = route_removal_patch(ingress);
        if !patch.is_empty() {
            let why = format!(
                "the Ingress is no longer annotated {}; its Secrets are left alone",
                annotations::ISSUE_TEMPORARY_CERTIFICATE
            );
            self.remove_paths(ingress, ns, patch, &why).await?;
        }
        remove_solvers(&self.client, ns, ingress.uid().as_deref(), &routed)
            .await?
            .into_iter()
            .for_each(|svc| {
                self.action("solver_deleted");
                tracing::info!(namespace = ns, ingress = %name, service = svc, "deleted solver Service");
            });
        Ok(())
    }
}

/// Whether a reconcile that left out these hosts is retried with backoff: only when the owner
/// of one was not known in time. Past the most hosts one pass claims, or the most claims a
/// namespace holds, a host stays left out until the next interval.
pub(super) fn owner_unknown(left_out: &BTreeMap<String, HostStanding>) -> bool {
    left_out.values().any(|s| matches!(s, HostStanding::Unknown))
}

/// Deletes (or disowns) the solver Services of an Ingress that lost the annotation; returns
/// the names deleted.
pub async fn remove_solvers(
    client: &Client,
    ns: &str,
    ingress_uid: Option<&str>,
    routed: &[String],
) -> Result<Vec<String>> {
    let api = Api::<Service>::namespaced(client.clone(), ns);
    let lp = ListParams::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
    let mut deleted = Vec::new();
    for svc in api.list(&lp).await?.items {
        let name = svc.name_any();
        match solver_removal(&svc, ingress_uid, routed) {
            Removal::Keep => {}
            Removal::Delete => match delete_unchanged(&api, &svc.metadata).await? {
                Deleted::Yes => deleted.push(name),
                Deleted::Gone => {}
                // Changed since listed: the next reconcile looks again.
                Deleted::Changed => {
                    return Err(Error::Contended(format!(
                        "solver Service {name} changed while it was removed"
                    )));
                }
            },
            Removal::Disown(owners) => {
                let patch = json!({"metadata": {
                    "ownerReferences": owners,
                    "resourceVersion": svc.resource_version(),
                }});
                api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
            }
        }
    }
    Ok(deleted)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use http::{Method, StatusCode};
    use serde_json::json;

    use super::*;
    use crate::testing::{client, next, owner, solver};

    #[test]
    fn only_an_owner_not_known_in_time_is_retried() {
        let left_out = |s: HostStanding| BTreeMap::from([("a.example".to_owned(), s)]);
        for standing in [
            HostStanding::TooMany,
            HostStanding::TooManyClaims,
            HostStanding::Claimed,
            HostStanding::Unclaimable,
            HostStanding::NotAllowed("no".to_owned()),
        ] {
            assert!(!owner_unknown(&left_out(standing.clone())), "{standing:?}");
        }
        assert!(owner_unknown(&left_out(HostStanding::Unknown)));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn removal_deletes_owned_solvers_and_disowns_shared_ones() {
        let (client, mut handle) = client();
        let task = tokio::spawn(async move {
            remove_solvers(&client, "shop", Some("u-1"), &["web-sidecert-solver".to_owned()]).await
        });
        let mut shared = serde_json::to_value(solver(json!([owner("u-1"), owner("u-2")]), true)).unwrap();
        shared["metadata"]["name"] = "api-sidecert-solver".into();
        let list = json!({"apiVersion": "v1", "kind": "ServiceList", "metadata": {},
            "items": [serde_json::to_value(solver(json!([owner("u-1")]), true)).unwrap(), shared]});
        let q = next(
            &mut handle,
            Method::GET,
            "/api/v1/namespaces/shop/services",
            StatusCode::OK,
            list,
        )
        .await;
        assert!(
            q["query"]
                .as_str()
                .unwrap()
                .contains("labelSelector=app.kubernetes.io%2Fmanaged-by%3Dsidecert"),
            "{q}"
        );
        let body = next(
            &mut handle,
            Method::DELETE,
            "/api/v1/namespaces/shop/services/web-sidecert-solver",
            StatusCode::OK,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
        )
        .await;
        assert_eq!(body["preconditions"]["uid"], "s-1");
        let body = next(
            &mut handle,
            Method::PATCH,
            "/api/v1/namespaces/shop/services/api-sidecert-solver",
            StatusCode::OK,
            serde_json::to_value(solver(json!([owner("u-2")]), true)).unwrap(),
        )
        .await;
        assert_eq!(body["metadata"]["ownerReferences"], json!([owner("u-2")]));
        assert_eq!(body["metadata"]["resourceVersion"], "9");
        assert_eq!(task.await.unwrap().unwrap(), ["web-sidecert-solver"]);
    }
}
