//! Pruning the sidecars' Roles. Admission adds the names a Pod's sidecar needs (its
//! certificates' Secrets and Leases, the namespace's ACME account Secret) to the Role of the
//! Pod's ServiceAccount and never takes one out: a certificate dropped from a workload, or a
//! workload gone, would leave its ServiceAccount a right on that Secret for ever.
//!
//! The leader looks, every [`PRUNE_INTERVAL`], at each served namespace's sidecert Roles:
//! - a certificate Secret or Lease that no injected Pod of the Role's ServiceAccount names
//!   (its `sidecert.io/certificates` annotation) leaves the Role;
//! - a Role whose ServiceAccount has no injected Pod left goes, with its RoleBinding.
//!
//! Names are only ever taken out, never added, so what a Pod's author writes in its
//! annotations can keep a name sidecert granted but never gain one. The account Secret and the
//! read-only EAB Secret stay while the ServiceAccount has a Pod. A Role written in the last
//! [`PRUNE_GRACE`] is left alone: the Pod whose admission wrote it may not be stored yet.
//! Every write is conditional on the Role (or binding) being as it was read.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use k8s_openapi::{
    api::{
        core::v1::Pod,
        rbac::v1::{PolicyRule, Role, RoleBinding},
    },
    jiff::Timestamp,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, PostParams, Preconditions},
};
use sidecert_contract::{
    ACCOUNT_SECRET_PREFIX, MANAGED_BY, MANAGED_BY_LABEL, STATUS_INJECTED, annotations, decode_certificates,
    lease_name,
};

use crate::{error::Result, mutate::objects::is_managed};

/// How often the leader prunes the sidecars' Roles.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(300);

/// How long after its last write a Role is left as it is.
pub const PRUNE_GRACE: Duration = Duration::from_secs(300);

/// The names the injected Pods of one ServiceAccount ask for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Wanted {
    /// Their certificates' Secrets.
    pub secrets: BTreeSet<String>,
    /// Their certificates' Leases.
    pub leases: BTreeSet<String>,
}

/// What one namespace's pruning changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Roles that lost names.
    pub narrowed: Vec<String>,
    /// Roles (with their RoleBindings) whose ServiceAccount has no injected Pod left.
    pub deleted: Vec<String>,
}

/// Per ServiceAccount, what its injected Pods ask for. A Pod that has finished (Succeeded or
/// Failed) asks for nothing; one being deleted still does.
pub fn wanted_by(pods: &[Pod]) -> BTreeMap<String, Wanted> {
    let mut wanted: BTreeMap<String, Wanted> = BTreeMap::new();
    for pod in pods {
        let annotations = pod.annotations();
        if annotations.get(annotations::STATUS).map(String::as_str) != Some(STATUS_INJECTED) {
            continue;
        }
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            continue;
        }
        let spec = pod.spec.as_ref();
        let service_account = spec
            .and_then(|s| s.service_account_name.as_deref().or(s.service_account.as_deref()))
            .filter(|s| !s.is_empty())
            .unwrap_or("default");
        let entry = wanted.entry(service_account.to_owned()).or_default();
        // An annotation that does not decode names nothing; the Pod still counts, so its
        // ServiceAccount's Role stays.
        let certificates = annotations
            .get(annotations::CERTIFICATES)
            .and_then(|v| decode_certificates(v).ok())
            .unwrap_or_default();
        for cert in certificates {
            entry.leases.insert(lease_name(&cert.secret_name));
            entry.secrets.insert(cert.secret_name);
        }
    }
    wanted
}

