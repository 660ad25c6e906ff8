//! The sidecars' Roles pruned against the real API server, in two passes: a Role to narrow or
//! delete is marked first, and an admission in between (the real executor) takes the mark
//! off. Then a certificate no injected Pod of the ServiceAccount names any more leaves its
//! Role, a ServiceAccount with no injected Pod loses its Role and RoleBinding, and a
//! look-alike without sidecert's label is left alone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::names;

use std::{sync::Arc, time::Duration};

use k8s_openapi::api::{
    core::v1::{Pod, ServiceAccount},
    rbac::v1::{Role, RoleBinding},
};
use kube::{Api, api::PostParams};
use serde_json::json;
use sidecert_contract::{ACCOUNT_SECRET_PREFIX, STATUS_INJECTED, annotations, lease_name};
use sidecert_e2e::Plane;
use sidecert_webhook::{
    kube::Executor,
    mutate::{
        effect::Effect,
        lookup::Snapshot,
        objects::{role, role_binding},
    },
    reconciler::prune::prune_namespace,
};

fn rule_names(role: &Role, resource: &str) -> Vec<String> {
    role.rules
        .iter()
        .flatten()
        .filter(|r| {
            r.resources.as_deref() == Some(&[resource.to_owned()][..])
                && r.verbs.iter().any(|v| v == "update")
        })
        .flat_map(|r| r.resource_names.clone().unwrap_or_default())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_no_pod_asks_for_leave_the_role_and_a_role_nobody_uses_goes() {
    let plane = Plane::get().await.expect("local plane");
    let client = plane.client().await.unwrap();
    let ns = plane.namespace("prune", false).await.unwrap();
    let (roles, bindings): (Api<Role>, Api<RoleBinding>) = (ns.api(), ns.api());
    let account = format!("{ACCOUNT_SECRET_PREFIX}0123456789ab");
    for (sa, certs) in [("web", vec!["a-tls", "gone-tls"]), ("old", vec!["old-tls"])] {
        let mut secrets: Vec<String> = certs.iter().map(|c| (*c).to_owned()).collect();
        secrets.push(account.clone());
        let leases: Vec<String> = certs.iter().map(|c| lease_name(c)).collect();
        roles
            .create(
                &PostParams::default(),
                &role(ns.name(), sa, &secrets, &[], &leases),
            )
            .await
            .unwrap();
        bindings
            .create(&PostParams::default(), &role_binding(ns.name(), sa))
            .await
            .unwrap();
    }
    // Another team's Role of a sidecert name, bound to a ServiceAccount with no Pod.
    let mut theirs = role(ns.name(), "theirs", &["x-tls".to_owned()], &[], &[]);
    theirs.metadata.labels = None;
    roles.create(&PostParams::default(), &theirs).await.unwrap();
    let mut theirs_binding = role_binding(ns.name(), "theirs");
    theirs_binding.metadata.labels = None;
    bindings
        .create(&PostParams::default(), &theirs_binding)
        .await
        .unwrap();

    // One injected Pod of `web`, asking for a-tls only (never scheduled: no such node).
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "web"}})).unwrap();
    ns.api::<ServiceAccount>()
        .create(&PostParams::default(), &sa)
        .await
        .unwrap();
    let certs = json!([{"secretName": "a-tls", "domains": ["a.prune.example"]}]).to_string();
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "web", "annotations": {
            annotations::STATUS: STATUS_INJECTED, annotations::CERTIFICATES: certs}},
        "spec": {"serviceAccountName": "web", "nodeName": "nowhere",
                 "containers": [{"name": "app", "image": "example/app:1.0"}]}
    }))
    .unwrap();
    ns.api::<Pod>()
        .create(&PostParams::default(), &pod)
        .await
        .unwrap();

    // First pass: both Roles that would lose something are only marked.
    let first = prune_namespace(&client, ns.name()).await.unwrap();
    assert_eq!(first.marked, ["sidecert-old", "sidecert-web"]);
    assert!(first.narrowed.is_empty() && first.deleted.is_empty(), "{first:?}");
    let marked = |r: &Role| {
        r.metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(annotations::PRUNE_CANDIDATE))
    };
    assert!(marked(&roles.get("sidecert-old").await.unwrap()));

    // A Pod of `old` admitted meanwhile (its names are in the Role already, so the merge
    // changes nothing): the admission takes the mark off, and the Role stays.
    let executor = Executor::new(
        client.clone(),
        Arc::new(Snapshot::default()),
        Duration::from_secs(5),
    );
    executor
        .apply_one(&Effect::Rbac {
            namespace: ns.name().to_owned(),
            service_account: "old".into(),
            certificates: vec!["old-tls".into()],
            account: account.clone(),
            eab: None,
            leases: vec![lease_name("old-tls")],
        })
        .await
        .unwrap();
    assert!(!marked(&roles.get("sidecert-old").await.unwrap()));

    // Second pass: `web` still marked, so narrowed (and unmarked); `old` marked again.
    let pruned = prune_namespace(&client, ns.name()).await.unwrap();
    assert_eq!(pruned.narrowed, ["sidecert-web"]);
    assert_eq!(pruned.marked, ["sidecert-old"]);
    assert!(pruned.deleted.is_empty(), "{pruned:?}");
    let web = roles.get("sidecert-web").await.unwrap();
    assert!(!marked(&web));
    assert_eq!(rule_names(&web, "secrets"), ["a-tls".to_owned(), account]);
    assert_eq!(rule_names(&web, "leases"), [lease_name("a-tls")]);

    // Third pass: `old` goes with its binding; `web` has nothing more to lose.
    let third = prune_namespace(&client, ns.name()).await.unwrap();
    assert_eq!(third.deleted, ["sidecert-old"]);
    assert!(third.marked.is_empty() && third.narrowed.is_empty(), "{third:?}");
    assert_eq!(names(&roles).await, ["sidecert-theirs", "sidecert-web"]);
    assert_eq!(names(&bindings).await, ["sidecert-theirs", "sidecert-web"]);

    // The Pod gone, the ServiceAccount's Role and RoleBinding go too, two passes later.
    ns.api::<Pod>()
        .delete("web", &kube::api::DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    assert_eq!(
        prune_namespace(&client, ns.name()).await.unwrap().marked,
        ["sidecert-web"]
    );
    assert_eq!(
        prune_namespace(&client, ns.name()).await.unwrap().deleted,
        ["sidecert-web"]
    );
    assert_eq!(names(&roles).await, ["sidecert-theirs"]);
    assert_eq!(names(&bindings).await, ["sidecert-theirs"]);
    ns.cleanup().await.unwrap();
}
