//! Offline commands: `review` (one AdmissionReview in, the response out) and `inject`
//! (manifests in, manifests with the sidecar out). Same mutation code as the server, no side
//! effects.

use std::{
    io::{Read, Write},
    path::Path,
    sync::Arc,
};

use json_patch::PatchOperation;
use k8s_openapi::api::{
    core::v1::{Pod, PodTemplateSpec},
    networking::v1::Ingress,
};
use kube::{Api, api::ListParams};
use serde_yaml::Value as Yaml;

use crate::{
    admission::{
        codec::{Request, parse},
        reviewer::Reviewer,
    },
    config::{InjectArgs, MutationArgs, ReviewArgs},
    error::{Error, Result},
    kube::client::client,
    metrics::Metrics,
    mutate::{
        container::{AcmeDefaults, SidecarSettings},
        context::Context,
        lookup::{Lookup, Snapshot},
        pod::mutate_pod_in,
    },
};

fn read_input(file: Option<&Path>) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    match file {
        None => std::io::stdin()
            .read_to_end(&mut buf)
            .map_err(|e| Error::io("stdin", e))?,
        Some(p) if p == Path::new("-") => std::io::stdin()
            .read_to_end(&mut buf)
            .map_err(|e| Error::io("stdin", e))?,
        Some(p) => {
            buf = std::fs::read(p).map_err(|e| Error::io(p, e))?;
            buf.len()
        }
    };
    Ok(buf)
}

fn write_stdout(bytes: &[u8]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(|e| Error::io("stdout", e))
}

/// A context for offline use.
pub fn offline_context(args: &MutationArgs, lookup: Arc<dyn Lookup>) -> Result<Context> {
    Ok(Context {
        sidecar: SidecarSettings::from_args(args),
        acme: AcmeDefaults::from_args(args)?,
        lookup,
        secrets: Default::default(),
        hosts: Default::default(),
    })
}

/// `sidecert-webhook review`.
pub async fn review(args: ReviewArgs) -> Result<()> {
    let body = read_input(args.file.as_deref())?;
    // Parse first: a body the server would answer with 400/413 fails the same way here.
    let request = parse(&body)?;
    let lookup: Arc<dyn Lookup> = match &args.kubeconfig {
        None => Arc::new(Snapshot::default()),
        Some(path) => {
            let client = client(Some(path)).await?;
            let ns = match &request {
                Request::Pod(r) => r.namespace.clone(),
                Request::Ingress(r) => r.namespace.clone(),
                Request::Other { request, .. } => request.namespace.clone(),
            }
            .unwrap_or_else(|| "default".to_owned());
            let lp = ListParams::default();
            let ingresses = Api::<Ingress>::namespaced(client.clone(), &ns).list(&lp).await?;
            let services = Api::<k8s_openapi::api::core::v1::Service>::namespaced(client.clone(), &ns)
                .list(&lp)
                .await?;
            let snapshot = Snapshot {
                ingresses: ingresses.items.into_iter().map(Arc::new).collect(),
                services: services.items.into_iter().map(Arc::new).collect(),
                ..Snapshot::default()
            };
            Arc::new(snapshot)
        }
    };
    let ctx = offline_context(&args.mutation, lookup)?;
    let reviewer = Reviewer::new(ctx, Metrics::new()?, None);
    let mut out = reviewer.review(&body).await?;
    out.push(b'\n');
    write_stdout(&out)
}

/// `sidecert-webhook inject`.
pub async fn inject(args: InjectArgs) -> Result<()> {
    let input = read_input(Some(&args.file))?;
    let text = String::from_utf8(input).map_err(|e| Error::config("input is not UTF-8", e))?;
    let ctx = offline_context(&args.mutation, Arc::new(Snapshot::default()))?;
    let (out, warnings) = inject_manifests(&text, &ctx)?;
    for w in warnings {
        eprintln!("warning: {w}");
    }
    write_stdout(out.as_bytes())
}

/// Splits a YAML stream at `---` lines, keeping each document's text.
fn split_documents(text: &str) -> Vec<(Option<&str>, String)> {
    let mut docs: Vec<(Option<&str>, String)> = vec![(None, String::new())];
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end();
        if bare == "---" || bare.starts_with("--- ") {
            docs.push((
                Some(line),
                bare.get(4..).map(|r| format!("{r}\n")).unwrap_or_default(),
            ));
        } else if let Some((_, body)) = docs.last_mut() {
            body.push_str(line);
        }
    }
    docs
}

/// The deepest nesting `inject` reads (indentation columns, `- ` markers and `[`/`{` levels
/// together): far more than any manifest has. The YAML parser's cost grows with the square of
/// the depth (100,000 levels took 49 s), so deeper input is refused before parsing.
pub const MAX_YAML_DEPTH: usize = 256;

/// An upper bound of a YAML stream's nesting, from one pass over its text: per line, the
/// leading spaces and sequence markers, plus the open flow collections (outside quotes and
/// comments).
pub fn yaml_depth(text: &str) -> usize {
    let mut max = 0;
    let mut flow = 0usize;
    for line in text.lines() {
        let indent = line.len() - line.trim_start_matches([' ', '-', '?', '\t']).len();
        let mut quote: Option<char> = None;
        let mut escaped = false;
        let mut prev = ' ';
        for c in line.chars() {
            match quote {
                Some('"') if escaped => escaped = false,
                Some('"') if c == '\\' => escaped = true,
                Some(q) if c == q => quote = None,
                Some(_) => {}
                // A quote opens a quoted scalar only where a token starts; inside a plain
                // scalar (`it's`) it is a character like any other.
                None => match c {
                    '"' | '\'' if prev.is_whitespace() || "[{,:-?".contains(prev) => quote = Some(c),
                    '#' if prev.is_whitespace() => break,
                    '[' | '{' => flow += 1,
                    ']' | '}' => flow = flow.saturating_sub(1),
                    _ => {}
                },
            }
            prev = c;
            max = max.max(indent + flow);
        }
        max = max.max(indent + flow);
    }
    max
}

