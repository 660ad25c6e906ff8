//! Side effects against a mocked API server (`tower_test::mock::pair` + `kube::Client::new`):
//! each request's method, path and body is asserted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{sync::Arc, time::Duration};

use http::{Method, Request, Response, StatusCode};
use kube::{Client, client::Body};
use serde_json::{Value, json};
use sidecert_webhook::{
    kube::Executor,
    mutate::{
        Effect, Snapshot,
        objects::{merge_role, role},
    },
};
use tower_test::mock;

type Handle = mock::Handle<Request<Body>, Response<Body>>;

fn executor() -> (Executor, Handle) {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    (
        Executor::new(client, Arc::new(Snapshot::default()), Duration::from_secs(5)),
        handle,
    )
}

async fn expect(handle: &mut Handle, method: Method, path: &str) -> Value {
    let (req, send) = handle.next_request().await.expect("a request");
    assert_eq!(req.method(), method, "{}", req.uri());
    assert_eq!(req.uri().path(), path);
    let body = req.into_body().collect_bytes().await.unwrap();
    let v = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body).unwrap()
    };
    STASH.with(|s| *s.borrow_mut() = Some(send));
    v
}

thread_local! {
    static STASH: std::cell::RefCell<Option<mock::SendResponse<Response<Body>>>> = const { std::cell::RefCell::new(None) };
}

fn reply(status: StatusCode, body: Value) {
    let send = STASH.with(|s| s.borrow_mut().take()).expect("pending request");
    send.send_response(
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap(),
    );
}

