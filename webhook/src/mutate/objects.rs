//! The objects the side effects create, built here without any API call: temporary
//! Secrets, solver Services, the sidecar's least-privilege Role and RoleBinding, and the
//! repairs of a drifted solver Service.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{
    ByteString,
    api::{
        coordination::v1::Lease,
        core::v1::{Secret, Service, ServicePort, ServiceSpec},
        rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject},
    },
    apimachinery::pkg::{
        apis::meta::v1::{ObjectMeta, OwnerReference},
        util::intstr::IntOrString,
    },
};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256};
use sidecert_contract::{
    HTTP01_PORT_NAME, MANAGED_BY, MANAGED_BY_LABEL, SOLVER_SERVICE_SUFFIX, annotations, bounded_name,
    validate_secret_name,
};

use crate::error::Result;

/// The solver Service for a backend Service: `<backend>-sidecert-solver`, at most 63
/// characters whatever the backend's name holds; a long backend is cut and ends in a hash of
/// its whole name (so two long backends never share a solver). The name always ends in the
/// suffix: that is how [`crate::mutate::ingress::plan`] tells a solver path from the backend's own.
pub fn solver_service_name(backend: &str) -> String {
    let keep = 63 - SOLVER_SERVICE_SUFFIX.len();
    format!("{}{SOLVER_SERVICE_SUFFIX}", bounded_name(backend, keep))
}

/// Name of the solver Service's port (→ target port `sidecert-http`).
pub const SOLVER_PORT_NAME: &str = "http";

/// Validity of a temporary certificate.
pub const TEMPORARY_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);

fn managed_labels() -> BTreeMap<String, String> {
    BTreeMap::from([(MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned())])
}

/// The namespace's ACME account Secret as the webhook creates it: sidecert's, and empty
/// until the first sidecar stores the account in it. The sidecar's Role may then name it
/// for `update` without the Role granting `create` on Secrets of any name.
pub fn account_secret(namespace: &str, name: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(managed_labels()),
            ..Default::default()
        },
        type_: Some("Opaque".to_owned()),
        ..Default::default()
    }
}

/// A certificate's Lease as the webhook creates it, with no holder yet: the sidecars elect
/// their leader on it without the Role granting `create` on Leases of any name.
pub fn certificate_lease(namespace: &str, name: &str) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(managed_labels()),
            ..Default::default()
        },
        spec: None,
    }
}

/// A self-signed certificate for exactly `domains` (ECDSA P-256, PKCS#8 key) as a TLS Secret.
pub fn temporary_secret(namespace: &str, name: &str, domains: &[String]) -> Result<Secret> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(domains.to_vec())?;
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        domains.first().map_or("sidecert temporary", String::as_str),
    );
    dn.push(DnType::OrganizationName, "sidecert temporary certificate");
    params.distinguished_name = dn;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + TEMPORARY_VALIDITY;
    let cert = params.self_signed(&key)?;
    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(managed_labels()),
            annotations: Some(BTreeMap::from([
                (annotations::TEMPORARY.to_owned(), "true".to_owned()),
                (annotations::DOMAINS_ON_SECRET.to_owned(), domains.join(",")),
            ])),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(BTreeMap::from([
            ("tls.crt".to_owned(), ByteString(cert.pem().into_bytes())),
            ("tls.key".to_owned(), ByteString(key.serialize_pem().into_bytes())),
        ])),
        ..Default::default()
    })
}

/// The solver Service: the backend's selector, port `http` (80) → `sidecert-http`, and
/// `publishNotReadyAddresses`: challenges must not wait for the application container to be
/// ready (the sidecar answers them regardless), and the leader waits for these endpoints
/// before telling the CA to validate.
pub fn solver_service(
    namespace: &str,
    name: &str,
    selector: BTreeMap<String, String>,
    owner: Option<OwnerReference>,
) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(managed_labels()),
            owner_references: owner.map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            selector: Some(selector),
            ports: Some(vec![ServicePort {
                name: Some(SOLVER_PORT_NAME.to_owned()),
                port: 80,
                target_port: Some(IntOrString::String(HTTP01_PORT_NAME.to_owned())),
                protocol: Some("TCP".to_owned()),
                ..Default::default()
            }]),
            type_: Some("ClusterIP".to_owned()),
            publish_not_ready_addresses: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Whether the Role pruning marked `role` ([`annotations::PRUNE_CANDIDATE`]): admission
/// takes the mark off, the pruning acts only on a Role that still has it.
pub fn is_prune_candidate(role: &Role) -> bool {
    role.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(annotations::PRUNE_CANDIDATE))
}

/// Whether sidecert made this object (`app.kubernetes.io/managed-by: sidecert`).
pub fn is_managed(meta: &ObjectMeta) -> bool {
    meta.labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .is_some_and(|v| v == MANAGED_BY)
}

