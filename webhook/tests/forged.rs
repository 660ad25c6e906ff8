//! Admission is not trusted input: a review sent straight to the webhook's port, forged for
//! `kube-system` or a namespace that did not opt in, changes nothing and creates nothing.
//! The webhook asks the API server which namespaces opted in (a watch, and a live list when
//! a namespace was labelled a moment ago), against the real API server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use k8s_openapi::api::{
    core::v1::{Namespace, Secret, Service},
    networking::v1::Ingress,
    rbac::v1::{Role, RoleBinding},
};
use kube::{Api, api::PostParams};
use serde_json::{Value, json};
use sidecert_e2e::Plane;
use sidecert_webhook::{
    AcmeDefaults, Context, Lookup, Reviewer, SidecarSettings,
    kube::{Executor, NamespaceGate},
    metrics::Metrics,
    mutate::Snapshot,
};

mod common;
use common::create_review;

const OWN: &str = "sidecert-forged-test-release";

fn pod_review(namespace: &str, secret: &str, host: &str) -> Vec<u8> {
    create_review(
        namespace,
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "p-", "annotations": {
                "sidecert.io/inject": "true", "sidecert.io/domains": host,
                "sidecert.io/secret-name": secret}},
            "spec": {"containers": [{"name": "app", "image": "example.invalid/app:1"}]}
        }),
        false,
    )
}

fn ingress_review(namespace: &str, secret: &str, host: &str) -> Vec<u8> {
    create_review(
        namespace,
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": {"name": "forged", "namespace": namespace,
                "annotations": {"sidecert.io/issue-temporary-certificate": "true"}},
            "spec": {
                "tls": [{"hosts": [host], "secretName": secret}],
                "rules": [{"host": host, "http": {"paths": [{"path": "/", "pathType": "Prefix",
                    "backend": {"service": {"name": "web", "port": {"number": 80}}}}]}}]
            }
        }),
        false,
    )
}

async fn respond(reviewer: &Reviewer, body: &[u8]) -> Value {
    let out: Value = serde_json::from_slice(&reviewer.review(body).await.unwrap()).unwrap();
    assert_eq!(out["response"]["allowed"], true, "{out}");
    out["response"].clone()
}

