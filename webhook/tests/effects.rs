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
    // The Role grants no `create` on Secrets or Leases: the webhook makes what it names.
    // The account Secret, empty and sidecert's:
    let secrets = "/api/v1/namespaces/shop/secrets";
    expect(
        &mut handle,
        Method::GET,
        &format!("{secrets}/sidecert-acme-account-0123456789ab"),
    )
    .await;
    reply(StatusCode::NOT_FOUND, not_found());
    let account = expect(&mut handle, Method::POST, secrets).await;
    assert_eq!(account["metadata"]["name"], "sidecert-acme-account-0123456789ab");
    assert_eq!(
        account["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "sidecert"
    );
    assert_eq!(account["type"], "Opaque");
    assert!(account["data"].is_null(), "{account}");
    reply(StatusCode::CREATED, account);
    // The certificate's Lease, with no holder:
    let leases = "/apis/coordination.k8s.io/v1/namespaces/shop/leases";
    expect(&mut handle, Method::GET, &format!("{leases}/sidecert-web-tls")).await;
    reply(StatusCode::NOT_FOUND, not_found());
    let lease = expect(&mut handle, Method::POST, leases).await;
    assert_eq!(lease["metadata"]["name"], "sidecert-web-tls");
    assert!(lease["spec"].is_null(), "{lease}");
    reply(StatusCode::CREATED, lease);
    let roles = "/apis/rbac.authorization.k8s.io/v1/namespaces/shop/roles";
    expect(&mut handle, Method::GET, &format!("{roles}/sidecert-web")).await;
    reply(StatusCode::NOT_FOUND, not_found());
    let role_body = expect(&mut handle, Method::POST, roles).await;
    assert_eq!(role_body["metadata"]["name"], "sidecert-web");
    assert_eq!(
        role_body["rules"],
        json!([
            {"apiGroups":[""],"resources":["secrets"],"verbs":["get","list","watch","update","patch"],
             "resourceNames":["sidecert-acme-account-0123456789ab","web-tls"]},
            {"apiGroups":["coordination.k8s.io"],"resources":["leases"],
             "verbs":["get","list","watch","update","patch"],"resourceNames":["sidecert-web-tls"]},
            {"apiGroups":["","events.k8s.io"],"resources":["events"],"verbs":["create","patch"]},
            // The leader watches its solver Service's EndpointSlices, selected by label.
            {"apiGroups":["discovery.k8s.io"],"resources":["endpointslices"],"verbs":["list","watch"]},
            // The operator's EAB Secret is only read.
            {"apiGroups":[""],"resources":["secrets"],"verbs":["get"],"resourceNames":["ca-eab"]},
        ])
    );
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
    assert_eq!(rules.len(), 4);
    assert_eq!(rules[0].resource_names.as_deref().unwrap(), ["a-tls", "b-tls"]);
    assert_eq!(
        rules[1].resource_names.as_deref().unwrap(),
        ["sidecert-a-tls", "sidecert-b-tls"]
    );
}

#[test]
fn a_secret_and_a_lease_of_one_name_keep_each_others_rights() {
    // The Lease of the certificate web-tls is sidecert-web-tls; a Pod sharing the
    // ServiceAccount may name a certificate Secret sidecert-web-tls. Its merge took the Lease
    // name out of the Lease rule (the names mentioned were pooled across resources), and the
    // running sidecar of web-tls lost its Lease.
    let have = role(
        "shop",
        "web",
        &["web-tls".into()],
        &[],
        &["sidecert-web-tls".into()],
    );
    let want = role(
        "shop",
        "web",
        &["sidecert-web-tls".into()],
        &[],
        &["sidecert-sidecert-web-tls".into()],
    );
    let merged = merge_role(&have, &want).unwrap();
    let rules = merged.rules.unwrap();
    assert_eq!(
        rules[0].resource_names.as_deref().unwrap(),
        ["sidecert-web-tls", "web-tls"]
    );
    assert_eq!(
        rules[1].resource_names.as_deref().unwrap(),
        ["sidecert-sidecert-web-tls", "sidecert-web-tls"]
    );
}

