//! The Ingress reconciler: keeps the cluster in line with the annotated Ingresses of the
//! labelled namespaces, for what admission alone cannot guarantee (an Ingress admitted while
//! the webhook was down with `failurePolicy: Ignore`, Pods that ran before the annotation, a
//! deleted solver Service, an annotation taken off).
//!
//! For an annotated Ingress:
//! - the HTTP-01 path is on every TLS host's rule ([`crate::ingress::route_patch`]);
//! - the temporary Secrets exist where no Secret does (an existing Secret is never touched);
//! - the solver Services exist, are owned by the Ingress and carry their backend's selector;
//! - Pods behind its backends that lack the sidecar get their workload restarted once per
//!   Ingress generation (like `kubectl rollout restart`), with an Event on the Ingress; Pods
//!   without a restartable owner are named in an Event, never deleted.
//!
//! For an Ingress without the annotation: the HTTP-01 paths and sidecert's solver Services go;
//! Secrets stay.
//!
//! One replica reconciles: the holder of a Lease ([`run`]); every replica serves admission.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    future::Future,
    hash::{BuildHasher, Hasher},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{FutureExt, StreamExt};
use json_patch::{PatchOperation, TestOperation};
use jsonptr::PointerBuf;
use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet},
        core::v1::{Namespace, ObjectReference, Pod, Service},
        networking::v1::Ingress,
    },
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, Preconditions},
    runtime::{
        WatchStreamExt,
        controller::{Action, Controller},
        events::{Event, EventType, Recorder, Reporter},
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use kube_lease_manager::LeaseManagerBuilder;
use serde::de::DeserializeOwned;
use serde_json::json;
use sidecert_contract::{
    ACME_CHALLENGE_PATH, MANAGED_BY, MANAGED_BY_LABEL, NEVER_MUTATED_NAMESPACES, annotations,
};
use tokio::sync::{oneshot, watch};

use crate::{
    Error, Lookup, Result,
    effects::{Effect, Executor, is_managed},
    ingress::{
        effects, is_annotated, plan, references_service, route_patch, route_removal_patch, routed_solvers,
    },
    metrics::Metrics,
    pod::is_injected,
};

/// Template annotation on a restarted workload: the `<ingress uid>:<generation>` keys it was
/// restarted for (the last few), so each Ingress generation restarts it at most once.
pub const RESTARTED_FOR: &str = sidecert_contract::key!("restarted-for");
/// The annotation `kubectl rollout restart` sets; changing it rolls the Pods.
pub const RESTARTED_AT: &str = "kubectl.kubernetes.io/restartedAt";
/// How many keys [`RESTARTED_FOR`] keeps.
const RESTART_KEYS_KEPT: usize = 5;
/// The name in Events and in the field manager.
pub const CONTROLLER_NAME: &str = "sidecert-webhook";

/// How the reconciler behaves.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Restart workloads whose Pods lack the sidecar (else: only an Event).
    pub rollout_restart: bool,
    /// Label selector of the reconciled namespaces.
    pub namespace_selector: String,
    /// The release namespace (never reconciled).
    pub own_namespace: String,
    /// Requeue interval of an annotated Ingress.
    pub interval: Duration,
    /// This replica's name on the Lease and in Events.
    pub identity: String,
}

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

// ---- what should exist (pure) ------------------------------------------------------------

/// The key a restart is recorded under: the Ingress's uid and generation.
pub fn restart_key(ingress: &Ingress) -> String {
    format!(
        "{}:{}",
        ingress.metadata.uid.as_deref().unwrap_or_default(),
        ingress.metadata.generation.unwrap_or_default()
    )
}

/// The new [`RESTARTED_FOR`] value with `key` added; `None` when `key` is already there
/// (restarted once for this Ingress generation: never again).
pub fn restarted_for(existing: Option<&str>, key: &str) -> Option<String> {
    let mut keys: Vec<&str> = existing
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .collect();
    if keys.contains(&key) {
        return None;
    }
    keys.push(key);
    let skip = keys.len().saturating_sub(RESTART_KEYS_KEPT);
    Some(keys[skip..].join(","))
}

/// The merge patch `kubectl rollout restart` sends, plus [`RESTARTED_FOR`].
pub fn restart_patch(now: &str, restarted_for: &str) -> serde_json::Value {
    json!({"spec": {"template": {"metadata": {"annotations": {
        RESTARTED_AT: now,
        RESTARTED_FOR: restarted_for,
    }}}}})
}

