//! Fixture-driven table tests: every captured AdmissionReview under `tests/data/` is
//! reviewed, its patch applied to the object and the result checked, then the mutated object
//! is reviewed again to show that nothing more is added.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{path::PathBuf, sync::Arc};

use rstest::rstest;
use serde_json::{Value, json};
use sidecert_webhook::{
    AcmeDefaults, Context, Reviewer, SidecarSettings,
    admission::parse,
    metrics::Metrics,
    mutate::{Effect, Snapshot},
};

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn cluster() -> Snapshot {
    let list: Value = serde_json::from_slice(&std::fs::read(data("cluster.json")).unwrap()).unwrap();
    let mut snap = Snapshot::default();
    for item in list["items"].as_array().unwrap() {
        match item["kind"].as_str().unwrap() {
            "Ingress" => snap
                .ingresses
                .push(Arc::new(serde_json::from_value(item.clone()).unwrap())),
            "Service" => snap
                .services
                .push(Arc::new(serde_json::from_value(item.clone()).unwrap())),
            k => panic!("unexpected {k}"),
        }
    }
    snap
}

fn context() -> Context {
    Context {
        sidecar: SidecarSettings::default(),
        acme: AcmeDefaults {
            email: Some("ops@shop.example".into()),
            ..AcmeDefaults::default()
        },
        lookup: Arc::new(cluster()),
        secrets: Default::default(),
        hosts: Default::default(),
    }
}

fn reviewer() -> Reviewer {
    Reviewer::new(context(), Metrics::new().unwrap(), None)
}

