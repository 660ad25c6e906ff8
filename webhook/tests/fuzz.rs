//! No input crashes admission: arbitrary and mutated AdmissionReviews go through the whole
//! review path (decode, Pod and Ingress decisions, encode) and always get either a clear
//! error (what the server answers with HTTP 400/413) or a valid AdmissionReview response
//! that carries the request's uid. A panic here would abort the release build (panic =
//! "abort") and, with `failurePolicy: Fail`, stop Pod creation in every labelled namespace.
//!
//! `make test` runs a fixed number of cases; `make fuzz` runs many more
//! (`SIDECERT_FUZZ_CASES`) and prints the slowest case, so that what bounds a review's cost
//! (body size, nesting depth, number of names) is checked by a benchmark-like run, not by a
//! timer in a test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use proptest::{prelude::*, test_runner::Config};
use serde_json::{Map, Value, json};
use sidecert_webhook::{
    AcmeDefaults, Context, Reviewer, SidecarSettings, metrics::Metrics, mutate::Snapshot,
};

fn cases(default: u32) -> u32 {
    std::env::var("SIDECERT_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn fixtures() -> Vec<Value> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let mut out: Vec<Value> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json") && !p.ends_with("cluster.json"))
        .filter_map(|p| serde_json::from_slice(&std::fs::read(p).unwrap()).ok())
        .collect();
    out.sort_by_key(|v| v.to_string());
    out
}

fn reviewer() -> Reviewer {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/cluster.json");
    let list: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let mut cluster = Snapshot::default();
    for item in list["items"].as_array().unwrap() {
        match item["kind"].as_str() {
            Some("Ingress") => cluster
                .ingresses
                .push(Arc::new(serde_json::from_value(item.clone()).unwrap())),
            Some("Service") => cluster
                .services
                .push(Arc::new(serde_json::from_value(item.clone()).unwrap())),
            _ => {}
        }
    }
    let ctx = Context {
        sidecar: SidecarSettings::default(),
        acme: AcmeDefaults::default(),
        lookup: Arc::new(cluster),
        secrets: Default::default(),
        hosts: Default::default(),
    };
    Reviewer::new(ctx, Metrics::new().unwrap(), None)
}

/// Strings that reach names, hosts and annotations: unicode across byte boundaries, long
/// ones, dots and dashes, JSON-looking text.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,12}",
        "[a-z0-9.-]{0,80}",
        "[a-zé*.-]{60,70}",
        Just("é".repeat(40)),
        Just("a".repeat(300)),
        Just("true".to_owned()),
        Just("[{\"secretName\":\"x\",\"domains\":[\"a.example\"]}]".to_owned()),
        Just(String::new()),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|n| json!(n)),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(text(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Every JSON pointer of `v`.
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    out.push(at.clone());
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                pointers(
                    x,
                    format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")),
                    out,
                );
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                pointers(x, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Replace(usize, Value),
    Remove(usize),
    Duplicate(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), value()).prop_map(|(i, v)| Mutation::Replace(i, v)),
        any::<usize>().prop_map(Mutation::Remove),
        (any::<usize>(), 1..200usize).prop_map(|(i, n)| Mutation::Duplicate(i, n)),
    ]
}

fn apply(doc: &mut Value, m: &Mutation) {
    let mut ptrs = Vec::new();
    pointers(doc, String::new(), &mut ptrs);
    let pick = |i: usize| ptrs[i % ptrs.len()].clone();
    match m {
        Mutation::Replace(i, v) => {
            if let Some(x) = doc.pointer_mut(&pick(*i)) {
                *x = v.clone();
            }
        }
        Mutation::Remove(i) => {
            let p = pick(*i);
            if let Some((parent, key)) = p.rsplit_once('/')
                && let Some(Value::Object(m)) = doc.pointer_mut(parent)
            {
                m.remove(&key.replace("~1", "/").replace("~0", "~"));
            }
        }
        // Many copies of one element of an array (many hosts, rules, containers).
        Mutation::Duplicate(i, n) => {
            let p = pick(*i);
            if let Some(Value::Array(a)) = doc.pointer_mut(&p)
                && let Some(first) = a.first().cloned()
            {
                a.extend(std::iter::repeat_n(first, *n));
            }
        }
    }
}

/// The review path and the slowest case seen.
struct Harness {
    rt: tokio::runtime::Runtime,
    reviewer: Reviewer,
    slowest: Mutex<(Duration, usize)>,
}

