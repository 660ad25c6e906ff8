//! `inject`: manifests in, manifests with the sidecar out.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use sidecert_webhook::{AcmeDefaults, Context, SidecarSettings, mutate::Snapshot, offline::inject_manifests};

fn ctx() -> Context {
    Context {
        sidecar: SidecarSettings::default(),
        acme: AcmeDefaults::default(),
        lookup: Arc::new(Snapshot::default()),
        secrets: Default::default(),
        hosts: Default::default(),
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

#[test]
fn nesting_deeper_than_any_manifest_is_refused_before_parsing() {
    // The YAML parser's cost grows with the square of the depth (100,000 levels: 49 s).
    for deep in [
        format!(
            "kind: Pod\nspec: {}{}\n",
            "[".repeat(100_000),
            "]".repeat(100_000)
        ),
        format!(
            "kind: Pod\nspec: {}{}\n",
            "{a: ".repeat(50_000),
            "}".repeat(50_000)
        ),
        (0..2_000).map(|i| format!("{}k{i}:\n", " ".repeat(i))).collect(),
        (0..2_000).map(|i| format!("{}- \n", "  ".repeat(i))).collect(),
        // An apostrophe inside a plain scalar opens no quote.
        format!(
            "kind: Pod\nspec: [a', {}{}\n",
            "[".repeat(100_000),
            "]".repeat(100_001)
        ),
        format!("kind: Pod\nspec:\n{}x\n", "? ".repeat(2_000)),
    ] {
        let err = inject_manifests(&deep, &ctx()).unwrap_err().to_string();
        assert!(err.contains("levels deep"), "{err}");
    }
    // Brackets in strings and comments do not count; real manifests pass.
    let quoted = format!(
        "kind: ConfigMap\ndata:\n  a: \"{}\"\n  b: '{}'\n  # {}\n",
        "[".repeat(1000),
        "{".repeat(1000),
        "[".repeat(1000)
    );
    assert!(sidecert_webhook::offline::yaml_depth(&quoted) < 10);
    assert!(inject_manifests(&quoted, &ctx()).is_ok());
}