/// `role` keeping only the names `wanted` asks for: certificate Secrets (the rule that may
/// update them) and Leases no Pod names go; account Secrets, the read-only rule (EAB) and
/// unnamed rules stay. A named rule left with no name goes (an empty list is every name to
/// RBAC). `None` when nothing changes.
pub fn narrowed(role: &Role, wanted: &Wanted) -> Option<Role> {
    let mut out = role.clone();
    let rules = out.rules.get_or_insert_with(Vec::new);
    let before = rules.clone();
    for rule in rules.iter_mut() {
        let keep: Box<dyn Fn(&String) -> bool> =
            if is_rule(rule, "secrets") && rule.verbs.iter().any(|v| v == "update") {
                Box::new(|n: &String| n.starts_with(ACCOUNT_SECRET_PREFIX) || wanted.secrets.contains(n))
            } else if is_rule(rule, "leases") {
                Box::new(|n: &String| wanted.leases.contains(n))
            } else {
                continue;
            };
        if let Some(names) = rule.resource_names.as_mut() {
            names.retain(|n| keep(n));
        }
    }
    rules.retain(|r| r.resource_names.as_ref().is_none_or(|n| !n.is_empty()));
    (*rules != before).then_some(out)
}

fn is_rule(rule: &PolicyRule, resource: &str) -> bool {
    rule.resources.as_deref() == Some(&[resource.to_owned()][..])
}

/// When sidecert (or anyone) last wrote `meta`'s object: the latest managedFields entry, else
/// its creation.
fn last_written(role: &Role) -> Option<Timestamp> {
    role.metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|f| f.time.as_ref().map(|t| t.0))
        .max()
        .or(role.metadata.creation_timestamp.as_ref().map(|t| t.0))
}