/// The merge patch that brings a solver Service back in line: the backend's selector,
/// `publishNotReadyAddresses: true` (solvers made before it was set), and `owner` among its
/// owners. `None` when nothing is off, or when sidecert did not make it.
/// Guarded by the Service's resourceVersion (a concurrent change answers 409; retried).
pub fn solver_repair(
    existing: &Service,
    selector: &BTreeMap<String, String>,
    owner: Option<&OwnerReference>,
) -> Option<serde_json::Value> {
    if !is_managed(&existing.metadata) {
        return None;
    }
    let mut patch = serde_json::Map::new();
    let mut spec = serde_json::Map::new();
    let current = existing.spec.as_ref().and_then(|s| s.selector.as_ref());
    if current != Some(selector) {
        // A merge patch merges maps: keys to drop are set to null.
        let mut sel: serde_json::Map<String, serde_json::Value> = current
            .into_iter()
            .flatten()
            .filter(|(k, _)| !selector.contains_key(*k))
            .map(|(k, _)| (k.clone(), serde_json::Value::Null))
            .collect();
        sel.extend(selector.iter().map(|(k, v)| (k.clone(), v.clone().into())));
        spec.insert("selector".into(), sel.into());
    }
    if existing.spec.as_ref().and_then(|s| s.publish_not_ready_addresses) != Some(true) {
        spec.insert("publishNotReadyAddresses".into(), true.into());
    }
    if !spec.is_empty() {
        patch.insert("spec".into(), spec.into());
    }
    let mut meta = serde_json::Map::new();
    if let Some(owner) = owner {
        let mut owners = existing.metadata.owner_references.clone().unwrap_or_default();
        if !owners.iter().any(|o| o.uid == owner.uid) {
            owners.push(owner.clone());
            meta.insert("ownerReferences".into(), serde_json::to_value(owners).ok()?);
        }
    }
    if patch.is_empty() && meta.is_empty() {
        return None;
    }
    meta.insert(
        "resourceVersion".into(),
        existing.metadata.resource_version.clone().into(),
    );
    patch.insert("metadata".into(), meta.into());
    Some(patch.into())
}

/// Name of the Role and RoleBinding for a ServiceAccount.
pub fn rbac_name(service_account: &str) -> String {
    bounded_name(&format!("sidecert-{service_account}"), 253)
}

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str], names: Option<&[String]>) -> PolicyRule {
    let strings = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    PolicyRule {
        api_groups: Some(strings(groups)),
        resources: Some(strings(resources)),
        verbs: strings(verbs),
        // Sorted, so that a merge with an existing Role compares equal when nothing changed.
        resource_names: names.map(|n| {
            let mut n = n.to_vec();
            n.sort();
            n.dedup();
            n
        }),
        non_resource_urls: None,
    }
}

/// The sidecar's Role: what it needs and nothing more. It reads and writes the Secrets
/// `secrets` (its certificates' and the namespace's ACME account), only reads `read_only`
/// (the operator's EAB Secret), and elects a leader on the Leases `leases`.
pub fn role(
    namespace: &str,
    service_account: &str,
    secrets: &[String],
    read_only: &[String],
    leases: &[String],
) -> Role {
    let mut role = Role {
        metadata: ObjectMeta {
            name: Some(rbac_name(service_account)),
            namespace: Some(namespace.to_owned()),
            labels: Some(managed_labels()),
            ..Default::default()
        },
        rules: Some(vec![
            // Its certificate Secrets and the namespace's ACME account Secret, by name. `list`/`watch` serve the sidecar's watch on its own Secrets (a
            // metadata.name field selector, which RBAC matches against resourceNames).
            rule(
                &[""],
                &["secrets"],
                &["get", "list", "watch", "update", "patch"],
                Some(secrets),
            ),
            // Leader election on its certificates' Leases, by name. Replicas watch the Lease
            // for the key authorizations the leader publishes on it.
            rule(
                &["coordination.k8s.io"],
                &["leases"],
                &["get", "list", "watch", "update", "patch"],
                Some(leases),
            ),
            // No `create` on Secrets or Leases: Kubernetes cannot narrow `create` by name, and
            // with `get` on a name not yet taken it would mint a token Secret. The webhook
            // creates the certificate Secrets, the account Secret and the Leases itself.
            // Events about its work stay an unnamed `create` (kube's recorder patches a
            // repeated Event's series); an Event grants nothing.
            rule(&["", "events.k8s.io"], &["events"], &["create", "patch"], None),
            // The leader waits until its solver Service has endpoints (the Ingress routes
            // challenges only then). EndpointSlices are selected by label
            // (`kubernetes.io/service-name`), so resourceNames cannot narrow this.
            rule(
                &["discovery.k8s.io"],
                &["endpointslices"],
                &["list", "watch"],
                None,
            ),
            // The EAB Secret is the operator's: read once, never written.
            rule(&[""], &["secrets"], &["get"], Some(read_only)),
        ]),
    };
    // An empty resourceNames means every name to RBAC: a rule that would name nothing is left
    // out, never written empty.
    for rules in role.rules.iter_mut() {
        rules.retain(|r| r.resource_names.as_ref().is_none_or(|n| !n.is_empty()));
    }
    role
}