/// A label selector as the API's `labelSelector` string.
pub fn selector_string(selector: &BTreeMap<String, String>) -> String {
    selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The Pods that back an Ingress (selected by one of `selectors`) but lack the sidecar: not
/// injected, not opted out, not terminating, not finished.
pub fn pods_without_sidecar<'p>(selectors: &[BTreeMap<String, String>], pods: &'p [Pod]) -> Vec<&'p Pod> {
    let empty = BTreeMap::new();
    pods.iter()
        .filter(|p| {
            let labels = p.metadata.labels.as_ref().unwrap_or(&empty);
            selectors
                .iter()
                .any(|s| !s.is_empty() && s.iter().all(|(k, v)| labels.get(k) == Some(v)))
        })
        .filter(|p| !is_injected(p))
        .filter(|p| {
            !p.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(annotations::INJECT))
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("false"))
        })
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
        })
        .collect()
}

/// The controller owner reference of an object.
pub fn controller_of(meta: &kube::api::ObjectMeta) -> Option<&OwnerReference> {
    meta.owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
}

/// A workload the reconciler can restart.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Workload {
    Deployment(String),
    StatefulSet(String),
    DaemonSet(String),
}

impl Workload {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Deployment(_) => "Deployment",
            Self::StatefulSet(_) => "StatefulSet",
            Self::DaemonSet(_) => "DaemonSet",
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Self::Deployment(n) | Self::StatefulSet(n) | Self::DaemonSet(n) => n,
        }
    }

    fn reference(&self, namespace: &str) -> ObjectReference {
        ObjectReference {
            api_version: Some("apps/v1".to_owned()),
            kind: Some(self.kind().to_owned()),
            name: Some(self.name().to_owned()),
            namespace: Some(namespace.to_owned()),
            ..Default::default()
        }
    }
}

/// The workload that owns a Pod: StatefulSet and DaemonSet directly, a Deployment through its
/// ReplicaSet (`rs_owner` answers with the ReplicaSet's controller). `Err` says why there is
/// none (a bare Pod, a Job, a ReplicaSet of its own).
pub fn workload_of(
    pod: &Pod,
    rs_owner: impl FnOnce(&str) -> Option<OwnerReference>,
) -> std::result::Result<Workload, String> {
    let Some(owner) = controller_of(&pod.metadata) else {
        return Err("no controller".to_owned());
    };
    match owner.kind.as_str() {
        "StatefulSet" => Ok(Workload::StatefulSet(owner.name.clone())),
        "DaemonSet" => Ok(Workload::DaemonSet(owner.name.clone())),
        "ReplicaSet" => match rs_owner(&owner.name) {
            Some(d) if d.kind == "Deployment" => Ok(Workload::Deployment(d.name)),
            _ => Err(format!("ReplicaSet {} without a Deployment", owner.name)),
        },
        kind => Err(format!("{kind} {}", owner.name)),
    }
}

/// What happens to a sidecert Service when its Ingress loses the annotation.
#[derive(Debug, Clone, PartialEq)]
pub enum Removal {
    Keep,
    Delete,
    /// Drop this Ingress from its owners; other Ingresses still own it.
    Disown(Vec<OwnerReference>),
}

/// Decides for one Service: sidecert's own (`managed-by` label) and owned by the Ingress →
/// deleted (or disowned when other Ingresses own it too); sidecert's own, ownerless and
/// routed from the Ingress → deleted; anything else → kept.
pub fn solver_removal(svc: &Service, ingress_uid: Option<&str>, routed: &[String]) -> Removal {
    if !is_managed(&svc.metadata) {
        return Removal::Keep;
    }
    let owners = svc.metadata.owner_references.clone().unwrap_or_default();
    let mine = |o: &OwnerReference| ingress_uid.is_some_and(|u| o.uid == u);
    if owners.iter().any(mine) {
        let others: Vec<_> = owners.into_iter().filter(|o| !mine(o)).collect();
        return if others.is_empty() {
            Removal::Delete
        } else {
            Removal::Disown(others)
        };
    }
    let name = svc.metadata.name.as_deref().unwrap_or_default();
    if owners.is_empty() && routed.iter().any(|r| r == name) {
        Removal::Delete
    } else {
        Removal::Keep
    }
}

/// The Ingresses to reconcile when a Service changes: those that route to it (as backend or
/// solver) and those that own it.
pub fn ingresses_for_service(ingresses: &[Arc<Ingress>], svc: &Service) -> Vec<ObjectRef<Ingress>> {
    let ns = svc.metadata.namespace.as_deref();
    let name = svc.metadata.name.as_deref().unwrap_or_default();
    let owners: Vec<&str> = svc
        .metadata
        .owner_references
        .iter()
        .flatten()
        .filter(|o| o.kind == "Ingress")
        .map(|o| o.uid.as_str())
        .collect();
    ingresses
        .iter()
        .filter(|i| i.metadata.namespace.as_deref() == ns)
        .filter(|i| {
            references_service(i, name) || i.metadata.uid.as_deref().is_some_and(|u| owners.contains(&u))
        })
        .map(|i| ObjectRef::from_obj(i.as_ref()))
        .collect()
}

