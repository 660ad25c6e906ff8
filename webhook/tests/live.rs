//! A Pod the watch caches do not select, but which a cached Service selects, is checked
//! against the real API server: a cache that has seen the Services but not yet the Ingress
//! (the moment after one `kubectl apply`) still gets the Pod injected.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{sync::Arc, time::Duration};

use k8s_openapi::api::{
    core::v1::{Secret, Service},
    networking::v1::Ingress,
};
use kube::{
    Client, Config,
    api::{ListParams, PostParams},
};
use serde_json::{Value, json};
use sidecert_e2e::{Plane, TestNamespace};
use sidecert_webhook::{Reviewer, mutate::Snapshot};

mod common;
use common::{create_review, respond, reviewer_over};

fn new_reviewer(client: Client, cache: Snapshot) -> Reviewer {
    reviewer_over(&client, Arc::new(cache))
}

fn review(namespace: &str, labels: Value, annotations: Value, dry_run: bool) -> Vec<u8> {
    create_review(
        namespace,
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "p-", "labels": labels, "annotations": annotations},
            "spec": {"containers": [{"name": "app", "image": "example.invalid/app:1"}]}
        }),
        dry_run,
    )
}

fn pod(namespace: &str, app: &str) -> Vec<u8> {
    review(namespace, json!({"app": app}), json!({}), true)
}

/// `sidecert_webhook_live_lookups_total` by result.
fn lookups(reviewer: &Reviewer) -> Vec<(String, u64)> {
    use prometheus::core::Collector;
    let mut out: Vec<(String, u64)> = reviewer
        .metrics
        .live_lookups
        .collect()
        .iter()
        .flat_map(|family| family.get_metric())
        .map(|m| {
            let result = m
                .get_label()
                .first()
                .map(|l| l.value().to_owned())
                .unwrap_or_default();
            (result, m.get_counter().get_value() as u64)
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    out.sort();
    out
}

fn counts(pairs: &[(&str, u64)]) -> Vec<(String, u64)> {
    pairs.iter().map(|(r, n)| ((*r).to_owned(), *n)).collect()
}

async fn create_service(ns: &TestNamespace, name: &str) {
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 80}]}
    }))
    .unwrap();
    ns.api::<Service>()
        .create(&PostParams::default(), &service)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_the_cache_misses_is_selected_from_the_api_server() {
    sidecert_webhook::install_crypto_provider();
    let plane = Plane::get().await.expect("local plane");
    let ns = plane.namespace("live", true).await.unwrap();
    let bare = plane.namespace("live-bare", true).await.unwrap();
    for name in ["web", "api"] {
        create_service(&ns, name).await;
    }
    create_service(&bare, "web").await;
    let host = format!("web.{}.example", ns.name());
    let ingress: Ingress = serde_json::from_value(json!({
        "metadata": {"name": "web", "annotations": {"sidecert.io/issue-temporary-certificate": "true"}},
        "spec": {
            "tls": [{"hosts": [host], "secretName": "web-tls"}],
            "rules": [{"host": host, "http": {"paths": [{"path": "/", "pathType": "Prefix",
                "backend": {"service": {"name": "web", "port": {"number": 80}}}}]}}]
        }
    }))
    .unwrap();
    ns.api::<Ingress>()
        .create(&PostParams::default(), &ingress)
        .await
        .unwrap();

    // The cache: both namespaces' Services, not the Ingress.
    let client = plane.client().await.unwrap();
    let mut cache = Snapshot::default();
    for n in [&ns, &bare] {
        let list = n.api::<Service>().list(&ListParams::default()).await.unwrap();
        cache.services.extend(list.items.into_iter().map(Arc::new));
    }
    let reviewer = new_reviewer(client, cache.clone());

    // Behind the annotated Ingress: injected, with its side effects (the temporary Secret).
    let response = respond(
        &reviewer,
        &review(ns.name(), json!({"app": "web"}), json!({}), false),
    )
    .await;
    assert!(response["patch"].is_string(), "{response}");
    assert_eq!(lookups(&reviewer), counts(&[("selected", 1)]));
    let secret = ns.api::<Secret>().get_opt("web-tls").await.unwrap();
    assert!(secret.is_some(), "the temporary Secret is created");

    // No cached Service selects these Pods, so no Ingress can: no lookup.
    for labels in [json!({"app": "db"}), json!({})] {
        let response = respond(&reviewer, &review(ns.name(), labels, json!({}), true)).await;
        assert!(response["patch"].is_null(), "{response}");
    }
    assert_eq!(lookups(&reviewer), counts(&[("selected", 1)]));

    // Selected by a Service the Ingress does not route to: not injected.
    let response = respond(&reviewer, &pod(ns.name(), "api")).await;
    assert!(response["patch"].is_null(), "{response}");
    // Invalid annotations: the same single warning as from the cache.
    let response = respond(
        &reviewer,
        &review(
            ns.name(),
            json!({"app": "api"}),
            json!({"sidecert.io/inject": "true"}),
            true,
        ),
    )
    .await;
    let warnings = response["warnings"].as_array().cloned().unwrap_or_default();
    assert_eq!(warnings.len(), 1, "{response}");
    assert!(
        warnings[0].as_str().unwrap().contains("sidecert.io/domains"),
        "{response}"
    );
    assert_eq!(
        lookups(&reviewer),
        counts(&[("not_selected", 2), ("selected", 1)])
    );

    // No annotated Ingress in the namespace, as the cache says: no Service list.
    let response = respond(&reviewer, &pod(bare.name(), "web")).await;
    assert!(response["patch"].is_null(), "{response}");
    assert_eq!(
        lookups(&reviewer),
        counts(&[("cache_current", 1), ("not_selected", 2), ("selected", 1)])
    );

    // An API server the webhook cannot reach: the cached answer stands, and checks pause.
    let mut config = Config::new("https://127.0.0.1:1".parse().unwrap());
    config.connect_timeout = Some(Duration::from_secs(1));
    let unreachable = new_reviewer(Client::try_from(config).unwrap(), cache);
    let started = std::time::Instant::now();
    for _ in 0..2 {
        let response = respond(&unreachable, &pod(ns.name(), "web")).await;
        assert!(response["patch"].is_null(), "{response}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        lookups(&unreachable),
        counts(&[("api_unreachable", 1), ("paused", 1)])
    );

    ns.cleanup().await.unwrap();
    bare.cleanup().await.unwrap();
}
