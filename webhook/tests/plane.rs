//! Integration tests against the local control plane: the webhook runs in-process on the
//! plane's gateway address, a MutatingWebhookConfiguration (url clientConfig, a CA made here
//! as caBundle) points the API server at it, and objects created through the API server
//! come back mutated. The webhook asks for the client certificate the API server presents
//! to webhooks (`--client-ca-file`), so every review here arrives authenticated.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{net::SocketAddr, time::Duration};

use k8s_openapi::api::{
    admissionregistration::v1::MutatingWebhookConfiguration,
    core::v1::{Namespace, Pod, Secret, Service},
    networking::v1::Ingress,
    rbac::v1::Role,
};
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde_json::json;
use sidecert_e2e::{Plane, create_until, wait_for};

mod common;
use common::{INGRESSES, PODS, TEST_LABEL, free_port, has_sidecar, in_own_runtime, pki, webhook_config};
use sidecert_webhook::{config::ServeArgs, mutate::container::default_mutation_args, server::serve};

fn pod(name: &str, labels: serde_json::Value, annotations: serde_json::Value) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels, "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "ghcr.io/sidecert/sidecar:0.1.0", "args": ["--help"]}]}
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_against_the_plane() {
    let plane = Plane::get().await.expect("local plane");
    sidecert_webhook::install_crypto_provider();
    let client = plane.client().await.unwrap();
    let ip = plane.gateway();
    let (ca, dir) = pki(ip, "plane");
    let port = free_port(ip);
    let run = format!("r{}", std::process::id());

    let mut mutation = default_mutation_args();
    mutation.acme_server = plane.pebble_directory().to_owned();
    mutation.acme_ca_bundle_file = Some(plane.pebble_ca_file().to_owned());
    let args = ServeArgs {
        listen: SocketAddr::from((ip, port)),
        metrics_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        tls_cert_file: Some(dir.join("tls.crt")),
        tls_key_file: Some(dir.join("tls.key")),
        // The plane's API server presents its webhook client certificate (cluster-up.sh):
        // every review below reaches the webhook authenticated.
        client_ca_file: Some(plane.webhook_client_ca_file().to_owned()),
        limits: Default::default(),
        self_signed: Default::default(),
        reconciler: Default::default(),
        tls_reload_interval: Duration::from_secs(2),
        workers: Some(1),
        side_effect_timeout: Duration::from_secs(4),
        shutdown_delay: Duration::ZERO,
        shutdown_timeout: Duration::from_secs(1),
        kubeconfig: Some(plane.kubeconfig().to_owned()),
        mutation,
    };
    // `serve` runs until a signal; its own thread and runtime end with the test process.
    in_own_runtime(move || async move {
        if let Err(e) = serve(args).await {
            eprintln!("webhook: {e}");
        }
    });
    wait_for(Duration::from_secs(20), || async move {
        tokio::net::TcpStream::connect((ip, port)).await.ok()
    })
    .await
    .expect("webhook listening");

    let hooks = Api::<MutatingWebhookConfiguration>::all(client.clone());
    let hook_name = format!("sidecert-webhook-test-{run}");
    hooks
        .create(
            &PostParams::default(),
            &webhook_config(
                &hook_name,
                &format!("https://{ip}:{port}/mutate"),
                Some(&ca),
                &run,
                "Ignore",
                &[PODS, INGRESSES],
            ),
        )
        .await
        .unwrap();

    let labelled = plane.namespace("whk", true).await.unwrap();
    let unlabelled = plane.namespace("whk-off", false).await.unwrap();
    let label = json!({"metadata": {"labels": {TEST_LABEL: run}}});
    for ns in [labelled.name(), unlabelled.name()] {
        Api::<Namespace>::all(client.clone())
            .patch(ns, &PatchParams::default(), &Patch::Merge(&label))
            .await
            .unwrap();
    }
    let result = std::panic::AssertUnwindSafe(scenarios(&labelled, &unlabelled));
    let outcome = futures::FutureExt::catch_unwind(result).await;

    let _ = hooks.delete(&hook_name, &DeleteParams::default()).await;
    if outcome.is_err() {
        plane.dump_on_failure(labelled.name()).await;
    }
    let _ = labelled.cleanup().await;
    let _ = unlabelled.cleanup().await;
    if let Err(p) = outcome {
        std::panic::resume_unwind(p);
    }
}