/// Reviews `review`; returns the response and the object with the patch applied.
async fn run(reviewer: &Reviewer, review: &Value) -> (Value, Value) {
    let out = reviewer
        .review(&serde_json::to_vec(review).unwrap())
        .await
        .unwrap();
    let resp: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(resp["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(resp["kind"], "AdmissionReview");
    let resp = resp["response"].clone();
    assert_eq!(resp["uid"], review["request"]["uid"], "uid echoed");
    assert_eq!(resp["allowed"], true);
    let mut object = review["request"]["object"].clone();
    if let Some(p) = resp["patch"].as_str() {
        assert_eq!(resp["patchType"], "JSONPatch");
        let bytes = base64_decode(p);
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        json_patch::patch(&mut object, &patch).unwrap();
    }
    (resp, object)
}

fn base64_decode(s: &str) -> Vec<u8> {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = T.iter().position(|t| *t == c).unwrap() as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

fn warnings(resp: &Value) -> Vec<String> {
    resp["warnings"]
        .as_array()
        .map(|a| a.iter().map(|w| w.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

fn sidecar(pod: &Value) -> &Value {
    pod["spec"]["initContainers"]
        .as_array()
        .into_iter()
        .chain(pod["spec"]["containers"].as_array())
        .flatten()
        .find(|c| c["name"] == "sidecert")
        .expect("sidecert container")
}

fn env(c: &Value, name: &str) -> Option<String> {
    c["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str().map(str::to_owned))
}

fn certificates(pod: &Value) -> Value {
    serde_json::from_str(
        pod["metadata"]["annotations"]["sidecert.io/certificates"]
            .as_str()
            .unwrap(),
    )
    .unwrap()
}

fn unchanged(resp: &Value, _obj: &Value) {
    assert!(resp.get("patch").is_none(), "no patch expected: {resp}");
}

fn direct(resp: &Value, pod: &Value) {
    assert!(warnings(resp).is_empty(), "{resp}");
    let init = pod["spec"]["initContainers"].as_array().unwrap();
    assert_eq!(init[0]["name"], "sidecert");
    let c = &init[0];
    assert_eq!(c["restartPolicy"], "Always");
    assert_eq!(c["image"], "ghcr.io/sidecert/sidecar:0.1.0");
    assert_eq!(c["command"], json!(["/sidecert-sidecar"]));
    assert_eq!(c["args"], json!(["run"]));
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["runAsUser"], 65532);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(
        c["ports"][0],
        json!({"name": "sidecert-http", "containerPort": 8089, "protocol": "TCP"})
    );
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], "sidecert-http");
    assert_eq!(env(c, "SIDECERT_ACME_PROFILE").as_deref(), Some("shortlived"));
    assert_eq!(env(c, "SIDECERT_ACME_EMAIL").as_deref(), Some("ops@shop.example"));
    assert_eq!(
        env(c, "SIDECERT_ACME_SERVER").as_deref(),
        Some("https://acme-v02.api.letsencrypt.org/directory")
    );
    let pod_ip = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "SIDECERT_POD_IP")
        .unwrap();
    assert_eq!(pod_ip["valueFrom"]["fieldRef"]["fieldPath"], "status.podIP");
    let a = &pod["metadata"]["annotations"];
    assert_eq!(a["sidecert.io/status"], "injected");
    assert_eq!(
        certificates(pod),
        json!([{"secretName": "api-tls", "domains": ["api.shop.example", "www.api.shop.example"]}])
    );
    // The application container is untouched.
    assert_eq!(pod["spec"]["containers"].as_array().unwrap().len(), 1);
}

fn direct_with_init(resp: &Value, pod: &Value) {
    direct(resp, pod);
    let init = pod["spec"]["initContainers"].as_array().unwrap();
    assert_eq!(init.len(), 2);
    assert_eq!(init[1]["name"], "migrate");
}

fn ingress_selected(resp: &Value, pod: &Value) {
    assert!(warnings(resp).is_empty(), "{resp}");
    assert_eq!(
        certificates(pod),
        json!([{"secretName": "web-tls", "domains": ["shop.example", "www.shop.example"],
                "solverService": "web-sidecert-solver"}])
    );
    // The env carries the same list: the leader waits for the solver's endpoints.
    assert_eq!(
        serde_json::from_str::<Value>(&env(sidecar(pod), "SIDECERT_CERTIFICATES").unwrap()).unwrap(),
        certificates(pod)
    );
    assert_eq!(pod["metadata"]["annotations"]["sidecert.io/status"], "injected");
    assert_eq!(sidecar(pod)["restartPolicy"], "Always");
}

fn overrides(_resp: &Value, pod: &Value) {
    let c = sidecar(pod);
    assert_eq!(
        env(c, "SIDECERT_ACME_SERVER").as_deref(),
        Some("https://acme-staging-v02.api.letsencrypt.org/directory")
    );
    assert_eq!(env(c, "SIDECERT_KEY_ALGORITHM").as_deref(), Some("rsa-2048"));
    assert_eq!(
        env(c, "SIDECERT_ACME_EMAIL").as_deref(),
        Some("admin@shop.example")
    );
    // Existing annotations are kept.
    assert_eq!(
        pod["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"],
        "2025-06-02T09:10:00Z"
    );
}

fn invalid_domains(resp: &Value, _pod: &Value) {
    assert!(resp.get("patch").is_none());
    let w = warnings(resp);
    assert!(w.iter().any(|w| w.contains("wildcard")), "{w:?}");
}

fn undecodable(resp: &Value, _obj: &Value) {
    assert!(resp.get("patch").is_none());
    assert!(warnings(resp)[0].contains("could not decode the Pod"), "{resp}");
}

fn unknown_kind(resp: &Value, _obj: &Value) {
    assert!(resp.get("patch").is_none());
    assert!(
        warnings(resp)[0].contains("v1 Service is not a kind sidecert mutates"),
        "{resp}"
    );
}

fn challenge(solver: &str) -> Value {
    json!({
        "path": "/.well-known/acme-challenge/",
        "pathType": "ImplementationSpecific",
        "backend": {"service": {"name": solver, "port": {"name": "http"}}}
    })
}

fn ingress_created(resp: &Value, ing: &Value) {
    assert!(warnings(resp).is_empty(), "{resp}");
    for rule in ing["spec"]["rules"].as_array().unwrap() {
        let paths = rule["http"]["paths"].as_array().unwrap();
        assert_eq!(paths[0], challenge("web-sidecert-solver"));
        assert_eq!(paths[1]["path"], "/");
        assert_eq!(paths.len(), 2);
    }
}

fn ingress_warnings(resp: &Value, ing: &Value) {
    let w = warnings(resp);
    let has = |s: &str| assert!(w.iter().any(|w| w.contains(s)), "{s:?} not in {w:?}");
    has("wildcard host *.shop.example cannot be validated with HTTP-01");
    has("spec.tls[1] (legacy.shop.example) has no secretName");
    has("TLS host orphan.shop.example has no rule");
    has("rule for cdn-nohttp.shop.example has no http paths");
    let rules = ing["spec"]["rules"].as_array().unwrap();
    // Wildcard rule untouched; cdn routed to its own solver.
    assert_eq!(rules[0]["http"]["paths"].as_array().unwrap().len(), 1);
    assert_eq!(rules[1]["http"]["paths"][0], challenge("cdn-sidecert-solver"));
    assert!(rules[2].get("http").is_none());
}

#[rstest]
#[case::pod_direct("pod-direct", direct as fn(&Value, &Value))]
#[case::pod_direct_init_containers("pod-direct-init-containers", direct_with_init)]
#[case::pod_ingress_selected("pod-ingress-selected", ingress_selected)]
#[case::pod_overrides("pod-overrides", overrides)]
#[case::pod_dry_run("pod-dry-run", ingress_selected)]
#[case::pod_opted_out("pod-opted-out", unchanged)]
#[case::pod_already_injected("pod-already-injected", unchanged)]
#[case::pod_update("pod-update", unchanged)]
#[case::pod_not_selected("pod-not-selected", unchanged)]
#[case::pod_invalid_domains("pod-invalid-domains", invalid_domains)]
#[case::pod_undecodable("pod-undecodable", undecodable)]
#[case::service_unknown_kind("service-unknown-kind", unknown_kind)]
#[case::ingress_create("ingress-create", ingress_created)]
#[case::ingress_warnings("ingress-warnings", ingress_warnings)]
#[case::ingress_not_annotated("ingress-not-annotated", unchanged)]
#[case::ingress_update_mutated("ingress-update-mutated", unchanged)]
#[tokio::test]
async fn fixture(#[case] name: &str, #[case] check: fn(&Value, &Value)) {
    let review: Value =
        serde_json::from_slice(&std::fs::read(data(&format!("{name}.json"))).unwrap()).unwrap();
    let reviewer = reviewer();
    let (resp, mutated) = run(&reviewer, &review).await;
    check(&resp, &mutated);

    // Idempotence: the mutated object gets no further patch.
    let mut again = review.clone();
    again["request"]["object"] = mutated.clone();
    let (resp2, mutated2) = run(&reviewer, &again).await;
    assert!(
        resp2.get("patch").is_none(),
        "second review patched again: {resp2}"
    );
    assert_eq!(mutated2, mutated);
}

/// Every supported Kubernetes release (1.35+) has native sidecars: the sidecar is always the
/// first init container with `restartPolicy: Always`, never a regular container (the
/// `--native-sidecars` choice served releases before 1.29).
#[tokio::test]
async fn the_sidecar_is_always_a_native_init_container() {
    let review: Value = serde_json::from_slice(&std::fs::read(data("pod-direct.json")).unwrap()).unwrap();
    let (_, pod) = run(&reviewer(), &review).await;
    let inits = pod["spec"]["initContainers"].as_array().unwrap();
    assert_eq!(inits[0]["name"], "sidecert");
    assert_eq!(inits[0]["restartPolicy"], "Always");
    let containers = pod["spec"]["containers"].as_array().unwrap();
    assert!(
        containers.iter().all(|c| c["name"] != "sidecert"),
        "{containers:?}"
    );
}

#[test]
fn effects_of_a_pod() {
    let body = std::fs::read(data("pod-ingress-selected.json")).unwrap();
    let reviewer = reviewer();
    let outcome = reviewer.mutate(&parse(&body).unwrap());
    assert_eq!(
        outcome.effects,
        vec![
            Effect::TemporarySecret {
                namespace: "shop".into(),
                name: "web-tls".into(),
                domains: vec!["shop.example".into(), "www.shop.example".into()],
            },
            Effect::Rbac {
                namespace: "shop".into(),
                service_account: "web".into(),
                certificates: vec!["web-tls".into()],
                account: sidecert_contract::account_secret_name(
                    sidecert_contract::LETSENCRYPT,
                    Some("ops@shop.example")
                ),
                eab: None,
                leases: vec!["sidecert-web-tls".into()],
            },
        ]
    );
}

#[test]
fn effects_of_an_ingress() {
    let reviewer = reviewer();
    let created = reviewer.mutate(&parse(&std::fs::read(data("ingress-create.json")).unwrap()).unwrap());
    assert!(created.effects.contains(&Effect::SolverService {
        namespace: "shop".into(),
        name: "web-sidecert-solver".into(),
        backend: "web".into(),
        owner: None, // no uid on CREATE
    }));
    let updated =
        reviewer.mutate(&parse(&std::fs::read(data("ingress-update-mutated.json")).unwrap()).unwrap());
    let owner = updated
        .effects
        .iter()
        .find_map(|e| match e {
            Effect::SolverService { owner, .. } => owner.clone(),
            _ => None,
        })
        .expect("owner on UPDATE");
    assert_eq!(owner.uid, "0b7e4b1c-8a7d-4c55-9d1e-1f2a3b4c5d6e");
    assert_eq!(owner.kind, "Ingress");
}