/// Injects the sidecar into every pod template that asks for it; other documents are
/// written back byte for byte. Returns the output and the warnings.
pub fn inject_manifests(text: &str, ctx: &Context) -> Result<(String, Vec<String>)> {
    let mut out = String::with_capacity(text.len() * 2);
    let mut warnings = Vec::new();
    let depth = yaml_depth(text);
    if depth > MAX_YAML_DEPTH {
        return Err(Error::InvalidManifest(format!(
            "the input nests {depth} levels deep, more than the {MAX_YAML_DEPTH} any manifest needs; refused before parsing"
        )));
    }
    for (separator, body) in split_documents(text) {
        if let Some(sep) = separator {
            out.push_str(if sep.trim_end().len() > 3 { "---\n" } else { sep });
        }
        let mut doc: Yaml = serde_yaml::from_str(&body)?;
        let changed = !doc.is_null() && inject_document(&mut doc, ctx, &mut warnings)?;
        if changed {
            out.push_str(&serde_yaml::to_string(&doc)?);
        } else {
            out.push_str(&body);
        }
    }
    Ok((out, warnings))
}

fn get_mut<'a>(v: &'a mut Yaml, path: &[&str]) -> Option<&'a mut Yaml> {
    path.iter().try_fold(v, |v, k| v.get_mut(*k))
}

/// Injects into one document (recursing into `List` items). Returns whether it changed.
pub fn inject_document(doc: &mut Yaml, ctx: &Context, warnings: &mut Vec<String>) -> Result<bool> {
    let kind = doc.get("kind").and_then(Yaml::as_str).unwrap_or("").to_owned();
    let namespace = doc
        .get("metadata")
        .and_then(|m| m.get("namespace"))
        .and_then(Yaml::as_str)
        .unwrap_or("default")
        .to_owned();
    let name = doc
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Yaml::as_str)
        .unwrap_or("")
        .to_owned();
    let template_path: &[&str] = match kind.as_str() {
        "List" => {
            let mut changed = false;
            if let Some(items) = doc.get_mut("items").and_then(Yaml::as_sequence_mut) {
                for item in items {
                    changed |= inject_document(item, ctx, warnings)?;
                }
            }
            return Ok(changed);
        }
        "Pod" => &[],
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => &["spec", "template"],
        "CronJob" => &["spec", "jobTemplate", "spec", "template"],
        _ => return Ok(false),
    };
    let Some(template) = get_mut(doc, template_path) else {
        return Ok(false);
    };
    let parsed: PodTemplateSpec = serde_yaml::from_value(template.clone())?;
    let pod = Pod {
        metadata: parsed.metadata.unwrap_or_default(),
        spec: parsed.spec,
        status: None,
    };
    let outcome = mutate_pod_in(&pod, &namespace, ctx);
    warnings.extend(
        outcome
            .warnings
            .into_iter()
            .map(|w| format!("{kind} {name}: {w}")),
    );
    for op in &outcome.patch {
        apply_add(template, op)?;
    }
    Ok(!outcome.patch.is_empty())
}

/// Applies an `add` operation to a YAML value (mappings keep their order), creating missing
/// parent mappings.
pub fn apply_add(root: &mut Yaml, op: &PatchOperation) -> Result<()> {
    let PatchOperation::Add(add) = op else {
        return Err(Error::Config(format!("unexpected patch operation {op}")));
    };
    let tokens: Vec<String> = add.path.tokens().map(|t| t.decoded().into_owned()).collect();
    let Some((last, parents)) = tokens.split_last() else {
        *root = serde_yaml::to_value(&add.value)?;
        return Ok(());
    };
    let mut cur = root;
    for t in parents {
        if cur.is_null() {
            *cur = Yaml::Mapping(serde_yaml::Mapping::new());
        }
        cur = match cur {
            Yaml::Mapping(m) => m.entry(Yaml::String(t.clone())).or_insert(Yaml::Null),
            Yaml::Sequence(s) => t
                .parse::<usize>()
                .ok()
                .and_then(|i| s.get_mut(i))
                .ok_or_else(|| Error::Config(format!("no index {t} in {}", add.path)))?,
            _ => return Err(Error::Config(format!("cannot descend into {} at {t}", add.path))),
        };
    }
    let value = serde_yaml::to_value(&add.value)?;
    if cur.is_null() {
        *cur = Yaml::Mapping(serde_yaml::Mapping::new());
    }
    match cur {
        Yaml::Mapping(m) => {
            m.insert(Yaml::String(last.clone()), value);
        }
        Yaml::Sequence(s) if last == "-" => s.push(value),
        Yaml::Sequence(s) => match last.parse::<usize>() {
            Ok(i) if i <= s.len() => s.insert(i, value),
            _ => return Err(Error::Config(format!("bad index {last} in {}", add.path))),
        },
        _ => return Err(Error::Config(format!("cannot add at {}", add.path))),
    }
    Ok(())
}