async fn scenarios(labelled: &sidecert_e2e::TestNamespace, unlabelled: &sidecert_e2e::TestNamespace) {
    let direct = json!({
        "sidecert.io/inject": "true",
        "sidecert.io/domains": "direct.shop.example",
        "sidecert.io/secret-name": "direct-tls"
    });
    let pods: Api<Pod> = labelled.api();
    let secrets: Api<Secret> = labelled.api();

    // The webhook config may take a moment to be picked up by the API server.
    let created = create_until(
        &pods,
        "direct",
        Duration::from_secs(20),
        |name| pod(name, json!({"app": "direct"}), direct.clone()),
        has_sidecar,
    )
    .await
    .expect("a Pod comes back with the sidecar");
    let ann = created.metadata.annotations.clone().unwrap();
    assert_eq!(ann["sidecert.io/status"], "injected");
    let spec = created.spec.as_ref().unwrap();
    let sidecar = spec
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == "sidecert")
        .expect("native sidecar");
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));

    let secret = secrets.get("direct-tls").await.expect("temporary Secret");
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    assert_eq!(
        secret.metadata.annotations.unwrap()["sidecert.io/temporary"],
        "true"
    );
    let role = labelled
        .api::<Role>()
        .get("sidecert-default")
        .await
        .expect("Role");
    let names = role.rules.unwrap()[0].resource_names.clone().unwrap();
    assert!(names.contains(&"direct-tls".to_owned()), "{names:?}");

    // Dry run: the answer is mutated, nothing is created.
    let dry = pods
        .create(
            &PostParams {
                dry_run: true,
                ..Default::default()
            },
            &pod(
                "dry",
                json!({"app": "dry"}),
                json!({"sidecert.io/inject": "true", "sidecert.io/domains": "dry.shop.example",
                       "sidecert.io/secret-name": "dry-tls"}),
            ),
        )
        .await
        .unwrap();
    assert!(has_sidecar(&dry));
    assert!(
        secrets.get_opt("dry-tls").await.unwrap().is_none(),
        "dry run created a Secret"
    );

    // A namespace without the label is untouched.
    let other = unlabelled
        .api::<Pod>()
        .create(
            &PostParams::default(),
            &pod("plain", json!({"app": "plain"}), direct.clone()),
        )
        .await
        .unwrap();
    assert!(!has_sidecar(&other));
    let annotations = other.metadata.annotations.unwrap_or_default();
    assert!(!annotations.contains_key("sidecert.io/status"));

    // Ingress: challenge route, temporary Secret, solver Service; then Pods behind it.
    let svc: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    }))
    .unwrap();
    labelled
        .api::<Service>()
        .create(&PostParams::default(), &svc)
        .await
        .unwrap();
    let ing: Ingress = serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
        "metadata": {"name": "web", "annotations": {"sidecert.io/issue-temporary-certificate": "true"}},
        "spec": {
            "tls": [{"hosts": ["web.shop.example"], "secretName": "web-tls"}],
            "rules": [{"host": "web.shop.example", "http": {"paths": [
                {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "web", "port": {"name": "http"}}}}
            ]}}]
        }
    }))
    .unwrap();
    let ing = labelled
        .api::<Ingress>()
        .create(&PostParams::default(), &ing)
        .await
        .unwrap();
    let paths = &ing.spec.unwrap().rules.unwrap()[0].http.clone().unwrap().paths;
    assert_eq!(paths.len(), 2);
    assert_eq!(paths[0].path.as_deref(), Some("/.well-known/acme-challenge/"));
    assert_eq!(
        paths[0].backend.service.as_ref().unwrap().name,
        "web-sidecert-solver"
    );
    let solver = labelled
        .api::<Service>()
        .get("web-sidecert-solver")
        .await
        .expect("solver Service");
    assert_eq!(solver.spec.unwrap().selector.unwrap()["app"], "web");
    secrets.get("web-tls").await.expect("Ingress temporary Secret");

    // A Pod behind the Ingress's backend, without annotations (the cache must see the Ingress).
    let web = create_until(
        &pods,
        "web",
        Duration::from_secs(20),
        |name| pod(name, json!({"app": "web"}), json!({})),
        has_sidecar,
    )
    .await
    .expect("the Pod behind the Ingress comes back with the sidecar");
    let certs = &web.metadata.annotations.unwrap()["sidecert.io/certificates"];
    assert!(certs.contains("web-tls"), "{certs}");
}
