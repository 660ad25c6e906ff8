//! `inject`: manifests in, manifests with the sidecar out.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use sidecert_webhook::{AcmeDefaults, Context, SidecarSettings, mutate::Snapshot, offline::inject_manifests};

fn ctx() -> Context {
    Context {
        sidecar: SidecarSettings::default(),
        acme: AcmeDefaults::default(),
        lookup: Arc::new(Snapshot::default()),
    }
}

#[test]
fn injects_pod_templates_and_leaves_the_rest() {
    let input = std::fs::read_to_string(format!(
        "{}/tests/data/manifests.yaml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let (out, warnings) = inject_manifests(&input, &ctx()).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    let docs: Vec<&str> = out.split("\n---\n").collect();
    assert_eq!(docs.len(), 4);
    // Untouched documents are byte for byte the same (comments included).
    assert!(docs[0].contains("name: api-config   # keep this comment"));
    assert!(input.contains(docs[3].trim_end()));

    let deploy: serde_json::Value = serde_yaml::from_str(docs[1]).unwrap();
    let tpl = &deploy["spec"]["template"];
    assert_eq!(tpl["spec"]["initContainers"][0]["name"], "sidecert");
    assert_eq!(tpl["spec"]["initContainers"][0]["restartPolicy"], "Always");
    assert_eq!(tpl["metadata"]["annotations"]["sidecert.io/status"], "injected");
    assert_eq!(tpl["metadata"]["annotations"]["sidecert.io/inject"], "true");

    let cron: serde_json::Value = serde_yaml::from_str(docs[2]).unwrap();
    let tpl = &cron["spec"]["jobTemplate"]["spec"]["template"];
    assert_eq!(tpl["spec"]["initContainers"][0]["name"], "sidecert");

    // Idempotent.
    let (again, _) = inject_manifests(&out, &ctx()).unwrap();
    assert_eq!(again, out);
}
