//! Admission is not trusted input: a review sent straight to the webhook's port, forged for
//! `kube-system` or a namespace that did not opt in, changes nothing and creates nothing.
//! The webhook asks the API server which namespaces opted in (a watch, and a live list when
//! a namespace was labelled a moment ago), against the real API server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use k8s_openapi::api::{
    core::v1::{Namespace, Secret, Service},
    networking::v1::Ingress,
    rbac::v1::{Role, RoleBinding},
};
use kube::{Api, api::PostParams};
use serde_json::{Value, json};
use sidecert_e2e::{Plane, TestNamespace};
use sidecert_webhook::{Lookup, kube::NamespaceGate, mutate::Snapshot};

mod common;
use common::{create_review, respond, reviewer_over, warned};

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

fn refused(response: &Value) -> bool {
    response["patch"].is_null() && warned(response, "is not one sidecert serves")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_reviews_for_namespaces_that_did_not_opt_in_change_nothing() {
    sidecert_webhook::install_crypto_provider();
    let plane = Plane::get().await.expect("local plane");
    let client = plane.client().await.unwrap();
    let labelled = plane.namespace("forged-on", true).await.unwrap();
    let unlabelled = plane.namespace("forged-off", false).await.unwrap();
    let gate = NamespaceGate::start(client.clone(), "sidecert.io/injection=enabled", OWN);
    assert!(gate.wait_until_ready().await);
    let reviewer = reviewer_over(&client, Arc::new(Snapshot::default())).with_namespace_gate(gate);

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
        !has_sidecar_role(&theirs).await,
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

/// Whether the namespace holds the sidecar Role of its `default` ServiceAccount.
async fn has_sidecar_role(ns: &TestNamespace) -> bool {
    ns.api::<Role>()
        .get_opt("sidecert-default")
        .await
        .unwrap()
        .is_some()
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
        !has_sidecar_role(&ns).await,
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

/// An annotated Ingress of `namespace` with these TLS entries (Secret, host), each host's rule
/// going to the Service `web`.
fn annotated_ingress(namespace: &str, name: &str, tls: &[(&str, &str)]) -> Arc<Ingress> {
    let entries: Vec<Value> = tls
        .iter()
        .map(|(secret, host)| json!({"hosts": [host], "secretName": secret}))
        .collect();
    let mut hosts: Vec<&str> = tls.iter().map(|(_, h)| *h).collect();
    hosts.sort_unstable();
    hosts.dedup();
    let rules: Vec<Value> = hosts
        .iter()
        .map(|host| {
            json!({"host": host, "http": {"paths": [{"path": "/", "pathType": "Prefix",
                "backend": {"service": {"name": "web", "port": {"number": 80}}}}]}})
        })
        .collect();
    Arc::new(
        serde_json::from_value(json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}"),
                "resourceVersion": "1",
                "annotations": {"sidecert.io/issue-temporary-certificate": "true"}},
            "spec": {"tls": entries, "rules": rules}
        }))
        .unwrap(),
    )
}

fn web_service(namespace: &str) -> Arc<Service> {
    Arc::new(
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": namespace},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}
        }))
        .unwrap(),
    )
}