/// Prunes the sidecert Roles of `ns` (labelled as its own, named `sidecert-*`, bound by a
/// RoleBinding of the same name that is its own too) against its Pods. A Role written less
/// than `grace` before `now` is skipped.
pub async fn prune_namespace(client: &Client, ns: &str, grace: Duration, now: Timestamp) -> Result<Pruned> {
    let managed = ListParams::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
    let roles_api = Api::<Role>::namespaced(client.clone(), ns);
    let roles: Vec<Role> = roles_api
        .list(&managed)
        .await?
        .items
        .into_iter()
        .filter(|r| r.name_any().starts_with("sidecert-"))
        .collect();
    let mut pruned = Pruned::default();
    if roles.is_empty() {
        return Ok(pruned);
    }
    let bindings_api = Api::<RoleBinding>::namespaced(client.clone(), ns);
    let bindings: BTreeMap<String, RoleBinding> = bindings_api
        .list(&managed)
        .await?
        .items
        .into_iter()
        .map(|b| (b.name_any(), b))
        .collect();
    let pods = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?
        .items;
    let wanted = wanted_by(&pods);
    let grace = i64::try_from(grace.as_secs()).unwrap_or(i64::MAX);
    for role in roles {
        let name = role.name_any();
        let recent =
            last_written(&role).is_none_or(|t| now.as_second().saturating_sub(t.as_second()) < grace);
        if recent || !is_managed(&role.metadata) {
            continue;
        }
        // The ServiceAccount is the binding's subject (a long name's Role name is cut).
        let Some(binding) = bindings.get(&name).filter(|b| is_managed(&b.metadata)) else {
            continue;
        };
        let accounts: Vec<&str> = binding
            .subjects
            .iter()
            .flatten()
            .filter(|s| s.kind == "ServiceAccount" && s.namespace.as_deref().is_none_or(|n| n == ns))
            .map(|s| s.name.as_str())
            .collect();
        let [service_account] = accounts[..] else {
            continue;
        };
        match wanted.get(service_account) {
            None => {
                delete_unchanged(&bindings_api, binding).await?;
                delete_unchanged(&roles_api, &role).await?;
                pruned.deleted.push(name);
            }
            Some(w) => {
                if let Some(narrow) = narrowed(&role, w) {
                    // The resourceVersion read makes this conditional.
                    match roles_api.replace(&name, &PostParams::default(), &narrow).await {
                        Ok(_) => pruned.narrowed.push(name),
                        Err(kube::Error::Api(s)) if s.is_conflict() || s.is_not_found() => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
    }
    Ok(pruned)
}

/// Deletes `object` if it is unchanged since read (gone or changed: left for the next pass).
async fn delete_unchanged<K>(api: &Api<K>, object: &K) -> Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid: object.meta().uid.clone(),
            resource_version: object.meta().resource_version.clone(),
        }),
        ..DeleteParams::default()
    };
    match api.delete(&object.name_any(), &dp).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_not_found() || s.is_conflict() => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::mutate::objects::role;
    use serde_json::json;

    fn pod(sa: Option<&str>, certs: &[&str], phase: &str) -> Pod {
        let list: Vec<_> = certs
            .iter()
            .map(|c| json!({"secretName": c, "domains": [format!("{c}.example.com")]}))
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": "p", "annotations": {
                annotations::STATUS: STATUS_INJECTED,
                annotations::CERTIFICATES: serde_json::to_string(&list).unwrap()}},
            "spec": {"serviceAccountName": sa, "containers": []},
            "status": {"phase": phase}
        }))
        .unwrap()
    }

    fn names(role: &Role, resource: &str, verb: &str) -> Vec<String> {
        role.rules
            .iter()
            .flatten()
            .filter(|r| is_rule(r, resource) && r.verbs.iter().any(|v| v == verb))
            .flat_map(|r| r.resource_names.clone().unwrap_or_default())
            .collect()
    }

    #[test]
    fn what_running_injected_pods_ask_for_per_service_account() {
        let mut not_injected = pod(Some("web"), &["other-tls"], "Running");
        not_injected.metadata.annotations = None;
        let wanted = wanted_by(&[
            pod(Some("web"), &["a-tls"], "Running"),
            pod(Some("web"), &["b-tls"], "Pending"),
            pod(None, &["d-tls"], "Running"),
            pod(Some("job"), &["done-tls"], "Succeeded"),
            not_injected,
        ]);
        assert_eq!(wanted.keys().collect::<Vec<_>>(), ["default", "web"]);
        assert_eq!(
            wanted["web"].secrets.iter().collect::<Vec<_>>(),
            ["a-tls", "b-tls"]
        );
        assert_eq!(
            wanted["web"].leases.iter().collect::<Vec<_>>(),
            ["sidecert-a-tls", "sidecert-b-tls"]
        );
    }

    #[test]
    fn a_name_no_pod_asks_for_leaves_the_role_and_nothing_is_added() {
        let account = format!("{ACCOUNT_SECRET_PREFIX}0123456789ab");
        let secrets = ["a-tls".to_owned(), "gone-tls".to_owned(), account.clone()];
        let leases = [lease_name("a-tls"), lease_name("gone-tls")];
        let r = role("ns", "web", &secrets, &["eab".to_owned()], &leases);
        let wanted = Wanted {
            secrets: ["a-tls", "new-tls"].map(str::to_owned).into(),
            leases: [lease_name("a-tls"), lease_name("new-tls")].into(),
        };
        let n = narrowed(&r, &wanted).unwrap();
        assert_eq!(names(&n, "secrets", "update"), ["a-tls".to_owned(), account]);
        assert_eq!(names(&n, "leases", "update"), [lease_name("a-tls")]);
        assert_eq!(
            names(&n, "secrets", "get").last().map(String::as_str),
            Some("eab")
        );
        assert!(narrowed(&n, &wanted).is_none(), "nothing more to take");
    }

    #[test]
    fn a_rule_left_with_no_name_goes_rather_than_grant_every_name() {
        let r = role(
            "ns",
            "web",
            &["gone-tls".to_owned()],
            &[],
            &[lease_name("gone-tls")],
        );
        let n = narrowed(&r, &Wanted::default()).unwrap();
        assert!(names(&n, "secrets", "update").is_empty());
        assert!(names(&n, "leases", "update").is_empty());
        assert!(
            n.rules
                .iter()
                .flatten()
                .all(|r| r.resource_names.as_ref().is_none_or(|n| !n.is_empty())),
            "{n:?}"
        );
    }
}
