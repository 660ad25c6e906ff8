//! What should exist, decided without any API call: restart keys and patches, which Pods lack
//! the sidecar and which workload owns them, what happens to a solver Service when its
//! Ingress loses the annotation, which Ingresses a Service event concerns, guarded patches.

use std::{collections::BTreeMap, sync::Arc};

use json_patch::{PatchOperation, TestOperation};
use jsonptr::PointerBuf;
use k8s_openapi::{
    api::{
        core::v1::{ObjectReference, Pod, Service},
        networking::v1::Ingress,
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::runtime::reflector::ObjectRef;
use serde_json::json;
use sidecert_contract::annotations::{self, RESTARTED_FOR};

use crate::mutate::{ingress::references_service, objects::is_managed, pod::is_injected};

/// The annotation `kubectl rollout restart` sets; changing it rolls the Pods.
pub const RESTARTED_AT: &str = "kubectl.kubernetes.io/restartedAt";
/// How many keys [`RESTARTED_FOR`] keeps.
const RESTART_KEYS_KEPT: usize = 5;

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
    Some(keys.get(skip..).unwrap_or_default().join(","))
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
pub fn controller_of(meta: &ObjectMeta) -> Option<&OwnerReference> {
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

    pub(crate) fn reference(&self, namespace: &str) -> ObjectReference {
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
    // Only a solver Service (the policy refuses deleting any other Service of sidecert's
    // label: a tenant could have labelled one and made it owned by the Ingress).
    let solver = svc
        .metadata
        .name
        .as_deref()
        .is_some_and(|n| n.ends_with(sidecert_contract::SOLVER_SERVICE_SUFFIX));
    if !is_managed(&svc.metadata) || !solver {
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
pub(crate) fn guarded(resource_version: Option<&str>, ops: Vec<PatchOperation>) -> json_patch::Patch {
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

pub(crate) fn pod_list(names: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut s = names.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    s
}
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{
        mutate::{
            effect::Effect,
            ingress::{effects, plan, route_patch, route_removal_patch, routed_solvers},
        },
        testing::{ingress, owner, pod, solver},
    };
    use kube::ResourceExt;

    #[test]
    fn an_annotated_ingress_without_route_needs_one_secret_and_one_solver() {
        let ing = ingress(true, false);
        let p = plan(&ing, None);
        assert_eq!(route_patch(&p).len(), 1);
        let effects = effects(&ing, "shop", &p);
        assert_eq!(effects.len(), 2);
        assert!(matches!(&effects[0], Effect::TemporarySecret { name, .. } if name == "web-tls"));
        assert!(
            matches!(&effects[1], Effect::SolverService { name, owner: Some(o), .. } if name == "web-sidecert-solver" && o.uid == "u-1")
        );
        // Once routed, nothing to patch.
        assert!(route_patch(&plan(&ingress(true, true), None)).is_empty());
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
        // A rule whose only path is the challenge path loses its `http` (an empty `paths` is
        // refused by the API server), and keeps its host.
        let mut only = serde_json::to_value(ingress(false, true)).unwrap();
        only["spec"]["rules"][0]["http"]["paths"]
            .as_array_mut()
            .unwrap()
            .retain(|p| p["path"] != "/");
        let only: Ingress = serde_json::from_value(only).unwrap();
        let ops = route_removal_patch(&only);
        let mut doc = serde_json::to_value(&only).unwrap();
        json_patch::patch(&mut doc, &ops).unwrap();
        assert!(doc["spec"]["rules"][0].get("http").is_none(), "{doc}");
        assert!(doc["spec"]["rules"][0]["host"].is_string(), "{doc}");
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
        // A Service of sidecert's label and owned by the Ingress, not named as a solver (a
        // tenant's): kept.
        let mut lookalike = solver(json!([owner("u-1")]), true);
        lookalike.metadata.name = Some("web".to_owned());
        assert_eq!(
            solver_removal(&lookalike, Some("u-1"), &["web".to_owned()]),
            Removal::Keep
        );
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
}
