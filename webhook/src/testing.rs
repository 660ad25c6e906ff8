//! Fixtures the unit tests of several modules share: an Ingress, Pods, solver Services, and
//! a mocked API server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::{
    core::v1::{Pod, Service},
    networking::v1::Ingress,
};
use kube::{Client, client::Body};
use serde_json::{Value, json};
use tower_test::mock;

pub fn ingress(annotated: bool, with_route: bool) -> Ingress {
    let mut paths = vec![json!({"path": "/", "pathType": "Prefix",
        "backend": {"service": {"name": "web", "port": {"number": 80}}}})];
    if with_route {
        paths.insert(
            0,
            json!({"path": "/.well-known/acme-challenge/", "pathType": "ImplementationSpecific",
            "backend": {"service": {"name": "web-sidecert-solver", "port": {"name": "http"}}}}),
        );
    }
    let annotations = if annotated {
        json!({"sidecert.io/issue-temporary-certificate": "true"})
    } else {
        json!({})
    };
    serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
        "metadata": {"name": "web", "namespace": "shop", "uid": "u-1", "generation": 3,
                     "resourceVersion": "7", "annotations": annotations},
        "spec": {"tls": [{"hosts": ["web.shop.example"], "secretName": "web-tls"}],
                 "rules": [{"host": "web.shop.example", "http": {"paths": paths}}]}
    }))
    .unwrap()
}

pub fn pod(name: &str, labels: Value, annotations: Value, owner: Option<(&str, &str)>) -> Pod {
    let owners = owner.map_or(json!([]), |(kind, n)| {
        json!([{"apiVersion": "apps/v1", "kind": kind, "name": n, "uid": "o", "controller": true}])
    });
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels, "annotations": annotations, "ownerReferences": owners},
        "spec": {"containers": [{"name": "app", "image": "example/app"}]}
    }))
    .unwrap()
}

pub fn solver(owners: Value, managed: bool) -> Service {
    let labels = if managed {
        json!({"app.kubernetes.io/managed-by": "sidecert"})
    } else {
        json!({})
    };
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web-sidecert-solver", "namespace": "shop", "uid": "s-1",
                     "resourceVersion": "9", "labels": labels, "ownerReferences": owners},
        "spec": {"selector": {"app": "web"}, "publishNotReadyAddresses": true}
    }))
    .unwrap()
}

pub fn owner(uid: &str) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "name": "x", "uid": uid})
}

pub type Handle = mock::Handle<Request<Body>, Response<Body>>;

pub fn client() -> (Client, Handle) {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(svc, "default"), handle)
}

pub async fn next(
    handle: &mut Handle,
    method: Method,
    path: &str,
    status: StatusCode,
    reply: Value,
) -> Value {
    let (req, send) = handle.next_request().await.expect("a request");
    assert_eq!(req.method(), method, "{}", req.uri());
    assert_eq!(req.uri().path(), path);
    let query = req.uri().query().unwrap_or_default().to_owned();
    let body = req.into_body().collect_bytes().await.unwrap();
    send.send_response(
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(&reply).unwrap()))
            .unwrap(),
    );
    if body.is_empty() {
        json!({ "query": query })
    } else {
        serde_json::from_slice(&body).unwrap()
    }
}