/// A JSON patch guarded by the object's resourceVersion: a concurrent change makes it fail
/// (and the reconcile retry on the new version) instead of patching the wrong indices.
fn guarded(resource_version: Option<&str>, ops: Vec<PatchOperation>) -> json_patch::Patch {
    let mut all = Vec::with_capacity(ops.len() + 1);
    if let Some(rv) = resource_version {
        all.push(PatchOperation::Test(TestOperation {
            path: PointerBuf::from_tokens(["metadata", "resourceVersion"]),
            value: rv.into(),
        }));
    }
    all.extend(ops);
    json_patch::Patch(all)
}

fn pod_list(names: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut s = names.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    s
}

// ---- the reconciler ----------------------------------------------------------------------

/// What every reconcile shares.
pub struct Reconciler {
    client: Client,
    executor: Executor,
    namespaces: Store<Namespace>,
    recorder: Recorder,
    settings: Settings,
    metrics: Metrics,
    /// Consecutive failures per Ingress (`ns/name`), for the backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// The last warning Event per Ingress uid, so a standing problem is reported once.
    reported: Mutex<HashMap<String, String>>,
}

impl Reconciler {
    pub fn new(
        client: Client,
        lookup: Arc<dyn Lookup>,
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
            executor: Executor::new(client.clone(), lookup, Duration::from_secs(10)),
            client,
            namespaces,
            recorder,
            settings,
            metrics,
            failures: Mutex::default(),
            reported: Mutex::default(),
        }
    }

    fn namespace_enabled(&self, ns: &str) -> bool {
        ns != self.settings.own_namespace
            && !NEVER_MUTATED_NAMESPACES.contains(&ns)
            && self.namespaces.get(&ObjectRef::new(ns)).is_some()
    }

    fn action(&self, action: &str) {
        self.metrics.reconciler_actions.with_label_values(&[action]).inc();
    }

    async fn event(
        &self,
        ingress: &Ingress,
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
        if let Err(e) = self.recorder.publish(&ev, &ingress.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "cannot record an Event");
        }
    }

    /// A warning Event, unless the same one was the last for this Ingress.
    async fn warn_once(&self, ingress: &Ingress, reason: &str, note: String) {
        let uid = ingress.uid().unwrap_or_default();
        let fresh = {
            let mut reported = self.reported.lock().unwrap_or_else(|p| p.into_inner());
            reported.insert(uid, note.clone()).as_ref() != Some(&note)
        };
        if fresh {
            self.event(ingress, EventType::Warning, reason, "Check", note, None)
                .await;
        }
    }

    /// Brings an annotated Ingress's world in line.
    async fn ensure(&self, ingress: &Ingress, ns: &str) -> Result<()> {
        let name = ingress.name_any();
        let plan = plan(ingress);
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
                ingress,
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

        let mut first_error = None;
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
        self.roll(ingress, ns, &selectors, &restart_key(&generation_source))
            .await?;
        first_error.map_or(Ok(()), Err)
    }

    /// Restarts (once per Ingress generation) the workloads of Pods that lack the sidecar.
    async fn roll(
        &self,
        ingress: &Ingress,
        ns: &str,
        selectors: &[BTreeMap<String, String>],
        key: &str,
    ) -> Result<()> {
        let pods_api = Api::<Pod>::namespaced(self.client.clone(), ns);
        let mut lacking: BTreeMap<String, Pod> = BTreeMap::new();
        for selector in selectors {
            let lp = ListParams::default().labels(&selector_string(selector));
            let pods = pods_api.list(&lp).await?.items;
            for p in pods_without_sidecar(std::slice::from_ref(selector), &pods) {
                lacking.insert(p.name_any(), p.clone());
            }
        }
        if lacking.is_empty() {
            return Ok(());
        }
        let rs_api = Api::<ReplicaSet>::namespaced(self.client.clone(), ns);
        let mut rs_owners: HashMap<String, Option<OwnerReference>> = HashMap::new();
        let mut workloads: BTreeMap<Workload, Vec<String>> = BTreeMap::new();
        let mut stranded: Vec<String> = Vec::new();
        for (pod_name, pod) in &lacking {
            if let Some(rs) = controller_of(&pod.metadata).filter(|o| o.kind == "ReplicaSet")
                && !rs_owners.contains_key(&rs.name)
            {
                let meta = rs_api.get_metadata_opt(&rs.name).await?;
                let owner = meta.and_then(|m| controller_of(&m.metadata).cloned());
                rs_owners.insert(rs.name.clone(), owner);
            }
            match workload_of(pod, |rs| rs_owners.get(rs).cloned().flatten()) {
                Ok(w) => workloads.entry(w).or_default().push(pod_name.clone()),
                Err(why) => stranded.push(format!("{pod_name} ({why})")),
            }
        }

        let mut not_restarted = Vec::new();
        for (workload, pods) in &workloads {
            if !self.settings.rollout_restart {
                not_restarted.push(format!("{} {}", workload.kind(), workload.name()));
                continue;
            }
            if self.restart(ns, workload, key).await? {
                self.action("rollout_restart");
                tracing::info!(namespace = ns, ingress = %ingress.name_any(), workload = workload.name(), "rollout restart");
                self.event(
                    ingress,
                    EventType::Normal,
                    "RolloutRestart",
                    "Restart",
                    format!(
                        "restarted {} {}: its Pods {} back this Ingress but have no sidecert sidecar \
                         (created before the Ingress was annotated, or while the webhook was unavailable)",
                        workload.kind(),
                        workload.name(),
                        pod_list(pods)
                    ),
                    Some(workload.reference(ns)),
                )
                .await;
            }
        }
        let mut notes = Vec::new();
        if !not_restarted.is_empty() {
            notes.push(format!(
                "{} have Pods without the sidecert sidecar behind this Ingress; restart them \
                 (kubectl rollout restart): automatic restarts are off",
                not_restarted.join(", ")
            ));
        }
        if !stranded.is_empty() {
            notes.push(format!(
                "Pods {} back this Ingress without the sidecert sidecar and have no workload sidecert \
                 can restart; recreate them (sidecert never deletes Pods)",
                pod_list(&stranded)
            ));
        }
        if !notes.is_empty() {
            self.warn_once(ingress, "PodsWithoutSidecar", notes.join("; "))
                .await;
        }
        Ok(())
    }

    async fn restart(&self, ns: &str, workload: &Workload, key: &str) -> Result<bool> {
        let c = self.client.clone();
        match workload {
            Workload::Deployment(n) => {
                restart_workload(
                    &Api::<Deployment>::namespaced(c, ns),
                    n,
                    key,
                    |d| d.spec.as_ref()?.template.metadata.as_ref()?.annotations.as_ref(),
                    |d| {
                        let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                        d.status.as_ref().is_some_and(|s| {
                            s.observed_generation < d.metadata.generation
                                || s.updated_replicas.unwrap_or(0) < want
                                || s.replicas.unwrap_or(0) > want
                        })
                    },
                )
                .await
            }
            Workload::StatefulSet(n) => {
                restart_workload(
                    &Api::<StatefulSet>::namespaced(c, ns),
                    n,
                    key,
                    |d| d.spec.as_ref()?.template.metadata.as_ref()?.annotations.as_ref(),
                    |d| {
                        d.status.as_ref().is_some_and(|s| {
                            s.update_revision.is_some() && s.update_revision != s.current_revision
                        })
                    },
                )
                .await
            }
            Workload::DaemonSet(n) => {
                restart_workload(
                    &Api::<DaemonSet>::namespaced(c, ns),
                    n,
                    key,
                    |d| d.spec.as_ref()?.template.metadata.as_ref()?.annotations.as_ref(),
                    |d| {
                        d.status.as_ref().is_some_and(|s| {
                            s.updated_number_scheduled.unwrap_or(0) < s.desired_number_scheduled
                        })
                    },
                )
                .await
            }
        }
    }

    /// Takes sidecert's additions off an Ingress that lost the annotation. Secrets stay.
    async fn remove(&self, ingress: &Ingress, ns: &str) -> Result<()> {
        let name = ingress.name_any();
        let routed = routed_solvers(ingress);
        let patch = route_removal_patch(ingress);
        if !patch.is_empty() {
            Api::<Ingress>::namespaced(self.client.clone(), ns)
                .patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Json::<()>(guarded(ingress.resource_version().as_deref(), patch)),
                )
                .await?;
            self.action("route_removed");
            tracing::info!(namespace = ns, ingress = %name, "removed the HTTP-01 path");
            self.event(
                ingress,
                EventType::Normal,
                "ChallengeRouteRemoved",
                "Reconcile",
                format!(
                    "removed the HTTP-01 path {ACME_CHALLENGE_PATH}: the Ingress is no longer annotated {}; \
                     its Secrets are left alone",
                    annotations::ISSUE_TEMPORARY_CERTIFICATE
                ),
                None,
            )
            .await;
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
            Removal::Delete => {
                let dp = DeleteParams {
                    preconditions: Some(Preconditions {
                        uid: svc.uid(),
                        resource_version: svc.resource_version(),
                    }),
                    ..DeleteParams::default()
                };
                match api.delete(&name, &dp).await {
                    Ok(_) => deleted.push(name),
                    Err(kube::Error::Api(s)) if s.is_not_found() => {}
                    Err(e) => return Err(e.into()),
                }
            }
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

/// Restarts one workload unless [`RESTARTED_FOR`] already holds `key`, or a restart of ours
/// is still rolling out (`rolling`: its new Pods replace the old ones anyway); `true` when it
/// did.
pub async fn restart_workload<K>(
    api: &Api<K>,
    name: &str,
    key: &str,
    template_annotations: impl Fn(&K) -> Option<&BTreeMap<String, String>>,
    rolling: impl Fn(&K) -> bool,
) -> Result<bool>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let obj = api.get(name).await?;
    let existing = template_annotations(&obj).and_then(|a| a.get(RESTARTED_FOR));
    if existing.is_some() && rolling(&obj) {
        return Ok(false);
    }
    let Some(value) = restarted_for(existing.map(String::as_str), key) else {
        return Ok(false);
    };
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .map_err(|e| Error::Config(format!("time: {e}")))?;
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(&restart_patch(&now, &value)),
    )
    .await?;
    Ok(true)
}

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