/// A review of a Pod labelled `app: web` (selected through the Service `web`).
fn web_pod_review(namespace: &str) -> Vec<u8> {
    create_review(
        namespace,
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "web-", "labels": {"app": "web"}},
            "spec": {"containers": [{"name": "app", "image": "example.invalid/app:1"}]}
        }),
        false,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_gets_the_hosts_next_entry_when_the_first_is_someone_elses() {
    sidecert_webhook::install_crypto_provider();
    let plane = Plane::get().await.expect("local plane");
    let client = plane.client().await.unwrap();
    let ns = plane.namespace("forged-next", true).await.unwrap();
    let name = ns.name().to_owned();
    for theirs in ["their-tls", "their-2", "their-3"] {
        ns.api::<Secret>()
            .create(&PostParams::default(), &unlabelled_secret(theirs))
            .await
            .unwrap();
    }
    // The host's first three TLS entries name other teams' Secrets, its fourth one sidecert
    // may write. The Ingress's challenge route goes to the fourth; the Pod behind it got
    // nothing (its selection knew only the first entry, which was then left out), and then,
    // finding one more Secret per decision, ran out of decisions before the fourth.
    let host = "web.next.example";
    let ingress = annotated_ingress(
        &name,
        "web",
        &[
            ("their-tls", host),
            ("their-2", host),
            ("their-3", host),
            ("own-tls", host),
        ],
    );
    let lookup = Arc::new(Snapshot {
        ingresses: vec![ingress.clone()],
        services: vec![web_service(&name)],
        ..Snapshot::default()
    });
    let reviewer = reviewer_over(&client, lookup);
    let mut object = serde_json::to_value(ingress.as_ref()).unwrap();
    object["metadata"].as_object_mut().unwrap().remove("uid");
    let body = create_review(&name, object, false);
    let ing = respond(&reviewer, &body).await;
    assert!(ing["patch"].is_string(), "the host's challenge route: {ing}");
    assert!(ing["warnings"].to_string().contains("their-tls"), "{ing}");
    let pod = respond(&reviewer, &web_pod_review(&name)).await;
    assert!(pod["patch"].is_string(), "{pod}");
    assert!(
        pod["warnings"]
            .to_string()
            .contains(&format!("Secret {name}/their-tls exists and is not sidecert's")),
        "{pod}"
    );
    let role = ns.api::<Role>().get("sidecert-default").await.unwrap();
    let names = serde_json::to_value(&role.rules).unwrap().to_string();
    assert!(names.contains("\"own-tls\""), "{names}");
    assert!(
        !names.contains("their-"),
        "a right on another team's Secret: {names}"
    );
    let theirs = ns.api::<Secret>().get("their-tls").await.unwrap();
    assert!(theirs.metadata.labels.is_none(), "{theirs:?}");
    ns.cleanup().await.unwrap();
}

/// One more Ingress at every look at a namespace: what watch caches that keep catching up
/// while one review decides again and again answer.
struct Growing {
    looks: AtomicUsize,
    ingresses: Vec<Arc<Ingress>>,
    services: Vec<Arc<Service>>,
}

impl Lookup for Growing {
    fn ingresses(&self, _namespace: &str) -> Vec<Arc<Ingress>> {
        let look = self.looks.fetch_add(1, Ordering::SeqCst);
        self.ingresses.iter().take(look + 1).cloned().collect()
    }

    fn service(&self, _namespace: &str, name: &str) -> Option<Arc<Service>> {
        self.services
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(name))
            .cloned()
    }

    fn services(&self, _namespace: &str) -> Vec<Arc<Service>> {
        self.services.clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_a_decision_made_again_finds_are_asked_about_and_never_granted_unasked() {
    sidecert_webhook::install_crypto_provider();
    let plane = Plane::get().await.expect("local plane");
    let client = plane.client().await.unwrap();
    let ns = plane.namespace("forged-again", true).await.unwrap();
    let name = ns.name().to_owned();
    // Every decision finds one more Ingress, each naming another team's Secret. The names
    // the second and third decisions find are asked about (and refused as someone else's);
    // the name the last decision finds was never asked about, and is left out as unknown.
    let secrets = ["team-0", "team-1", "team-2", "team-3"];
    for secret in secrets {
        ns.api::<Secret>()
            .create(&PostParams::default(), &unlabelled_secret(secret))
            .await
            .unwrap();
    }
    let lookup = Arc::new(Growing {
        looks: AtomicUsize::new(0),
        ingresses: secrets
            .iter()
            .map(|s| annotated_ingress(&name, s, &[(s, &format!("{s}.again.example"))]))
            .collect(),
        services: vec![web_service(&name)],
    });
    let reviewer = reviewer_over(&client, lookup.clone());
    let pod = respond(&reviewer, &web_pod_review(&name)).await;
    assert!(
        lookup.looks.load(Ordering::SeqCst) >= 3,
        "the review decided fewer than three times"
    );
    assert!(pod["patch"].is_null(), "{pod}");
    let warnings = pod["warnings"].to_string();
    for asked in ["team-0", "team-1", "team-2"] {
        assert!(
            warnings.contains(&format!("Secret {name}/{asked} exists and is not sidecert's")),
            "{asked} was asked about: {warnings}"
        );
    }
    assert!(
        warnings.contains(&format!("cannot tell in time whose Secret {name}/team-3 is")),
        "{warnings}"
    );
    assert!(
        !has_sidecar_role(&ns).await,
        "a Role naming a Secret the API server was not asked about"
    );
    ns.cleanup().await.unwrap();
}