fn refused(response: &Value) -> bool {
    response["patch"].is_null()
        && response["warnings"].as_array().is_some_and(|w| {
            w.iter()
                .any(|w| w.as_str().unwrap_or("").contains("is not one sidecert serves"))
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_reviews_for_namespaces_that_did_not_opt_in_change_nothing() {
    sidecert_webhook::install_crypto_provider();
    let plane = Plane::get().await.expect("local plane");
    let client = plane.client().await.unwrap();
    let labelled = plane.namespace("forged-on", true).await.unwrap();
    let unlabelled = plane.namespace("forged-off", false).await.unwrap();
    let cache = Arc::new(Snapshot::default());
    let ctx = Context {
        sidecar: SidecarSettings::default(),
        acme: AcmeDefaults::default(),
        lookup: cache.clone(),
        secrets: Default::default(),
    };
    let gate = NamespaceGate::start(client.clone(), "sidecert.io/injection=enabled", OWN);
    assert!(gate.wait_until_ready().await);
    let executor = Executor::new(client.clone(), cache, Duration::from_secs(4));
    let reviewer = Reviewer::new(ctx, Metrics::new().unwrap(), Some(executor)).with_namespace_gate(gate);

    // Forged for kube-system, an unlabelled namespace and the release namespace: no patch,
    // a warning, and nothing written there (before the gate: a Secret and a Role).
    for ns in ["kube-system", unlabelled.name(), OWN] {
        let pod = respond(&reviewer, &pod_review(ns, "forged-pod-tls", "pod.forged.example")).await;
        assert!(refused(&pod), "Pod in {ns}: {pod}");
        let ingress = respond(
            &reviewer,
            &ingress_review(ns, "forged-ing-tls", "ing.forged.example"),
        )
        .await;
        assert!(refused(&ingress), "Ingress in {ns}: {ingress}");
    }
    for ns in ["kube-system", unlabelled.name()] {
        let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
        for name in ["forged-pod-tls", "forged-ing-tls"] {
            assert!(
                secrets.get_opt(name).await.unwrap().is_none(),
                "{ns}/{name} was created"
            );
        }
        let roles: Api<Role> = Api::namespaced(client.clone(), ns);
        assert!(
            roles.get_opt("sidecert-default").await.unwrap().is_none(),
            "a Role in {ns}"
        );
    }

    // Where the namespace opted in, the same review is served, side effects included.
    let pod = respond(
        &reviewer,
        &pod_review(labelled.name(), "real-tls", "pod.real.example"),
    )
    .await;
    assert!(pod["patch"].is_string(), "{pod}");
    assert!(
        labelled
            .api::<Secret>()
            .get_opt("real-tls")
            .await
            .unwrap()
            .is_some()
    );

    // Labelled a moment ago: the watch may not have it yet; the live list answers.
    let late = plane.namespace("forged-late", false).await.unwrap();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut ns = namespaces.get(late.name()).await.unwrap();
    ns.metadata
        .labels
        .get_or_insert_default()
        .insert("sidecert.io/injection".into(), "enabled".into());
    namespaces
        .replace(late.name(), &PostParams::default(), &ns)
        .await
        .unwrap();
    let pod = respond(
        &reviewer,
        &pod_review(late.name(), "late-tls", "pod.late.example"),
    )
    .await;
    assert!(pod["patch"].is_string(), "{pod}");

    // A Role and a RoleBinding of the names sidecert uses, made by someone else: neither is
    // adopted (before: sidecert merged its Secret names into the Role).
    let taken = plane.namespace("forged-taken", true).await.unwrap();
    let foreign_role: Role = serde_json::from_value(json!({
        "metadata": {"name": "sidecert-default"},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}]
    }))
    .unwrap();
    taken
        .api::<Role>()
        .create(&PostParams::default(), &foreign_role)
        .await
        .unwrap();
    let pod = respond(
        &reviewer,
        &pod_review(taken.name(), "taken-tls", "pod.taken.example"),
    )
    .await;
    let warnings = pod["warnings"].to_string();
    assert!(
        warnings.contains("Role") && warnings.contains("is not sidecert's"),
        "{pod}"
    );
    let role = taken.api::<Role>().get("sidecert-default").await.unwrap();
    assert_eq!(
        serde_json::to_value(&role.rules).unwrap(),
        json!([{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}]),
        "the foreign Role is left as it was"
    );
    let bindings: Api<RoleBinding> = taken.api();
    assert!(bindings.get_opt("sidecert-default").await.unwrap().is_none());

    // A secretName naming another team's Secret (no managed-by label, no temporary
    // annotation): a warning, no sidecar, no right on it, nothing written (before: the Pod
    // was injected and its ServiceAccount got get and update on the Secret).
    let theirs = plane.namespace("forged-theirs", true).await.unwrap();
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "team-db"}, "stringData": {"password": "hunter2"}
    }))
    .unwrap();
    let before = theirs
        .api::<Secret>()
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let pod = respond(
        &reviewer,
        &pod_review(theirs.name(), "team-db", "pod.theirs.example"),
    )
    .await;
    assert!(pod["patch"].is_null(), "{pod}");
    assert!(pod["warnings"].to_string().contains("is not sidecert's"), "{pod}");
    assert!(
        theirs
            .api::<Role>()
            .get_opt("sidecert-default")
            .await
            .unwrap()
            .is_none(),
        "a Role granting rights on another team's Secret"
    );
    let ingress = respond(
        &reviewer,
        &ingress_review(theirs.name(), "team-db", "ing.theirs.example"),
    )
    .await;
    assert!(
        ingress["warnings"].to_string().contains("is not sidecert's"),
        "{ingress}"
    );
    let after = theirs.api::<Secret>().get("team-db").await.unwrap();
    assert_eq!(after.metadata.resource_version, before.metadata.resource_version);
    // A Secret sidecert made is its own: served, and no second temporary Secret is tried.
    let ours: Secret = serde_json::from_value(json!({
        "metadata": {"name": "ours-tls", "labels": {"app.kubernetes.io/managed-by": "sidecert"}},
        "stringData": {"tls.crt": "", "tls.key": ""}
    }))
    .unwrap();
    theirs
        .api::<Secret>()
        .create(&PostParams::default(), &ours)
        .await
        .unwrap();
    let pod = respond(
        &reviewer,
        &pod_review(theirs.name(), "ours-tls", "pod.ours.example"),
    )
    .await;
    assert!(pod["patch"].is_string(), "{pod}");
    assert!(
        !pod["warnings"].to_string().contains("is not sidecert's"),
        "{pod}"
    );

    for ns in [labelled, unlabelled, late, taken, theirs] {
        ns.cleanup().await.unwrap();
    }
}