impl Harness {
    fn new() -> Self {
        Self {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            reviewer: reviewer(),
            slowest: Mutex::new((Duration::ZERO, 0)),
        }
    }

    /// The property: an error, or a response for the request's uid.
    fn check(&self, body: &[u8]) {
        let started = Instant::now();
        let result = self.rt.block_on(self.reviewer.review(body));
        let took = started.elapsed();
        {
            let mut s = self.slowest.lock().unwrap();
            if took > s.0 {
                *s = (took, body.len());
            }
        }
        let Ok(out) = result else { return };
        let out: Value = serde_json::from_slice(&out).expect("the response is JSON");
        assert_eq!(out["kind"], "AdmissionReview", "{out}");
        let request: Value = serde_json::from_slice(body).unwrap_or_default();
        if let Some(uid) = request["request"]["uid"].as_str() {
            assert_eq!(out["response"]["uid"], uid, "{out}");
        }
        assert_eq!(out["response"]["allowed"], true, "{out}");
    }

    fn report(&self, name: &str) {
        let (took, len) = *self.slowest.lock().unwrap();
        eprintln!("{name}: slowest case {took:?} ({len} bytes)");
    }
}

#[test]
fn mutated_reviews_never_crash_and_keep_their_uid() {
    let h = Harness::new();
    let fixtures = fixtures();
    assert!(fixtures.len() >= 10, "the fixtures are there");
    proptest!(Config::with_cases(cases(256)), |(
        which in any::<usize>(),
        mutations in prop::collection::vec(mutation(), 1..6),
    )| {
        let mut doc = fixtures[which % fixtures.len()].clone();
        for m in &mutations {
            apply(&mut doc, m);
        }
        h.check(&serde_json::to_vec(&doc).unwrap());
    });
    h.report("mutated reviews");
}

#[test]
fn arbitrary_bodies_never_crash() {
    let h = Harness::new();
    proptest!(Config::with_cases(cases(256)), |(
        body in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..512),
            value().prop_map(|v| serde_json::to_vec(&json!({
                "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": v
            })).unwrap()),
        ]
    )| {
        h.check(&body);
    });
    h.report("arbitrary bodies");
}

/// The shapes that could make a review slow, at the API server's own size limit: nesting
/// deeper than any object has, and as many hosts, rules and containers as 3 MiB holds.
#[test]
fn the_costliest_inputs_are_bounded() {
    let h = Harness::new();
    let deep = format!(
        "{{\"apiVersion\":\"admission.k8s.io/v1\",\"kind\":\"AdmissionReview\",\"request\":{}{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    h.check(deep.as_bytes());
    let base = fixtures()
        .into_iter()
        .find(|f| {
            f["request"]["kind"]["kind"] == "Ingress" && f["request"]["object"]["spec"]["tls"].is_array()
        })
        .unwrap();
    let mut many = base.clone();
    let n = 15_000;
    let hosts: Vec<String> = (0..n).map(|i| format!("h{i}.shop.example")).collect();
    many["request"]["object"]["spec"]["tls"] = json!([{"hosts": hosts, "secretName": "many-tls"}]);
    many["request"]["object"]["spec"]["rules"] = Value::Array(
        hosts
            .iter()
            .map(|h| {
                json!({"host": h, "http": {"paths": [{"path": "/", "pathType": "Prefix",
                "backend": {"service": {"name": "web", "port": {"number": 80}}}}]}})
            })
            .collect(),
    );
    let body = serde_json::to_vec(&many).unwrap();
    assert!(body.len() < 3 * 1024 * 1024, "{}", body.len());
    h.check(&body);
    // Just within every bound: 100 TLS entries of 100 hosts each, 1000 rules.
    let mut wide = base;
    let tls: Vec<Value> = (0..100)
        .map(|t| {
            json!({"hosts": (0..100).map(|h| format!("h{h}.t{t}.shop.example")).collect::<Vec<_>>(),
                        "secretName": format!("t{t}-tls")})
        })
        .collect();
    wide["request"]["object"]["spec"]["tls"] = Value::Array(tls);
    wide["request"]["object"]["spec"]["rules"] = Value::Array(
        (0..1000)
            .map(|i| json!({"host": format!("h{}.t{}.shop.example", i % 100, i / 100), "http": {"paths": [
                {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": format!("web{i}"), "port": {"number": 80}}}}]}}))
            .collect(),
    );
    let body = serde_json::to_vec(&wide).unwrap();
    assert!(body.len() < 3 * 1024 * 1024, "{}", body.len());
    h.check(&body);
    h.report("costliest inputs");
}