#[test]
fn merging_drops_names_sidecert_never_writes() {
    // A name planted in a sidecert Role (with a stolen token, before the policy checked
    // names): "" grants a list of every Secret, and a Lease not named sidecert-* is another
    // app's. The policy now refuses a Role holding either, so the merge must drop them, or
    // the Role could never be written again.
    let mut have = role(
        "shop",
        "web",
        &["web-tls".into()],
        &[],
        &["sidecert-web-tls".into()],
    );
    let rules = have.rules.as_mut().unwrap();
    rules[0].resource_names.as_mut().unwrap().push(String::new());
    rules[1]
        .resource_names
        .as_mut()
        .unwrap()
        .push("app-leader".into());
    let want = role(
        "shop",
        "web",
        &["web-tls".into()],
        &[],
        &["sidecert-web-tls".into()],
    );
    let merged = merge_role(&have, &want).expect("the planted names go");
    let rules = merged.rules.unwrap();
    assert_eq!(rules[0].resource_names.as_deref().unwrap(), ["web-tls"]);
    assert_eq!(rules[1].resource_names.as_deref().unwrap(), ["sidecert-web-tls"]);
}

#[test]
fn merging_adds_the_endpointslice_rule_to_an_older_role() {
    let mut old = role("shop", "web", &["a-tls".into()], &[], &["sidecert-a-tls".into()]);
    old.rules
        .as_mut()
        .unwrap()
        .retain(|r| r.resources.as_deref() != Some(&["endpointslices".to_owned()][..]));
    assert_eq!(old.rules.as_ref().unwrap().len(), 3);
    let want = role("shop", "web", &["a-tls".into()], &[], &["sidecert-a-tls".into()]);
    let merged = merge_role(&old, &want).expect("the missing rule is added");
    let rules = merged.rules.unwrap();
    assert_eq!(rules.len(), 4);
    assert_eq!(rules[3].api_groups.as_deref().unwrap(), ["discovery.k8s.io"]);
    assert_eq!(rules[3].verbs, ["list", "watch"]);
    assert!(rules[3].resource_names.is_none());
}

