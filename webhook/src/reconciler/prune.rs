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
//! annotations can keep a name sidecert granted but never gain one. The account Secrets and
//! the read-only EAB Secret stay while the ServiceAccount has a Pod.
//!
//! A Pod is stored only after its admission wrote (or found) its Role, so a pass may see the
//! Role and not yet the Pod. A Role is therefore first marked
//! ([`annotations::PRUNE_CANDIDATE`]), and narrowed or deleted only on a later pass that
//! still finds the mark: every admission that touches the Role takes the mark off
//! (`Executor::ensure_rbac`), so a Pod admitted in between keeps its rights, whatever the
//! clocks say. Every write is conditional on the Role (or binding) being as it was read.
//! A namespace of more than [`MAX_PODS`] Pods is left as it is.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use k8s_openapi::api::{
    core::v1::Pod,
    rbac::v1::{PolicyRule, Role, RoleBinding},
};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, PostParams},
};
use sidecert_contract::{
    ACCOUNT_SECRET_PREFIX, MANAGED_BY, MANAGED_BY_LABEL, STATUS_INJECTED, annotations, decode_certificates,
    lease_name,
};

use crate::{
    error::Result,
    kube::delete::{Deleted, delete_unchanged},
    mutate::objects::{is_managed, is_prune_candidate},
};

/// How often the leader prunes the sidecars' Roles.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(300);

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
    /// Roles marked, to narrow or delete on a later pass.
    pub marked: Vec<String>,
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

/// Pods a namespace may hold for its Roles to be pruned; past it, its Roles are left as they
/// are (listing them is bounded, and a guess from part of them could take a right away).
pub const MAX_PODS: usize = 5000;

/// Pods listed per request.
const PAGE: u32 = 100;

/// What the Pods of `ns` ask of their ServiceAccounts' Roles, read a page at a time; `None`
/// past [`MAX_PODS`].
async fn wanted_in(client: &Client, ns: &str) -> Result<Option<BTreeMap<String, Wanted>>> {
    let api = Api::<Pod>::namespaced(client.clone(), ns);
    let mut wanted: BTreeMap<String, Wanted> = BTreeMap::new();
    let mut seen = 0usize;
    let mut params = ListParams::default().limit(PAGE);
    loop {
        let page = api.list(&params).await?;
        seen = seen.saturating_add(page.items.len());
        if seen > MAX_PODS {
            return Ok(None);
        }
        for (account, w) in wanted_by(&page.items) {
            let entry = wanted.entry(account).or_default();
            entry.secrets.extend(w.secrets);
            entry.leases.extend(w.leases);
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(Some(wanted)),
        }
    }
}

/// `role` with the prune mark set (`true`) or taken off.
fn with_mark(mut role: Role, marked: bool) -> Role {
    let annotations = role.annotations_mut();
    if marked {
        annotations.insert(annotations::PRUNE_CANDIDATE.to_owned(), "true".to_owned());
    } else {
        annotations.remove(annotations::PRUNE_CANDIDATE);
    }
    role
}

/// Prunes the sidecert Roles of `ns` (labelled as its own, named `sidecert-*`, bound by a
/// RoleBinding of the same name that is its own too) against its Pods, in two passes: a Role
/// to narrow or delete is first marked ([`annotations::PRUNE_CANDIDATE`]); any admission
/// that touches it takes the mark off; a later pass narrows or deletes it only if the mark
/// is still there, against the Pods it sees then. One Role that cannot be written is logged
/// and left; the others go on.
pub async fn prune_namespace(client: &Client, ns: &str) -> Result<Pruned> {
    let managed = ListParams::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
    let roles_api = Api::<Role>::namespaced(client.clone(), ns);
    let roles: Vec<Role> = roles_api
        .list(&managed)
        .await?
        .items
        .into_iter()
        .filter(|r| r.name_any().starts_with("sidecert-") && is_managed(&r.metadata))
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
    let Some(wanted) = wanted_in(client, ns).await? else {
        tracing::warn!(
            namespace = ns,
            max = MAX_PODS,
            "too many Pods to prune the sidecars' Roles against; left as they are"
        );
        return Ok(pruned);
    };
    for role in roles {
        let name = role.name_any();
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
        if let Err(e) = prune_role(
            &roles_api,
            &bindings_api,
            role,
            binding,
            wanted.get(service_account),
            &mut pruned,
        )
        .await
        {
            tracing::warn!(namespace = ns, role = name, error = %e, "cannot prune the Role");
        }
    }
    Ok(pruned)
}

/// One Role of the pass (see [`prune_namespace`]); `wanted` is what its ServiceAccount's
/// Pods ask for (`None`: it has no injected Pod).
async fn prune_role(
    roles: &Api<Role>,
    bindings: &Api<RoleBinding>,
    role: Role,
    binding: &RoleBinding,
    wanted: Option<&Wanted>,
    pruned: &mut Pruned,
) -> Result<()> {
    let name = role.name_any();
    let marked = is_prune_candidate(&role);
    // Every write carries the resourceVersion read: conditional.
    let replace = |r: Role| async move {
        match roles.replace(&r.name_any(), &PostParams::default(), &r).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.is_conflict() || s.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    };
    // What the Pods leave the Role: everything (`None`: keep), less, or nothing.
    let change = match wanted {
        Some(w) => narrowed(&role, w).map(Some),
        None => Some(None),
    };
    match (change, marked) {
        (None, false) => {}
        // Nothing to take: a mark left from an earlier pass goes.
        (None, true) => {
            replace(with_mark(role, false)).await?;
        }
        // Something to take, not marked yet: mark, act next pass.
        (Some(_), false) => {
            if replace(with_mark(role, true)).await? {
                pruned.marked.push(name);
            }
        }
        (Some(Some(narrow)), true) => {
            if replace(with_mark(narrow, false)).await? {
                pruned.narrowed.push(name);
            }
        }
        // No Pod left, and none admitted since the mark: the Role first (a binding to no
        // Role grants nothing, and the next admission writes the Role again), then the
        // binding.
        (Some(None), true) => {
            if delete_unchanged(roles, &role.metadata).await? == Deleted::Yes {
                delete_unchanged(bindings, &binding.metadata).await?;
                pruned.deleted.push(name);
            }
        }
    }
    Ok(())
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
