//! A Pod the watch caches do not select is looked up again on the real API server: a cache
//! that has not seen the Ingress yet (here: an empty one) still gets the Pod injected.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{sync::Arc, time::Duration};

use k8s_openapi::api::{core::v1::Service, networking::v1::Ingress};
use kube::{Client, Config, api::PostParams};
use prometheus::core::Collector;
use serde_json::{Value, json};
use sidecert_e2e::Plane;
use sidecert_webhook::{
    AcmeDefaults, Context, Reviewer, SidecarSettings, effects::Executor, metrics::Metrics,
    selection::Snapshot,
};

fn reviewer(client: Client) -> Reviewer {
    let ctx = Context {
        sidecar: SidecarSettings::default(),
        acme: AcmeDefaults::default(),
        lookup: Arc::new(Snapshot::default()),
    };
    let executor = Executor::new(client, Arc::new(Snapshot::default()), Duration::from_secs(5));
    Reviewer::new(ctx, Metrics::new().unwrap(), Some(executor))
}

fn review(namespace: &str, app: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": format!("live-{app}"),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace, "operation": "CREATE", "userInfo": {}, "dryRun": true,
            "object": {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"generateName": format!("{app}-"), "labels": {"app": app}},
                "spec": {"containers": [{"name": "app", "image": "example.invalid/app:1"}]}
            }
        }
    }))
    .unwrap()
}

/// The response's patch, if any.
async fn patch_of(reviewer: &Reviewer, body: &[u8]) -> Option<String> {
    let out: Value = serde_json::from_slice(&reviewer.review(body).await.unwrap()).unwrap();
    assert_eq!(out["response"]["allowed"], true);
    out["response"]["patch"].as_str().map(str::to_owned)
}

fn count(reviewer: &Reviewer, result: &str) -> u64 {
    reviewer.metrics.live_lookups.with_label_values(&[result]).get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_the_cache_misses_is_selected_from_the_api_server() {
    sidecert_webhook::install_crypto_provider();
    let plane = Plane::get().await.expect("local plane");
    let ns = plane.namespace("live", true).await.unwrap();
    let bare = plane.namespace("live-bare", true).await.unwrap();
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80}]}
    }))
    .unwrap();
    ns.api::<Service>()
        .create(&PostParams::default(), &service)
        .await
        .unwrap();
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

    let reviewer = reviewer(plane.client().await.unwrap());
    // Behind the annotated Ingress: injected although the cache is empty.
    let patch = patch_of(&reviewer, &review(ns.name(), "web"))
        .await
        .expect("a Pod behind the annotated Ingress is patched");
    assert!(!patch.is_empty());
    assert_eq!(count(&reviewer, "selected"), 1);
    // Not behind it, or in a namespace without annotated Ingresses: unchanged.
    assert_eq!(patch_of(&reviewer, &review(ns.name(), "db")).await, None);
    assert_eq!(patch_of(&reviewer, &review(bare.name(), "web")).await, None);
    assert_eq!(count(&reviewer, "not_selected"), 2);

    // An API server the webhook cannot reach: the cached answer stands, at once.
    let mut config = Config::new("https://127.0.0.1:1".parse().unwrap());
    config.connect_timeout = Some(Duration::from_secs(1));
    let unreachable = reviewer_unreachable(config);
    let started = std::time::Instant::now();
    assert_eq!(patch_of(&unreachable, &review(ns.name(), "web")).await, None);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        count(&unreachable, "selected") + count(&unreachable, "not_selected"),
        0
    );
    let errors: u64 = unreachable
        .metrics
        .live_lookups
        .collect()
        .iter()
        .flat_map(|family| family.get_metric())
        .map(|m| m.get_counter().get_value() as u64)
        .sum();
    assert_eq!(errors, 1);

    ns.cleanup().await.unwrap();
    bare.cleanup().await.unwrap();
}

fn reviewer_unreachable(config: Config) -> Reviewer {
    reviewer(Client::try_from(config).unwrap())
}