#[test]
fn merging_prunes_what_older_versions_granted_too_broadly() {
    // A Role as versions before this one wrote it: unnamed `create` on Secrets and Leases,
    // the EAB Secret in the read-write rule, names unsorted, and (39719a4) a Lease rule whose
    // empty name list the API server read back as no list at all: every Lease.
    let old: k8s_openapi::api::rbac::v1::Role = serde_json::from_value(json!({
        "metadata": {"name": "sidecert-web", "namespace": "shop",
                     "labels": {"app.kubernetes.io/managed-by": "sidecert"}},
        "rules": [
            {"apiGroups":[""],"resources":["secrets"],"verbs":["get","list","watch","update","patch"],
             "resourceNames":["web-tls","ca-eab","old-tls"]},
            {"apiGroups":[""],"resources":["secrets"],"verbs":["create"]},
            {"apiGroups":["coordination.k8s.io"],"resources":["leases"],
             "verbs":["get","list","watch","update","patch"]},
            {"apiGroups":["coordination.k8s.io"],"resources":["leases"],"verbs":["create"]},
            {"apiGroups":["","events.k8s.io"],"resources":["events"],"verbs":["create","patch"]},
            {"apiGroups":["discovery.k8s.io"],"resources":["endpointslices"],"verbs":["list","watch"]},
        ]
    }))
    .unwrap();
    let want = role(
        "shop",
        "web",
        &["web-tls".into()],
        &["ca-eab".into()],
        &["sidecert-web-tls".into()],
    );
    let merged = merge_role(&old, &want).expect("pruned");
    assert_eq!(
        serde_json::to_value(&merged.rules).unwrap(),
        json!([
            // old-tls is not the wanted Role's to judge (pruning unused names is separate).
            {"apiGroups":[""],"resources":["secrets"],"verbs":["get","list","watch","update","patch"],
             "resourceNames":["old-tls","web-tls"]},
            {"apiGroups":["","events.k8s.io"],"resources":["events"],"verbs":["create","patch"]},
            {"apiGroups":["discovery.k8s.io"],"resources":["endpointslices"],"verbs":["list","watch"]},
            {"apiGroups":["coordination.k8s.io"],"resources":["leases"],
             "verbs":["get","list","watch","update","patch"],"resourceNames":["sidecert-web-tls"]},
            {"apiGroups":[""],"resources":["secrets"],"verbs":["get"],"resourceNames":["ca-eab"]},
        ])
    );
    // Once in line, nothing more to write.
    assert!(merge_role(&merged, &want).is_none());
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
            // The account Secret and the remaining Lease exist already.
            for path in [
                "/api/v1/namespaces/shop/secrets/sidecert-acme-account-0123456789ab",
                "/apis/coordination.k8s.io/v1/namespaces/shop/leases/sidecert-api-tls",
            ] {
                expect(&mut handle, Method::GET, path).await;
                let name = path.rsplit('/').next().unwrap();
                reply(
                    StatusCode::OK,
                    json!({"apiVersion":"meta.k8s.io/v1","kind":"PartialObjectMetadata",
                           "metadata":{"name":name,"namespace":"shop",
                                       "labels":{"app.kubernetes.io/managed-by":"sidecert"}}}),
                );
            }
            let roles = "/apis/rbac.authorization.k8s.io/v1/namespaces/shop/roles";
            expect(&mut handle, Method::GET, &format!("{roles}/sidecert-web")).await;
            reply(StatusCode::NOT_FOUND, not_found());
            let role_body = expect(&mut handle, Method::POST, roles).await;
            assert_eq!(
                role_body["rules"][0]["resourceNames"],
                json!(["api-tls", "sidecert-acme-account-0123456789ab"])
            );
            assert_eq!(
                role_body["rules"][1]["resourceNames"],
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

#[tokio::test(flavor = "current_thread")]
async fn a_secret_that_could_not_be_made_sidecerts_gets_no_role() {
    // The create fails (500), or answers 409 and the Secret is gone again (whose it was is
    // unknown), or the API server does not answer within the budget: the Secret may not be
    // sidecert's, so no Role names it (and with no certificate left, none is written).
    for case in ["500", "409 then 404", "no answer"] {
        let (exec, mut handle) = executor();
        let effects = vec![
            Effect::Rbac {
                namespace: "shop".into(),
                service_account: "web".into(),
                certificates: vec!["web-tls".into()],
                account: "sidecert-acme-account-0123456789ab".into(),
                eab: None,
                leases: vec!["sidecert-web-tls".into()],
            },
            Effect::TemporarySecret {
                namespace: "shop".into(),
                name: "web-tls".into(),
                domains: vec!["shop.example".into()],
            },
        ];
        let budget = Duration::from_millis(300);
        let task = tokio::spawn(async move { exec.apply(&effects, budget).await });
        let secret = "/api/v1/namespaces/shop/secrets/web-tls";
        expect(&mut handle, Method::GET, secret).await;
        if case != "no answer" {
            reply(StatusCode::NOT_FOUND, not_found());
            expect(&mut handle, Method::POST, "/api/v1/namespaces/shop/secrets").await;
        }
        match case {
            "500" => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"kind":"Status","apiVersion":"v1","status":"Failure","reason":"InternalError","code":500,"message":"etcd"}),
            ),
            "409 then 404" => {
                reply(
                    StatusCode::CONFLICT,
                    json!({"kind":"Status","apiVersion":"v1","status":"Failure","reason":"AlreadyExists","code":409,"message":"exists"}),
                );
                expect(&mut handle, Method::GET, secret).await;
                reply(StatusCode::NOT_FOUND, not_found());
            }
            _ => {} // the GET stays unanswered (its response is held in STASH)
        }
        let failures = task.await.unwrap();
        assert!(
            matches!(&failures[..], [(Effect::TemporarySecret { name, .. }, _)] if name == "web-tls"),
            "{case}: {failures:?}"
        );
        if case == "no answer" {
            assert_eq!(failures[0].1.metric_label(), "timeout", "{case}");
        }
        // No Role, no RoleBinding, no account Secret or Lease: nothing more was asked.
        assert!(
            matches!(
                tokio::time::timeout(Duration::from_millis(50), handle.next_request()).await,
                Err(_) | Ok(None)
            ),
            "{case}"
        );
        STASH.with(|s| s.borrow_mut().take());
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
        // Nothing on Secrets or Leases without a name: no get or update on every Secret,
        // and no `create`, which cannot be narrowed by name.
        if rule.resources.as_deref() == Some(&["secrets".to_owned()][..])
            || rule.resources.as_deref() == Some(&["leases".to_owned()][..])
        {
            panic!("{rule:?}");
        }
    }
}
