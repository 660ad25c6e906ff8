//! What the integration tests against the local plane share: a test PKI, free ports, and
//! the url MutatingWebhookConfiguration that points the API server at an in-process webhook.
#![allow(dead_code, clippy::unwrap_used)]

use std::{collections::BTreeMap, future::Future, net::Ipv4Addr, path::PathBuf, thread::JoinHandle};

use clap::Parser;

use k8s_openapi::{
    ByteString,
    api::{
        admissionregistration::v1::{
            MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, WebhookClientConfig,
        },
        core::v1::Pod,
    },
    apimachinery::pkg::apis::meta::v1::LabelSelector,
};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use sidecert_webhook::{
    AcmeDefaults, Context, Reviewer, SidecarSettings,
    config::{Cli, Command, LogFormat, ServeArgs, init_tracing},
    kube::Executor,
    metrics::Metrics,
    mutate::Lookup,
};

/// The namespace label that confines a configuration to one test run's namespaces.
pub const TEST_LABEL: &str = "sidecert-webhook-test";

/// A CA and a serving certificate for `ip`; returns (CA PEM, a directory holding `tls.crt`
/// and `tls.key`).
pub fn pki(ip: Ipv4Addr, tag: &str) -> (String, PathBuf) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec![ip.to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let dir = std::env::temp_dir().join(format!("sidecert-webhook-test-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tls.crt"), cert.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), key.serialize_pem()).unwrap();
    (ca_cert.pem(), dir)
}

pub fn free_port(ip: Ipv4Addr) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn has_sidecar(p: &Pod) -> bool {
    let spec = p.spec.as_ref().unwrap();
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .any(|c| c.name == "sidecert")
}

/// What one webhook of a configuration admits.
pub struct Rule {
    pub name: &'static str,
    pub group: &'static str,
    pub resource: &'static str,
    pub operations: &'static [&'static str],
}

pub const PODS: Rule = Rule {
    name: "pods",
    group: "",
    resource: "pods",
    operations: &["CREATE"],
};

pub const INGRESSES: Rule = Rule {
    name: "ingresses",
    group: "networking.k8s.io",
    resource: "ingresses",
    operations: &["CREATE", "UPDATE"],
};

/// A configuration named `name` sending `rules` to `url`, for namespaces labelled for
/// injection and for this `run`. `ca_bundle: None` leaves the bundle for the webhook to fill.
pub fn webhook_config(
    name: &str,
    url: &str,
    ca_bundle: Option<&str>,
    run: &str,
    failure_policy: &str,
    rules: &[Rule],
) -> MutatingWebhookConfiguration {
    let selector = LabelSelector {
        match_labels: Some(BTreeMap::from([
            ("sidecert.io/injection".to_owned(), "enabled".to_owned()),
            (TEST_LABEL.to_owned(), run.to_owned()),
        ])),
        ..Default::default()
    };
    let hook = |rule: &Rule| MutatingWebhook {
        name: format!("{}.{run}.sidecert.io", rule.name),
        admission_review_versions: vec!["v1".into()],
        client_config: WebhookClientConfig {
            url: Some(url.to_owned()),
            ca_bundle: ca_bundle.map(|ca| ByteString(ca.as_bytes().to_vec())),
            service: None,
        },
        namespace_selector: Some(selector.clone()),
        rules: Some(vec![RuleWithOperations {
            api_groups: Some(vec![rule.group.into()]),
            api_versions: Some(vec!["v1".into()]),
            operations: Some(rule.operations.iter().map(|s| (*s).to_owned()).collect()),
            resources: Some(vec![rule.resource.into()]),
            scope: Some("Namespaced".into()),
        }]),
        side_effects: "NoneOnDryRun".into(),
        failure_policy: Some(failure_policy.into()),
        reinvocation_policy: Some("Never".into()),
        timeout_seconds: Some(10),
        ..Default::default()
    };
    MutatingWebhookConfiguration {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        },
        webhooks: Some(rules.iter().map(hook).collect()),
    }
}

/// `sidecert-webhook serve <args>` parsed from a real command line, so the flags are
/// exercised too. Sets up logging when asked for (`RUST_LOG=sidecert_webhook=info`).
pub fn serve_args(args: impl IntoIterator<Item = String>) -> ServeArgs {
    if std::env::var_os("RUST_LOG").is_some() {
        init_tracing(&LogFormat::Text);
    }
    let cli = Cli::try_parse_from(
        ["sidecert-webhook", "serve"]
            .into_iter()
            .map(str::to_owned)
            .chain(args),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let Command::Serve(args) = cli.command else {
        panic!("not serve")
    };
    *args
}

/// Runs what `task` makes (a webhook: actix's servers are not `Send`) on a runtime of its
/// own, with one worker, in a thread of its own; it ends with the test process unless the
/// task ends first.
pub fn in_own_runtime<F: Future<Output = ()>>(task: impl FnOnce() -> F + Send + 'static) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(task());
        rt.shutdown_background();
    })
}

/// An `admission.k8s.io/v1` AdmissionReview of a CREATE of `object` in `namespace`; its
/// `apiVersion` and `kind` name the resource (Pods and Ingresses).
pub fn create_review(namespace: &str, object: serde_json::Value, dry_run: bool) -> Vec<u8> {
    let api_version = object["apiVersion"].as_str().unwrap_or("v1").to_owned();
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", &api_version));
    let kind = object["kind"].as_str().unwrap_or("Pod").to_owned();
    let resource = match kind.as_str() {
        "Ingress" => "ingresses".to_owned(),
        k => format!("{}s", k.to_ascii_lowercase()),
    };
    serde_json::to_vec(&serde_json::json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": format!("5eedce27-0000-4000-8000-{:012x}", rand_uid()),
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": resource},
            "namespace": namespace, "operation": "CREATE", "userInfo": {}, "dryRun": dry_run,
            "object": object,
        }
    }))
    .unwrap()
}

/// A reviewer whose caches are `lookup`, with an executor on `client` (4 s per review); no
/// namespace gate and no host claims unless the caller adds them.
pub fn reviewer_over(client: &kube::Client, lookup: std::sync::Arc<dyn Lookup>) -> Reviewer {
    let ctx = Context {
        sidecar: SidecarSettings::default(),
        acme: AcmeDefaults::default(),
        lookup: lookup.clone(),
        secrets: Default::default(),
        hosts: Default::default(),
    };
    let executor = Executor::new(client.clone(), lookup, std::time::Duration::from_secs(4));
    Reviewer::new(ctx, Metrics::new().unwrap(), Some(executor))
}

/// The response to a review body, which must allow the object.
pub async fn respond(reviewer: &Reviewer, body: &[u8]) -> serde_json::Value {
    let out: serde_json::Value = serde_json::from_slice(&reviewer.review(body).await.unwrap()).unwrap();
    assert_eq!(out["response"]["allowed"], true, "{out}");
    out["response"].clone()
}

/// Whether a response warns with `text`.
pub fn warned(response: &serde_json::Value, text: &str) -> bool {
    response["warnings"]
        .as_array()
        .is_some_and(|w| w.iter().any(|w| w.as_str().unwrap_or("").contains(text)))
}

fn rand_uid() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The names of `api`'s objects, sorted.
pub async fn names<K>(api: &kube::Api<K>) -> Vec<String>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut names: Vec<String> = api
        .list_metadata(&kube::api::ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|o| o.metadata.name)
        .collect();
    names.sort();
    names
}