fn not_found() -> Value {
    json!({"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404,"message":"not found"})
}

#[tokio::test(flavor = "current_thread")]
async fn temporary_secret_is_created_when_absent() {
    let (exec, mut handle) = executor();
    let effect = Effect::TemporarySecret {
        namespace: "shop".into(),
        name: "web-tls".into(),
        domains: vec!["shop.example".into(), "www.shop.example".into()],
    };
    let task = tokio::spawn(async move { exec.apply_one(&effect).await });
    expect(
        &mut handle,
        Method::GET,
        "/api/v1/namespaces/shop/secrets/web-tls",
    )
    .await;
    reply(StatusCode::NOT_FOUND, not_found());
    let body = expect(&mut handle, Method::POST, "/api/v1/namespaces/shop/secrets").await;
    assert_eq!(body["type"], "kubernetes.io/tls");
    assert_eq!(body["metadata"]["annotations"]["sidecert.io/temporary"], "true");
    assert_eq!(
        body["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "sidecert"
    );
    assert!(body["data"]["tls.crt"].is_string() && body["data"]["tls.key"].is_string());
    reply(StatusCode::CREATED, body.clone());
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn existing_secret_is_never_touched() {
    // Sidecert's own (labelled): present, nothing to do. Someone else's: never written,
    // reported as foreign (it used to count as present, and the sidecar then got it).
    for (labels, foreign) in [
        (json!({"app.kubernetes.io/managed-by": "sidecert"}), false),
        (json!({}), true),
    ] {
        let (exec, mut handle) = executor();
        let effect = Effect::TemporarySecret {
            namespace: "shop".into(),
            name: "web-tls".into(),
            domains: vec!["shop.example".into()],
        };
        let task = tokio::spawn(async move { exec.apply_one(&effect).await });
        expect(
            &mut handle,
            Method::GET,
            "/api/v1/namespaces/shop/secrets/web-tls",
        )
        .await;
        reply(
            StatusCode::OK,
            json!({"apiVersion":"meta.k8s.io/v1","kind":"PartialObjectMetadata",
                   "metadata":{"name":"web-tls","namespace":"shop","labels": labels}}),
        );
        let result = task.await.unwrap();
        if foreign {
            assert!(
                matches!(&result, Err(sidecert_webhook::Error::Foreign { kind: "Secret", name, .. }) if name == "web-tls"),
                "{result:?}"
            );
        } else {
            result.unwrap();
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn rbac_is_created_then_merged() {
    let (exec, mut handle) = executor();
    let effect = Effect::Rbac {
        namespace: "shop".into(),
        service_account: "web".into(),
        certificates: vec!["web-tls".into()],
        account: "sidecert-acme-account-0123456789ab".into(),
        eab: Some("ca-eab".into()),
        leases: vec!["sidecert-web-tls".into()],
    };
    let task = tokio::spawn(async move { exec.apply_one(&effect).await });
    let roles = "/apis/rbac.authorization.k8s.io/v1/namespaces/shop/roles";
    expect(&mut handle, Method::GET, &format!("{roles}/sidecert-web")).await;
    reply(StatusCode::NOT_FOUND, not_found());
    let role_body = expect(&mut handle, Method::POST, roles).await;
    assert_eq!(role_body["metadata"]["name"], "sidecert-web");
    assert_eq!(
        role_body["rules"][0],
        json!({"apiGroups":[""],"resources":["secrets"],"verbs":["get","list","watch","update","patch"],
               "resourceNames":["web-tls","sidecert-acme-account-0123456789ab"]})
    );
    // The leader watches its solver Service's EndpointSlices, selected by label: no names.
    assert_eq!(
        role_body["rules"][5],
        json!({"apiGroups":["discovery.k8s.io"],"resources":["endpointslices"],"verbs":["list","watch"]})
    );
    // The operator's EAB Secret is only read.
    assert_eq!(
        role_body["rules"][6],
        json!({"apiGroups":[""],"resources":["secrets"],"verbs":["get"],"resourceNames":["ca-eab"]})
    );
    assert_eq!(role_body["rules"].as_array().unwrap().len(), 7);
    reply(StatusCode::CREATED, role_body);
    let rb = "/apis/rbac.authorization.k8s.io/v1/namespaces/shop/rolebindings";
    expect(&mut handle, Method::GET, &format!("{rb}/sidecert-web")).await;
    reply(StatusCode::NOT_FOUND, not_found());
    let binding = expect(&mut handle, Method::POST, rb).await;
    assert_eq!(
        binding["subjects"][0],
        json!({"kind":"ServiceAccount","name":"web","namespace":"shop"})
    );
    assert_eq!(binding["roleRef"]["name"], "sidecert-web");
    reply(StatusCode::CREATED, binding);
    task.await.unwrap().unwrap();
}

#[test]
fn merging_adds_only_missing_names() {
    let have = role("shop", "web", &["a-tls".into()], &[], &["sidecert-a-tls".into()]);
    assert!(merge_role(&have, &have).is_none());
    let want = role("shop", "web", &["b-tls".into()], &[], &["sidecert-b-tls".into()]);
    let merged = merge_role(&have, &want).unwrap();
    let rules = merged.rules.unwrap();
    assert_eq!(rules.len(), 6);
    assert_eq!(rules[0].resource_names.as_deref().unwrap(), ["a-tls", "b-tls"]);
    assert_eq!(
        rules[2].resource_names.as_deref().unwrap(),
        ["sidecert-a-tls", "sidecert-b-tls"]
    );
}

#[test]
fn merging_adds_the_endpointslice_rule_to_an_older_role() {
    let mut old = role("shop", "web", &["a-tls".into()], &[], &["sidecert-a-tls".into()]);
    old.rules
        .as_mut()
        .unwrap()
        .retain(|r| r.resources.as_deref() != Some(&["endpointslices".to_owned()][..]));
    assert_eq!(old.rules.as_ref().unwrap().len(), 5);
    let want = role("shop", "web", &["a-tls".into()], &[], &["sidecert-a-tls".into()]);
    let merged = merge_role(&old, &want).expect("the missing rule is added");
    let rules = merged.rules.unwrap();
    assert_eq!(rules.len(), 6);
    assert_eq!(rules[5].api_groups.as_deref().unwrap(), ["discovery.k8s.io"]);
    assert_eq!(rules[5].verbs, ["list", "watch"]);
    assert!(rules[5].resource_names.is_none());
}

#[tokio::test(flavor = "current_thread")]
async fn solver_service_copies_the_backend_selector() {
    let (exec, mut handle) = executor();
    let effect = Effect::SolverService {
        namespace: "shop".into(),
        name: "web-sidecert-solver".into(),
        backend: "web".into(),
        owner: None,
    };
    let task = tokio::spawn(async move { exec.apply_one(&effect).await });
    let svcs = "/api/v1/namespaces/shop/services";
    expect(&mut handle, Method::GET, &format!("{svcs}/web-sidecert-solver")).await;
    reply(StatusCode::NOT_FOUND, not_found());
    expect(&mut handle, Method::GET, &format!("{svcs}/web")).await;
    reply(
        StatusCode::OK,
        json!({"apiVersion":"v1","kind":"Service","metadata":{"name":"web","namespace":"shop"},
               "spec":{"selector":{"app":"web"},"ports":[{"port":80}]}}),
    );
    let body = expect(&mut handle, Method::POST, svcs).await;
    assert_eq!(body["spec"]["selector"], json!({"app":"web"}));
    assert_eq!(
        body["spec"]["ports"][0],
        json!({"name":"http","port":80,"targetPort":"sidecert-http","protocol":"TCP"})
    );
    assert_eq!(body["spec"]["publishNotReadyAddresses"], true);
    assert!(body["metadata"].get("ownerReferences").is_none());
    reply(StatusCode::CREATED, body);
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn api_failure_is_an_error_not_a_panic() {
    let (exec, mut handle) = executor();
    let effect = Effect::TemporarySecret {
        namespace: "shop".into(),
        name: "web-tls".into(),
        domains: vec!["shop.example".into()],
    };
    let task = tokio::spawn(async move { exec.apply(&[effect], Duration::from_secs(5)).await });
    expect(
        &mut handle,
        Method::GET,
        "/api/v1/namespaces/shop/secrets/web-tls",
    )
    .await;
    reply(
        StatusCode::FORBIDDEN,
        json!({"kind":"Status","apiVersion":"v1","status":"Failure","reason":"Forbidden","code":403,"message":"no"}),
    );
    let failures = task.await.unwrap();
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].1.metric_label(), "forbidden");
}

#[tokio::test(flavor = "current_thread")]
async fn whose_secrets_ours_foreign_absent_and_unknown() {
    // The owner of a Secret the API server does not tell (an error, or no answer in time)
    // is unknown, and that Secret is left out like a foreign one: it used to count as
    // absent, so the sidecar's Role could name another team's Secret.
    let (exec, mut handle) = executor();
    let task = tokio::spawn(async move {
        exec.secret_owners(
            "shop",
            &["ours", "theirs", "absent", "failing"],
            Duration::from_secs(5),
        )
        .await
    });
    for _ in 0..4 {
        let (req, send) = handle.next_request().await.expect("a request");
        let name = req.uri().path().rsplit('/').next().unwrap().to_owned();
        let meta = |labels: Value| {
            json!({"apiVersion":"meta.k8s.io/v1","kind":"PartialObjectMetadata",
                   "metadata":{"name": name, "namespace":"shop","labels": labels}})
        };
        let (status, body) = match name.as_str() {
            "ours" => (
                StatusCode::OK,
                meta(json!({"app.kubernetes.io/managed-by": "sidecert"})),
            ),
            "theirs" => (StatusCode::OK, meta(json!({}))),
            "absent" => (StatusCode::NOT_FOUND, not_found()),
            _ => (
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"kind":"Status","apiVersion":"v1","status":"Failure","reason":"InternalError","code":500,"message":"etcd"}),
            ),
        };
        send.send_response(
            Response::builder()
                .status(status)
                .body(Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap(),
        );
    }
    let owners = task.await.unwrap();
    let set = |names: &[&str]| {
        names
            .iter()
            .map(|n| (*n).to_owned())
            .collect::<std::collections::BTreeSet<_>>()
    };
    assert_eq!(owners.ours, set(&["ours"]));
    assert_eq!(owners.foreign, set(&["theirs"]));
    assert_eq!(owners.unknown, set(&["failing"]));
    assert_eq!(
        owners.left_out().keys().map(String::as_str).collect::<Vec<_>>(),
        ["failing", "theirs"]
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_secret_someone_else_creates_meanwhile_gets_no_right() {
    // The review found web-tls absent; by the create, another team has made it. The Role
    // is written only after the Secret's answer, and without it (they used to run at once,
    // and the Role named it whatever the create found). api-tls, which the review found to
    // be sidecert's, keeps its right. With no certificate left, no Role is written at all:
    // one with an empty list of Lease names would grant every Lease.
    for others in [true, false] {
        let (exec, mut handle) = executor();
        let mut certificates = vec!["web-tls".to_owned()];
        let mut leases = vec!["sidecert-web-tls".to_owned()];
        if others {
            certificates.push("api-tls".into());
            leases.push("sidecert-api-tls".into());
        }
        let effects = vec![
            Effect::Rbac {
                namespace: "shop".into(),
                service_account: "web".into(),
                certificates,
                account: "sidecert-acme-account-0123456789ab".into(),
                eab: None,
                leases,
            },
            Effect::TemporarySecret {
                namespace: "shop".into(),
                name: "web-tls".into(),
                domains: vec!["shop.example".into()],
            },
        ];
        let task = tokio::spawn(async move { exec.apply(&effects, Duration::from_secs(5)).await });
        let secret = "/api/v1/namespaces/shop/secrets/web-tls";
        expect(&mut handle, Method::GET, secret).await;
        reply(StatusCode::NOT_FOUND, not_found());
        expect(&mut handle, Method::POST, "/api/v1/namespaces/shop/secrets").await;
        reply(
            StatusCode::CONFLICT,
            json!({"kind":"Status","apiVersion":"v1","status":"Failure","reason":"AlreadyExists","code":409,"message":"exists"}),
        );
        expect(&mut handle, Method::GET, secret).await;
        reply(
            StatusCode::OK,
            json!({"apiVersion":"meta.k8s.io/v1","kind":"PartialObjectMetadata",
                   "metadata":{"name":"web-tls","namespace":"shop","labels":{"team":"db"}}}),
        );
        if others {
            let roles = "/apis/rbac.authorization.k8s.io/v1/namespaces/shop/roles";
            expect(&mut handle, Method::GET, &format!("{roles}/sidecert-web")).await;
            reply(StatusCode::NOT_FOUND, not_found());
            let role_body = expect(&mut handle, Method::POST, roles).await;
            assert_eq!(
                role_body["rules"][0]["resourceNames"],
                json!(["api-tls", "sidecert-acme-account-0123456789ab"])
            );
            assert_eq!(
                role_body["rules"][2]["resourceNames"],
                json!(["sidecert-api-tls"])
            );
            reply(StatusCode::CREATED, role_body);
            let rb = "/apis/rbac.authorization.k8s.io/v1/namespaces/shop/rolebindings";
            expect(&mut handle, Method::GET, &format!("{rb}/sidecert-web")).await;
            reply(StatusCode::NOT_FOUND, not_found());
            let binding = expect(&mut handle, Method::POST, rb).await;
            reply(StatusCode::CREATED, binding);
        }
        let failures = task.await.unwrap();
        assert!(
            matches!(&failures[..], [(Effect::TemporarySecret { .. }, sidecert_webhook::Error::Foreign { kind: "Secret", name, .. })] if name == "web-tls"),
            "{failures:?}"
        );
        // Nothing more was asked of the API server.
        assert!(matches!(
            tokio::time::timeout(Duration::from_millis(50), handle.next_request()).await,
            Err(_) | Ok(None)
        ));
    }
}

#[test]
fn a_role_never_names_an_empty_list() {
    let r = role("shop", "web", &[], &[], &[]);
    for rule in r.rules.iter().flatten() {
        assert!(
            rule.resource_names.as_ref().is_none_or(|n| !n.is_empty()),
            "{rule:?}"
        );
        // Without names, only the unnamed verbs remain: never get or update on every Secret.
        if rule.resources.as_deref() == Some(&["secrets".to_owned()][..]) {
            assert_eq!(rule.verbs, ["create"]);
        }
    }
}