/// 2 s, 4 s, 8 s ... up to 5 minutes, per Ingress.
pub fn backoff(failures: u32) -> Duration {
    Duration::from_secs(2u64.saturating_pow(failures.clamp(1, 9))).min(Duration::from_secs(300))
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
    let wait = backoff(n);
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

/// A reflector store of the labelled namespaces, kept current until the task is aborted.
fn namespace_store(client: Client, selector: &str) -> (Store<Namespace>, tokio::task::JoinHandle<()>) {
    let (reader, writer) = reflector::store();
    let watch = reflector::reflector(
        writer,
        watcher(
            Api::<Namespace>::all(client),
            watcher::Config::default().labels(selector),
        ),
    )
    .default_backoff()
    .for_each(|e| async move {
        if let Err(e) = e {
            tracing::warn!(error = %e, "Namespace watch");
        }
    });
    (reader, tokio::spawn(watch))
}

/// Elects a leader on the Lease and runs the reconciler while this replica leads, until
/// `shutdown` turns true; then stops reconciling and gives the Lease up.
pub async fn run(
    client: Client,
    lookup: Arc<dyn Lookup>,
    settings: Settings,
    leader: LeaderSettings,
    metrics: Metrics,
    mut shutdown: watch::Receiver<bool>,
) {
    let secs = leader.duration.as_secs().clamp(2, 300);
    let mut wait = Duration::from_secs(1);
    'elect: loop {
        let built = LeaseManagerBuilder::new(client.clone(), &leader.lease_name)
            .with_namespace(&leader.namespace)
            .with_identity(&settings.identity)
            .with_duration(secs)
            .with_grace((secs / 3).max(1))
            .with_field_manager(format!("{CONTROLLER_NAME}-{}", settings.identity))
            .build()
            .await;
        let manager = match built {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, lease = leader.lease_name, retry_in = ?wait, "cannot join the leader election");
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = shutdown.wait_for(|s| *s) => return,
                }
                wait = (wait * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        wait = Duration::from_secs(1);
        let (mut is_leader, task) = manager.watch().await;
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
                namespaces,
                settings.clone(),
                metrics.clone(),
            ));
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            let controller = run_controller(ctx, stop_rx.map(drop));
            tokio::pin!(controller);
            let outcome = if ready {
                tokio::select! {
                    biased;
                    _ = shutdown.wait_for(|s| *s) => Some(true),
                    r = is_leader.wait_for(|l| !*l) => Some(r.is_err()),
                    () = &mut controller => None,
                }
            } else {
                Some(true)
            };
            let _ = stop_tx.send(());
            if outcome.is_some()
                && tokio::time::timeout(Duration::from_secs(5), &mut controller)
                    .await
                    .is_err()
            {
                tracing::warn!("reconciles still running after 5 s; leaving them");
            }
            ns_watch.abort();
            metrics.leader.set(0);
            match outcome {
                Some(true) => break *shutdown.borrow(),
                Some(false) => tracing::info!("lost the lead: reconciler stopped"),
                None => tracing::warn!("the reconciler ended; restarting it"),
            }
        };
        // Dropping the receiver makes the lease task release the Lease and end.
        drop(is_leader);
        match tokio::time::timeout(Duration::from_secs(3), task).await {
            Ok(Ok(Ok(_))) => tracing::info!(lease = leader.lease_name, "Lease released"),
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "releasing the Lease"),
            Ok(Err(e)) => tracing::warn!(error = %e, "Lease task"),
            Err(_) => tracing::warn!("releasing the Lease timed out"),
        }
        if stopping || *shutdown.borrow() {
            break 'elect;
        }
        tracing::warn!(retry_in = ?wait, "leader election ended; joining again");
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use http::{Method, Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::Value;
    use tower_test::mock;

    use super::*;
    use crate::ingress::route_patch;

    fn ingress(annotated: bool, with_route: bool) -> Ingress {
        let mut paths = vec![json!({"path": "/", "pathType": "Prefix",
            "backend": {"service": {"name": "web", "port": {"number": 80}}}})];
        if with_route {
            paths.insert(
                0,
                json!({"path": "/.well-known/acme-challenge/", "pathType": "ImplementationSpecific",
                "backend": {"service": {"name": "web-sidecert-solver", "port": {"name": "http"}}}}),
            );
        }
        let annotations = if annotated {
            json!({"sidecert.io/issue-temporary-certificate": "true"})
        } else {
            json!({})
        };
        serde_json::from_value(json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": {"name": "web", "namespace": "shop", "uid": "u-1", "generation": 3,
                         "resourceVersion": "7", "annotations": annotations},
            "spec": {"tls": [{"hosts": ["web.shop.example"], "secretName": "web-tls"}],
                     "rules": [{"host": "web.shop.example", "http": {"paths": paths}}]}
        }))
        .unwrap()
    }

    fn pod(name: &str, labels: Value, annotations: Value, owner: Option<(&str, &str)>) -> Pod {
        let owners = owner.map_or(json!([]), |(kind, n)| {
            json!([{"apiVersion": "apps/v1", "kind": kind, "name": n, "uid": "o", "controller": true}])
        });
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": labels, "annotations": annotations, "ownerReferences": owners},
            "spec": {"containers": [{"name": "app", "image": "example/app"}]}
        }))
        .unwrap()
    }

    fn solver(owners: Value, managed: bool) -> Service {
        let labels = if managed {
            json!({"app.kubernetes.io/managed-by": "sidecert"})
        } else {
            json!({})
        };
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web-sidecert-solver", "namespace": "shop", "uid": "s-1",
                         "resourceVersion": "9", "labels": labels, "ownerReferences": owners},
            "spec": {"selector": {"app": "web"}, "publishNotReadyAddresses": true}
        }))
        .unwrap()
    }

    fn owner(uid: &str) -> Value {
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "name": "x", "uid": uid})
    }

    #[test]
    fn an_annotated_ingress_without_route_needs_one_secret_and_one_solver() {
        let ing = ingress(true, false);
        let p = plan(&ing);
        assert_eq!(route_patch(&p).len(), 1);
        let effects = effects(&ing, "shop", &p);
        assert_eq!(effects.len(), 2);
        assert!(matches!(&effects[0], Effect::TemporarySecret { name, .. } if name == "web-tls"));
        assert!(
            matches!(&effects[1], Effect::SolverService { name, owner: Some(o), .. } if name == "web-sidecert-solver" && o.uid == "u-1")
        );
        // Once routed, nothing to patch.
        assert!(route_patch(&plan(&ingress(true, true))).is_empty());
    }

    #[test]
    fn removal_patch_takes_only_the_challenge_path_out() {
        let ing = ingress(false, true);
        let ops = route_removal_patch(&ing);
        let mut doc = serde_json::to_value(&ing).unwrap();
        json_patch::patch(&mut doc, &ops).unwrap();
        let paths = &doc["spec"]["rules"][0]["http"]["paths"];
        assert_eq!(paths.as_array().unwrap().len(), 1);
        assert_eq!(paths[0]["path"], "/");
        assert_eq!(routed_solvers(&ing), ["web-sidecert-solver"]);
        assert!(route_removal_patch(&ingress(false, false)).is_empty());
        // The guard: a path that changed meanwhile makes the patch fail, not remove the wrong one.
        let mut other = serde_json::to_value(ingress(false, false)).unwrap();
        assert!(json_patch::patch(&mut other, &ops).is_err());
    }

    #[test]
    fn pods_that_lack_the_sidecar() {
        let sel = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
        let mut terminating = pod("gone", json!({"app": "web"}), json!({}), None);
        terminating.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
        let pods = vec![
            pod("plain", json!({"app": "web"}), json!({}), None),
            pod(
                "done",
                json!({"app": "web"}),
                json!({"sidecert.io/status": "injected"}),
                None,
            ),
            pod(
                "out",
                json!({"app": "web"}),
                json!({"sidecert.io/inject": "false"}),
                None,
            ),
            pod("other", json!({"app": "db"}), json!({}), None),
            terminating,
        ];
        let names: Vec<_> = pods_without_sidecar(&[sel], &pods)
            .into_iter()
            .map(|p| p.name_any())
            .collect();
        assert_eq!(names, ["plain"]);
        assert!(pods_without_sidecar(&[BTreeMap::new()], &pods).is_empty());
    }

    #[test]
    fn owners_of_pods() {
        let p = pod("a", json!({}), json!({}), Some(("ReplicaSet", "web-5d")));
        let dep = OwnerReference {
            kind: "Deployment".into(),
            name: "web".into(),
            controller: Some(true),
            ..Default::default()
        };
        assert_eq!(
            workload_of(&p, |rs| (rs == "web-5d").then(|| dep.clone())),
            Ok(Workload::Deployment("web".into()))
        );
        assert!(
            workload_of(&p, |_| None)
                .unwrap_err()
                .contains("without a Deployment")
        );
        let p = pod("a", json!({}), json!({}), Some(("StatefulSet", "db")));
        assert_eq!(workload_of(&p, |_| None), Ok(Workload::StatefulSet("db".into())));
        let p = pod("a", json!({}), json!({}), Some(("Job", "once")));
        assert_eq!(workload_of(&p, |_| None), Err("Job once".into()));
        let p = pod("a", json!({}), json!({}), None);
        assert_eq!(workload_of(&p, |_| None), Err("no controller".into()));
    }

    #[test]
    fn restart_once_per_generation() {
        assert_eq!(restart_key(&ingress(true, true)), "u-1:3");
        assert_eq!(restarted_for(None, "u-1:3").as_deref(), Some("u-1:3"));
        assert_eq!(restarted_for(Some("u-1:3"), "u-1:3"), None);
        assert_eq!(
            restarted_for(Some("u-0:1"), "u-1:3").as_deref(),
            Some("u-0:1,u-1:3")
        );
        let many = "a,b,c,d,e";
        assert_eq!(restarted_for(Some(many), "f").as_deref(), Some("b,c,d,e,f"));
    }

    #[test]
    fn solver_removal_decisions() {
        let routed = vec!["web-sidecert-solver".to_owned()];
        assert_eq!(
            solver_removal(&solver(json!([owner("u-1")]), true), Some("u-1"), &[]),
            Removal::Delete
        );
        assert!(matches!(
            solver_removal(&solver(json!([owner("u-1"), owner("u-2")]), true), Some("u-1"), &[]),
            Removal::Disown(o) if o.len() == 1 && o[0].uid == "u-2"
        ));
        assert_eq!(
            solver_removal(&solver(json!([]), true), Some("u-1"), &routed),
            Removal::Delete
        );
        assert_eq!(
            solver_removal(&solver(json!([]), true), Some("u-1"), &[]),
            Removal::Keep
        );
        assert_eq!(
            solver_removal(&solver(json!([owner("u-2")]), true), Some("u-1"), &routed),
            Removal::Keep
        );
        // Not sidecert's: never touched.
        assert_eq!(
            solver_removal(&solver(json!([owner("u-1")]), false), Some("u-1"), &routed),
            Removal::Keep
        );
    }

    #[test]
    fn service_events_map_to_their_ingresses() {
        let ings = vec![Arc::new(ingress(true, false))];
        let mut backend = solver(json!([]), false);
        backend.metadata.name = Some("web".into());
        assert_eq!(ingresses_for_service(&ings, &backend).len(), 1);
        // The solver, by name (not routed yet) and by owner.
        assert_eq!(ingresses_for_service(&ings, &solver(json!([]), true)).len(), 1);
        let mut unrelated = solver(json!([owner("u-1")]), true);
        unrelated.metadata.name = Some("other-sidecert-solver".into());
        assert_eq!(ingresses_for_service(&ings, &unrelated).len(), 1);
        unrelated.metadata.owner_references = None;
        assert!(ingresses_for_service(&ings, &unrelated).is_empty());
        unrelated.metadata.name = Some("web".into());
        unrelated.metadata.namespace = Some("elsewhere".into());
        assert!(ingresses_for_service(&ings, &unrelated).is_empty());
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(1), Duration::from_secs(2));
        assert_eq!(backoff(3), Duration::from_secs(8));
        assert_eq!(backoff(40), Duration::from_secs(300));
    }

    // ---- API calls against a mocked API server ----

    type Handle = mock::Handle<Request<Body>, Response<Body>>;

    fn client() -> (Client, Handle) {
        let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
        (Client::new(svc, "default"), handle)
    }

    async fn next(
        handle: &mut Handle,
        method: Method,
        path: &str,
        status: StatusCode,
        reply: Value,
    ) -> Value {
        let (req, send) = handle.next_request().await.expect("a request");
        assert_eq!(req.method(), method, "{}", req.uri());
        assert_eq!(req.uri().path(), path);
        let query = req.uri().query().unwrap_or_default().to_owned();
        let body = req.into_body().collect_bytes().await.unwrap();
        send.send_response(
            Response::builder()
                .status(status)
                .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                .unwrap(),
        );
        if body.is_empty() {
            json!({ "query": query })
        } else {
            serde_json::from_slice(&body).unwrap()
        }
    }

    fn deployment(annotations: Value) -> Value {
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": {"name": "web", "namespace": "shop"},
               "spec": {"selector": {"matchLabels": {"app": "web"}},
                        "template": {"metadata": {"labels": {"app": "web"}, "annotations": annotations},
                                     "spec": {"containers": [{"name": "app", "image": "example/app"}]}}}})
    }

    fn template_annotations(d: &Deployment) -> Option<&BTreeMap<String, String>> {
        d.spec.as_ref()?.template.metadata.as_ref()?.annotations.as_ref()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn restart_patches_the_template_like_kubectl_once() {
        let (client, mut handle) = client();
        let api = Api::<Deployment>::namespaced(client, "shop");
        let a = api.clone();
        let task = tokio::spawn(async move {
            restart_workload(&a, "web", "u-1:3", template_annotations, |_| false).await
        });
        let path = "/apis/apps/v1/namespaces/shop/deployments/web";
        next(
            &mut handle,
            Method::GET,
            path,
            StatusCode::OK,
            deployment(json!({})),
        )
        .await;
        let body = next(
            &mut handle,
            Method::PATCH,
            path,
            StatusCode::OK,
            deployment(json!({})),
        )
        .await;
        let ann = &body["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(ann[RESTARTED_FOR], "u-1:3");
        let at = ann[RESTARTED_AT].as_str().unwrap();
        assert!(time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).is_ok());
        assert!(task.await.unwrap().unwrap());

        // Already restarted and that rollout still runs: a GET and nothing else.
        let task = tokio::spawn(async move {
            restart_workload(&api, "web", "u-2:1", template_annotations, |_| true).await
        });
        next(
            &mut handle,
            Method::GET,
            path,
            StatusCode::OK,
            deployment(json!({RESTARTED_FOR: "u-0:1,u-1:3"})),
        )
        .await;
        assert!(!task.await.unwrap().unwrap());
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

    #[test]
    fn solver_drift_is_repaired() {
        let svc = solver(json!([]), true);
        let sel = BTreeMap::from([("app".to_owned(), "web2".to_owned())]);
        let o = OwnerReference {
            uid: "u-1".into(),
            ..Default::default()
        };
        let patch = crate::effects::solver_repair(&svc, &sel, Some(&o)).unwrap();
        assert_eq!(patch["spec"]["selector"], json!({"app": "web2"}));
        assert_eq!(patch["metadata"]["ownerReferences"][0]["uid"], "u-1");
        assert_eq!(patch["metadata"]["resourceVersion"], "9");
        let same = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
        assert!(crate::effects::solver_repair(&svc, &same, None).is_none());
        let mut extra = solver(json!([]), true);
        extra
            .spec
            .as_mut()
            .unwrap()
            .selector
            .as_mut()
            .unwrap()
            .insert("x".into(), "y".into());
        let patch = crate::effects::solver_repair(&extra, &same, None).unwrap();
        assert_eq!(patch["spec"]["selector"], json!({"app": "web", "x": null}));
        assert!(crate::effects::solver_repair(&solver(json!([]), false), &sel, Some(&o)).is_none());
        assert!(patch["spec"].get("publishNotReadyAddresses").is_none());

        // A solver made before publishNotReadyAddresses was set gets it, and nothing else.
        let mut old = solver(json!([]), true);
        old.spec.as_mut().unwrap().publish_not_ready_addresses = None;
        let patch = crate::effects::solver_repair(&old, &same, None).unwrap();
        assert_eq!(patch["spec"], json!({"publishNotReadyAddresses": true}));
        assert_eq!(patch["metadata"]["resourceVersion"], "9");
    }

    #[test]
    fn a_stale_cache_keeps_answering_while_the_watch_relists() {
        // The admission caches are reflector stores: a watch error restarts the list, and the
        // store keeps the last complete state until the new list is complete.
        let (reader, mut writer) = reflector::store::<Ingress>();
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitApply(ingress(true, true)));
        writer.apply_watcher_event(&watcher::Event::InitDone);
        assert_eq!(reader.state().len(), 1);
        writer.apply_watcher_event(&watcher::Event::Init);
        assert_eq!(reader.state().len(), 1, "a relist in progress keeps serving");
    }
}