/// A reviewer over `lookup`, with side effects against the plane's API server.
fn reviewer_over(client: &kube::Client, lookup: Arc<dyn Lookup>) -> Reviewer {
    let ctx = Context {
        sidecar: SidecarSettings::default(),
        acme: AcmeDefaults::default(),
        lookup: lookup.clone(),
        secrets: Default::default(),
    };
    let executor = Executor::new(client.clone(), lookup, Duration::from_secs(4));
    Reviewer::new(ctx, Metrics::new().unwrap(), Some(executor))
}

fn unlabelled_secret(name: &str) -> Secret {
    serde_json::from_value(json!({"metadata": {"name": name}, "stringData": {"k": "v"}})).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_secret_that_is_not_sidecerts_gets_no_right() {
    sidecert_webhook::install_crypto_provider();
    let plane = Plane::get().await.expect("local plane");
    let client = plane.client().await.unwrap();
    let ns = plane.namespace("forged-account", true).await.unwrap();
    // The e-mail decides the account Secret's name, and the Pod's author picks the e-mail:
    // here it names a Secret another team keeps (before: the Role named it with update).
    let account = sidecert_contract::account_secret_name(sidecert_contract::LETSENCRYPT, None);
    let before = ns
        .api::<Secret>()
        .create(&PostParams::default(), &unlabelled_secret(&account))
        .await
        .unwrap();
    let reviewer = reviewer_over(&client, Arc::new(Snapshot::default()));
    let pod = respond(&reviewer, &pod_review(ns.name(), "acct-tls", "pod.acct.example")).await;
    assert!(pod["patch"].is_null(), "{pod}");
    assert!(pod["warnings"].to_string().contains("ACME account"), "{pod}");
    assert!(
        ns.api::<Role>()
            .get_opt("sidecert-default")
            .await
            .unwrap()
            .is_none(),
        "a Role granting rights on another team's Secret"
    );
    assert!(ns.api::<Secret>().get_opt("acct-tls").await.unwrap().is_none());
    let after = ns.api::<Secret>().get(&account).await.unwrap();
    assert_eq!(after.metadata.resource_version, before.metadata.resource_version);

    // sidecert's own account Secret: served, and the Role names it with the certificate.
    ns.api::<Secret>()
        .delete(&account, &Default::default())
        .await
        .unwrap();
    let mut ours = unlabelled_secret(&account);
    ours.metadata.labels = Some([("app.kubernetes.io/managed-by".to_owned(), "sidecert".to_owned())].into());
    ns.api::<Secret>()
        .create(&PostParams::default(), &ours)
        .await
        .unwrap();
    let pod = respond(&reviewer, &pod_review(ns.name(), "acct-tls", "pod.acct.example")).await;
    assert!(pod["patch"].is_string(), "{pod}");
    let role = ns.api::<Role>().get("sidecert-default").await.unwrap();
    let rules = serde_json::to_value(&role.rules).unwrap();
    assert_eq!(rules[0]["resourceNames"], json!(["acct-tls", account]), "{rules}");
    ns.cleanup().await.unwrap();
}

/// The Ingresses `first` on the first look at a namespace, `later` on every look after it:
/// what a watch cache that catches up between two decisions of one review answers.
struct CatchingUp {
    looks: AtomicUsize,
    first: Snapshot,
    later: Snapshot,
}

impl Lookup for CatchingUp {
    fn ingresses(&self, namespace: &str) -> Vec<Arc<Ingress>> {
        match self.looks.fetch_add(1, Ordering::SeqCst) {
            0 => self.first.ingresses(namespace),
            _ => self.later.ingresses(namespace),
        }
    }

    fn service(&self, namespace: &str, name: &str) -> Option<Arc<Service>> {
        self.later.service(namespace, name)
    }

    fn services(&self, namespace: &str) -> Vec<Arc<Service>> {
        self.later.services(namespace)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_only_the_second_decision_finds_gets_no_right() {
    sidecert_webhook::install_crypto_provider();
    let plane = Plane::get().await.expect("local plane");
    let client = plane.client().await.unwrap();
    let ns = plane.namespace("forged-second", true).await.unwrap();
    let name = ns.name().to_owned();
    ns.api::<Secret>()
        .create(&PostParams::default(), &unlabelled_secret("team-db"))
        .await
        .unwrap();
    // The same name, made by another team between the review's look and its second
    // decision: the API server was never asked about it.
    ns.api::<Secret>()
        .create(&PostParams::default(), &unlabelled_secret("late-tls"))
        .await
        .unwrap();
    let ingress = |ingress: &str, secret: &str, host: &str| -> Arc<Ingress> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": ingress, "namespace": name, "uid": format!("uid-{ingress}"),
                    "resourceVersion": "1",
                    "annotations": {"sidecert.io/issue-temporary-certificate": "true"}},
                "spec": {
                    "tls": [{"hosts": [host], "secretName": secret}],
                    "rules": [{"host": host, "http": {"paths": [{"path": "/", "pathType": "Prefix",
                        "backend": {"service": {"name": "web", "port": {"number": 80}}}}]}}]
                }
            }))
            .unwrap(),
        )
    };
    let web: Arc<Service> = Arc::new(
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": name},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}
        }))
        .unwrap(),
    );
    let first = ingress("db", "team-db", "db.second.example");
    let lookup = Arc::new(CatchingUp {
        looks: AtomicUsize::new(0),
        first: Snapshot {
            ingresses: vec![first.clone()],
            services: vec![web.clone()],
        },
        later: Snapshot {
            ingresses: vec![first, ingress("late", "late-tls", "late.second.example")],
            services: vec![web],
        },
    });
    let reviewer = reviewer_over(&client, lookup.clone());
    let body = create_review(
        &name,
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "web-", "labels": {"app": "web"}},
            "spec": {"containers": [{"name": "app", "image": "example.invalid/app:1"}]}
        }),
        false,
    );
    let pod = respond(&reviewer, &body).await;
    assert!(
        lookup.looks.load(Ordering::SeqCst) >= 2,
        "the review decided only once"
    );
    // team-db was asked about (foreign), late-tls never was: both are left out.
    assert!(pod["patch"].is_null(), "{pod}");
    assert!(
        pod["warnings"]
            .to_string()
            .contains(&format!("cannot tell in time whose Secret {name}/late-tls is")),
        "{pod}"
    );
    assert!(
        ns.api::<Role>()
            .get_opt("sidecert-default")
            .await
            .unwrap()
            .is_none(),
        "a Role naming a Secret the API server was not asked about"
    );
    ns.cleanup().await.unwrap();
}