/// `existing` brought in line with `wanted`: a rule of a shape `wanted` has no more (the
/// unnamed `create` on Secrets and Leases older versions granted, a rule with no or an
/// empty name list, which RBAC reads as every name) is dropped; a name `wanted` mentions
/// gets exactly the rules of its resource `wanted` gives it (the EAB Secret leaves the
/// read-write rule); other names are kept. `None` when nothing changes.
pub fn merge_role(existing: &Role, wanted: &Role) -> Option<Role> {
    let same_shape = |have: &PolicyRule, want: &PolicyRule| {
        have.api_groups == want.api_groups
            && have.resources == want.resources
            && have.verbs == want.verbs
            && have.resource_names.is_some() == want.resource_names.is_some()
    };
    let wanted_rules = wanted.rules.as_deref().unwrap_or_default();
    // The names `wanted` gives rules of this API group and resource: a Secret and a Lease
    // may share a name (the Lease of the certificate `x` is `sidecert-x`, a Secret's name
    // too), and one must not take the other's right away.
    let mentioned = |have: &PolicyRule| -> Vec<&String> {
        wanted_rules
            .iter()
            .filter(|w| w.api_groups == have.api_groups && w.resources == have.resources)
            .flat_map(|w| w.resource_names.iter().flatten())
            .collect()
    };
    let mut merged = existing.clone();
    let rules = merged.rules.get_or_insert_with(Vec::new);
    let before = rules.clone();
    rules.retain(|r| {
        wanted_rules.iter().any(|w| same_shape(r, w))
            && r.resource_names.as_ref().is_none_or(|n| !n.is_empty())
    });
    for have in rules.iter_mut() {
        let Some(want) = wanted_rules.iter().find(|w| same_shape(have, w)) else {
            continue;
        };
        let mentioned = mentioned(have);
        let leases = have.resources.as_deref() == Some(&["leases".to_owned()][..]);
        if let (Some(names), Some(want_names)) = (have.resource_names.as_mut(), &want.resource_names) {
            // A name sidecert never writes (the policy refuses a Role holding one: "" would
            // grant a list of every Secret) is dropped, or the Role could never be merged again.
            names.retain(|n| {
                validate_secret_name(n).is_ok()
                    && (!leases || n.starts_with("sidecert-"))
                    && (!mentioned.contains(&n) || want_names.contains(n))
            });
        }
    }
    for want in wanted_rules {
        match rules.iter_mut().find(|r| same_shape(r, want)) {
            Some(have) => {
                if let (Some(names), Some(want_names)) = (have.resource_names.as_mut(), &want.resource_names)
                {
                    for n in want_names {
                        if !names.contains(n) {
                            names.push(n.clone());
                        }
                    }
                    names.sort();
                }
            }
            None => rules.push(want.clone()),
        }
    }
    // A rule whose names all moved elsewhere would now match every name.
    rules.retain(|r| r.resource_names.as_ref().is_none_or(|n| !n.is_empty()));
    (*rules != before).then_some(merged)
}

/// The RoleBinding of the sidecar's Role to the ServiceAccount.
pub fn role_binding(namespace: &str, service_account: &str) -> RoleBinding {
    RoleBinding {
        metadata: ObjectMeta {
            name: Some(rbac_name(service_account)),
            namespace: Some(namespace.to_owned()),
            labels: Some(managed_labels()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".to_owned(),
            kind: "Role".to_owned(),
            name: rbac_name(service_account),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".to_owned(),
            name: service_account.to_owned(),
            namespace: Some(namespace.to_owned()),
            api_group: None,
        }]),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::testing::solver;

    #[test]
    fn solver_drift_is_repaired() {
        let svc = solver(json!([]), true);
        let sel = BTreeMap::from([("app".to_owned(), "web2".to_owned())]);
        let o = OwnerReference {
            uid: "u-1".into(),
            ..Default::default()
        };
        let patch = solver_repair(&svc, &sel, Some(&o)).unwrap();
        assert_eq!(patch["spec"]["selector"], json!({"app": "web2"}));
        assert_eq!(patch["metadata"]["ownerReferences"][0]["uid"], "u-1");
        assert_eq!(patch["metadata"]["resourceVersion"], "9");
        let same = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
        assert!(solver_repair(&svc, &same, None).is_none());
        let mut extra = solver(json!([]), true);
        extra
            .spec
            .as_mut()
            .unwrap()
            .selector
            .as_mut()
            .unwrap()
            .insert("x".into(), "y".into());
        let patch = solver_repair(&extra, &same, None).unwrap();
        assert_eq!(patch["spec"]["selector"], json!({"app": "web", "x": null}));
        assert!(solver_repair(&solver(json!([]), false), &sel, Some(&o)).is_none());
        assert!(patch["spec"].get("publishNotReadyAddresses").is_none());

        // A solver made before publishNotReadyAddresses was set gets it, and nothing else.
        let mut old = solver(json!([]), true);
        old.spec.as_mut().unwrap().publish_not_ready_addresses = None;
        let patch = solver_repair(&old, &same, None).unwrap();
        assert_eq!(patch["spec"], json!({"publishNotReadyAddresses": true}));
        assert_eq!(patch["metadata"]["resourceVersion"], "9");
    }
}
