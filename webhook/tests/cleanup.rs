//! A namespace sidecert no longer serves, cleaned against the real API server: its HTTP-01
//! paths, solver Services, Roles and RoleBindings go; everything else (Secrets, Leases, the
//! app's own paths, another team's Roles and Services, a look-alike of a sidecert name
//! without its label) stays.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::names;

use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Secret, Service},
    networking::v1::Ingress,
    rbac::v1::{Role, RoleBinding},
};
use kube::{Api, api::PostParams};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use sidecert_contract::ACME_CHALLENGE_PATH;
use sidecert_e2e::{Plane, TestNamespace};
use sidecert_webhook::reconciler::cleanup::clean_namespace;

async fn create<K>(ns: &TestNamespace, object: Value)
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let object: K = serde_json::from_value(object).unwrap();
    ns.api::<K>()
        .create(&PostParams::default(), &object)
        .await
        .unwrap();
}

fn role(name: &str, labels: Value) -> Value {
    json!({"metadata": {"name": name, "labels": labels},
        "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"], "resourceNames": ["web-tls"]}]})
}

fn binding(name: &str, labels: Value) -> Value {
    json!({"metadata": {"name": name, "labels": labels},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": "default"}]})
}

fn service(name: &str, labels: Value) -> Value {
    json!({"metadata": {"name": name, "labels": labels},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unserved_namespace_loses_sidecerts_rights_and_routes_and_keeps_its_secrets() {
    let plane = Plane::get().await.expect("local plane");
    let client = plane.client().await.unwrap();
    let ns = plane.namespace("cleanup", false).await.unwrap();
    let ours = json!({"app.kubernetes.io/managed-by": "sidecert"});
    create::<Role>(&ns, role("sidecert-default", ours.clone())).await;
    create::<Role>(&ns, role("sidecert-lookalike", json!({}))).await;
    create::<Role>(&ns, role("app-reader", ours.clone())).await;
    create::<RoleBinding>(&ns, binding("sidecert-default", ours.clone())).await;
    create::<RoleBinding>(&ns, binding("app-reader", json!({}))).await;
    create::<Service>(&ns, service("web-sidecert-solver", ours.clone())).await;
    create::<Service>(&ns, service("web", json!({}))).await;
    create::<Secret>(
        &ns,
        json!({"metadata": {"name": "web-tls", "labels": ours}, "stringData": {"k": "v"}}),
    )
    .await;
    create::<Lease>(
        &ns,
        json!({"metadata": {"name": "sidecert-web-tls", "labels": ours}, "spec": {}}),
    )
    .await;
    let path = |p: &str, svc: &str| {
        json!({"path": p, "pathType": "Prefix",
            "backend": {"service": {"name": svc, "port": {"number": 80}}}})
    };
    create::<Ingress>(
        &ns,
        json!({"metadata": {"name": "web"}, "spec": {"rules": [
            {"host": "a.cleanup.example", "http": {"paths": [path("/", "web"), path(ACME_CHALLENGE_PATH, "web-sidecert-solver")]}},
            {"host": "b.cleanup.example", "http": {"paths": [path(ACME_CHALLENGE_PATH, "web-sidecert-solver"), path("/b", "web")]}},
            // The app's own path of the same prefix, to a Service of its own: kept.
            {"host": "c.cleanup.example", "http": {"paths": [path(ACME_CHALLENGE_PATH, "web")]}},
            // Only the challenge path: the rule keeps its host and loses its `http` (an
            // empty `paths` is refused).
            {"host": "d.cleanup.example", "http": {"paths": [path(ACME_CHALLENGE_PATH, "web-sidecert-solver")]}}
        ]}}),
    )
    .await;

    let (cleaned, error) = clean_namespace(&client, ns.name(), Some("sidecert.io/injection=enabled")).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(cleaned.ingresses, ["web"]);
    assert_eq!(cleaned.services, ["web-sidecert-solver"]);
    assert_eq!(cleaned.roles, ["sidecert-default"]);
    assert_eq!(cleaned.role_bindings, ["sidecert-default"]);

    assert_eq!(
        names(&ns.api::<Role>()).await,
        ["app-reader", "sidecert-lookalike"]
    );
    assert_eq!(names(&ns.api::<RoleBinding>()).await, ["app-reader"]);
    assert_eq!(names(&ns.api::<Service>()).await, ["web"]);
    assert_eq!(names(&ns.api::<Secret>()).await, ["web-tls"]);
    assert_eq!(names(&ns.api::<Lease>()).await, ["sidecert-web-tls"]);
    let ingress = ns.api::<Ingress>().get("web").await.unwrap();
    let paths: Vec<Vec<(String, String)>> = ingress
        .spec
        .unwrap()
        .rules
        .unwrap()
        .into_iter()
        .map(|r| {
            r.http
                .map(|h| h.paths)
                .unwrap_or_default()
                .into_iter()
                .map(|p| (p.path.unwrap_or_default(), p.backend.service.unwrap().name))
                .collect()
        })
        .collect();
    let p = |a: &str, b: &str| (a.to_owned(), b.to_owned());
    assert_eq!(
        paths,
        [
            vec![p("/", "web")],
            vec![p("/b", "web")],
            vec![p(ACME_CHALLENGE_PATH, "web")],
            vec![]
        ]
    );

    // Nothing left: a second pass changes nothing.
    let (again, error) = clean_namespace(&client, ns.name(), Some("sidecert.io/injection=enabled")).await;
    assert!(again.is_empty() && error.is_none(), "{again:?} {error:?}");

    // Labelled again before the Roles go: they stay.
    create::<Role>(&ns, role("sidecert-again", ours.clone())).await;
    let label = json!({"metadata": {"labels": {"sidecert.io/injection": "enabled"}}});
    Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
        .patch(
            ns.name(),
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&label),
        )
        .await
        .unwrap();
    let (kept, error) = clean_namespace(&client, ns.name(), Some("sidecert.io/injection=enabled")).await;
    assert!(kept.roles.is_empty() && error.is_none(), "{kept:?} {error:?}");
    assert!(
        names(&ns.api::<Role>())
            .await
            .contains(&"sidecert-again".to_owned())
    );
}
