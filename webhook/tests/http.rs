//! The HTTP handlers through actix's test utilities.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use actix_web::{App, http::StatusCode, test, web};
use serde_json::Value;
use sidecert_webhook::{
    AcmeDefaults, Context, Reviewer, SidecarSettings,
    admission::{AppState, Limits, Readiness, routes},
    metrics::Metrics,
    mutate::Snapshot,
};

fn state(ready: bool) -> web::Data<AppState> {
    let ctx = Context {
        sidecar: SidecarSettings::default(),
        acme: AcmeDefaults::default(),
        lookup: Arc::new(Snapshot::default()),
        secrets: Default::default(),
        hosts: Default::default(),
    };
    web::Data::new(AppState::new(
        Reviewer::new(ctx, Metrics::new().unwrap(), None),
        Readiness::new(ready, true),
        &Limits::default(),
    ))
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/tests/data/{name}.json", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

async fn post(body: Vec<u8>) -> (StatusCode, Vec<u8>) {
    let app = test::init_service(App::new().configure(routes(state(true)))).await;
    let req = test::TestRequest::post()
        .uri("/mutate")
        .insert_header(("content-type", "application/json"))
        .set_payload(body)
        .to_request();
    let resp = test::call_service(&app, req).await;
    let status = resp.status();
    (status, test::read_body(resp).await.to_vec())
}

#[actix_web::test]
async fn pod_review_is_patched_and_echoes_the_uid() {
    let (status, body) = post(fixture("pod-direct")).await;
    assert_eq!(status, StatusCode::OK);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["response"]["uid"], "5eedce27-0000-4000-8000-000000000001");
    assert_eq!(v["response"]["allowed"], true);
    assert_eq!(v["response"]["patchType"], "JSONPatch");
}

#[actix_web::test]
async fn not_json_is_400_with_a_reason() {
    let (status, body) = post(b"hello".to_vec()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let msg = String::from_utf8(body).unwrap();
    assert!(
        msg.contains("not an admission.k8s.io/v1 AdmissionReview"),
        "{msg}"
    );
}

#[actix_web::test]
async fn wrong_kind_or_no_request_is_400() {
    let (status, body) = post(br#"{"apiVersion":"v1","kind":"Pod","metadata":{}}"#.to_vec()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8(body).unwrap().contains("kind is \"Pod\""));
    let (status, body) =
        post(br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8(body).unwrap().contains("no request"));
    let (status, body) = post(
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"kind":{"group":"","version":"v1","kind":"Pod"}}}"#
            .to_vec(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8(body).unwrap().contains("missing field `uid`"));
}

#[actix_web::test]
async fn over_3_mib_is_413() {
    let mut body = fixture("pod-direct");
    body.resize(3 * 1024 * 1024 + 10, b' ');
    let (status, _) = post(body).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[actix_web::test]
async fn unknown_kind_is_allowed_with_a_warning() {
    let (status, body) = post(fixture("service-unknown-kind")).await;
    assert_eq!(status, StatusCode::OK);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["response"]["allowed"], true);
    assert_eq!(v["response"]["uid"], "5eedce27-0000-4000-8000-00000000000c");
    assert!(v["response"]["warnings"][0].as_str().unwrap().contains("Service"));
}

#[actix_web::test]
async fn health_and_readiness() {
    let app = test::init_service(App::new().configure(routes(state(false)))).await;
    let resp = test::call_service(&app, test::TestRequest::get().uri("/healthz").to_request()).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = test::call_service(&app, test::TestRequest::get().uri("/readyz").to_request()).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
}

#[actix_web::test]
async fn metrics_count_reviews() {
    let st = state(true);
    let app = test::init_service(App::new().configure(routes(st.clone()))).await;
    let req = test::TestRequest::post()
        .uri("/mutate")
        .set_payload(fixture("pod-direct"))
        .to_request();
    let _ = test::call_service(&app, req).await;
    let text = String::from_utf8(st.reviewer.metrics.render()).unwrap();
    assert!(
        text.contains(r#"sidecert_webhook_requests_total{kind="pod",operation="CREATE",result="mutated"} 1"#),
        "{text}"
    );
    assert!(text.contains(r#"sidecert_webhook_injections_total{kind="pod"} 1"#));
    assert!(text.contains("sidecert_webhook_request_duration_seconds_bucket"));
}
