//! A container's environment and argv, resolved as the kubelet does (pure functions).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use k8s_openapi::api::core::v1::{Container, Pod, ResourceFieldSelector};

/// The `PATH` a process gets (images would set it; we have no image).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Why a container's configuration cannot be resolved (reported as
/// `CreateContainerConfigError`, retried).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    #[error("configmap {0:?} not found")]
    ConfigMapMissing(String),
    #[error("secret {0:?} not found")]
    SecretMissing(String),
    #[error("couldn't find key {key} in ConfigMap {name}")]
    ConfigMapKeyMissing { name: String, key: String },
    #[error("couldn't find key {key} in Secret {name}")]
    SecretKeyMissing { name: String, key: String },
    #[error("unsupported fieldPath {0:?}")]
    UnsupportedField(String),
    #[error("unsupported resource {0:?}")]
    UnsupportedResource(String),
    #[error("env var {0:?} has an empty valueFrom")]
    EmptySource(String),
}

/// What the kubelet knows about the Pod that is not in the Pod object yet (or not at all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    pub pod_ip: String,
    pub host_ip: String,
    pub node_name: String,
    pub api_host: String,
    pub api_port: u16,
    /// Node allocatable CPU in millicores and memory in bytes: the default limits.
    pub node_cpu_millis: u64,
    pub node_memory_bytes: u64,
}

/// The ConfigMaps and Secrets (by name) of the Pod's namespace that exist.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sources {
    pub config_maps: BTreeMap<String, BTreeMap<String, String>>,
    pub secrets: BTreeMap<String, BTreeMap<String, String>>,
}

/// Names of the ConfigMaps and Secrets a container's env refers to.
pub fn referenced(container: &Container) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut cms = BTreeSet::new();
    let mut secrets = BTreeSet::new();
    for from in container.env_from.iter().flatten() {
        if let Some(r) = &from.config_map_ref {
            cms.insert(r.name.clone());
        }
        if let Some(r) = &from.secret_ref {
            secrets.insert(r.name.clone());
        }
    }
    for var in container.env.iter().flatten() {
        let Some(from) = &var.value_from else { continue };
        if let Some(r) = &from.config_map_key_ref {
            cms.insert(r.name.clone());
        }
        if let Some(r) = &from.secret_key_ref {
            secrets.insert(r.name.clone());
        }
    }
    (cms, secrets)
}

/// The container's environment, in order, each name once (a later definition wins):
/// the defaults (`PATH`, `HOSTNAME`, `KUBERNETES_SERVICE_*`), then `envFrom`, then `env` with
/// `$(VAR)` expanded against what is defined before it.
pub fn resolve(
    pod: &Pod,
    container: &Container,
    facts: &PodFacts,
    sources: &Sources,
) -> Result<Vec<(String, String)>, EnvError> {
    let mut env = Env::default();
    env.set("PATH", DEFAULT_PATH.to_owned());
    env.set("HOSTNAME", pod.metadata.name.clone().unwrap_or_default());
    env.set("KUBERNETES_SERVICE_HOST", facts.api_host.clone());
    env.set("KUBERNETES_SERVICE_PORT", facts.api_port.to_string());
    env.set("KUBERNETES_SERVICE_PORT_HTTPS", facts.api_port.to_string());

    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.as_deref().unwrap_or_default();
        if let Some(r) = &from.config_map_ref {
            match sources.config_maps.get(&r.name) {
                Some(data) => data
                    .iter()
                    .for_each(|(k, v)| env.set(&format!("{prefix}{k}"), v.clone())),
                None if r.optional == Some(true) => {}
                None => return Err(EnvError::ConfigMapMissing(r.name.clone())),
            }
        }
        if let Some(r) = &from.secret_ref {
            match sources.secrets.get(&r.name) {
                Some(data) => data
                    .iter()
                    .for_each(|(k, v)| env.set(&format!("{prefix}{k}"), v.clone())),
                None if r.optional == Some(true) => {}
                None => return Err(EnvError::SecretMissing(r.name.clone())),
            }
        }
    }

    for var in container.env.iter().flatten() {
        let value = match &var.value_from {
            None => Some(expand(var.value.as_deref().unwrap_or_default(), |n| env.get(n))),
            Some(from) => {
                if let Some(f) = &from.field_ref {
                    Some(field_value(pod, facts, &f.field_path)?)
                } else if let Some(r) = &from.resource_field_ref {
                    Some(resource_value(container, facts, r)?)
                } else if let Some(r) = &from.config_map_key_ref {
                    let optional = r.optional == Some(true);
                    match sources.config_maps.get(&r.name) {
                        Some(data) => match data.get(&r.key) {
                            Some(v) => Some(v.clone()),
                            None if optional => None,
                            None => {
                                return Err(EnvError::ConfigMapKeyMissing {
                                    name: r.name.clone(),
                                    key: r.key.clone(),
                                });
                            }
                        },
                        None if optional => None,
                        None => return Err(EnvError::ConfigMapMissing(r.name.clone())),
                    }
                } else if let Some(r) = &from.secret_key_ref {
                    let optional = r.optional == Some(true);
                    match sources.secrets.get(&r.name) {
                        Some(data) => match data.get(&r.key) {
                            Some(v) => Some(v.clone()),
                            None if optional => None,
                            None => {
                                return Err(EnvError::SecretKeyMissing {
                                    name: r.name.clone(),
                                    key: r.key.clone(),
                                });
                            }
                        },
                        None if optional => None,
                        None => return Err(EnvError::SecretMissing(r.name.clone())),
                    }
                } else {
                    return Err(EnvError::EmptySource(var.name.clone()));
                }
            }
        };
        if let Some(v) = value {
            env.set(&var.name, v);
        }
    }
    Ok(env.vars)
}

/// The process argv: the mapped binary, then `command[1..]` (if command is set), then
/// `args`, each with `$(VAR)` expanded against the container's environment.
pub fn argv(binary: &Path, container: &Container, env: &[(String, String)]) -> Vec<String> {
    let lookup = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let mut argv = vec![binary.display().to_string()];
    let rest = container
        .command
        .iter()
        .flat_map(|c| c.iter().skip(1))
        .chain(container.args.iter().flatten());
    argv.extend(rest.map(|a| expand(a, lookup)));
    argv
}

/// Kubernetes' `$(VAR)` expansion: a defined `$(VAR)` is replaced, `$$` is an escaped `$`,
/// anything else (an undefined or unterminated reference) stays as written.
pub fn expand<'a>(input: &str, lookup: impl Fn(&str) -> Option<&'a str>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(close) = inner.find(')')
        {
            let name = &inner[..close];
            match lookup(name) {
                Some(v) => out.push_str(v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &inner[close + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[derive(Default)]
struct Env {
    vars: Vec<(String, String)>,
}

impl Env {
    fn set(&mut self, name: &str, value: String) {
        match self.vars.iter_mut().find(|(k, _)| k == name) {
            Some(slot) => slot.1 = value,
            None => self.vars.push((name.to_owned(), value)),
        }
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

fn field_value(pod: &Pod, facts: &PodFacts, path: &str) -> Result<String, EnvError> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let map_key = |prefix: &str| -> Option<String> {
        let inner = path.strip_prefix(prefix)?.strip_prefix('[')?.strip_suffix(']')?;
        let key = inner
            .strip_prefix('\'')
            .and_then(|k| k.strip_suffix('\''))
            .or_else(|| inner.strip_prefix('"').and_then(|k| k.strip_suffix('"')))?;
        Some(key.to_owned())
    };
    let value = match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec
            .and_then(|s| s.node_name.clone())
            .unwrap_or_else(|| facts.node_name.clone()),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".to_owned()),
        "status.podIP" | "status.podIPs" => facts.pod_ip.clone(),
        "status.hostIP" | "status.hostIPs" => facts.host_ip.clone(),
        _ => {
            if let Some(key) = map_key("metadata.labels") {
                meta.labels
                    .as_ref()
                    .and_then(|l| l.get(&key))
                    .cloned()
                    .unwrap_or_default()
            } else if let Some(key) = map_key("metadata.annotations") {
                meta.annotations
                    .as_ref()
                    .and_then(|a| a.get(&key))
                    .cloned()
                    .unwrap_or_default()
            } else {
                return Err(EnvError::UnsupportedField(path.to_owned()));
            }
        }
    };
    Ok(value)
}

/// `resourceFieldRef`, best effort: CPU rounds up to whole divisor units (default 1 core),
/// memory divides bytes; an unset limit falls back to the node's allocatable, an unset
/// request to 0.
fn resource_value(
    container: &Container,
    facts: &PodFacts,
    sel: &ResourceFieldSelector,
) -> Result<String, EnvError> {
    let resources = container.resources.as_ref();
    let (kind, name) = sel
        .resource
        .split_once('.')
        .ok_or_else(|| EnvError::UnsupportedResource(sel.resource.clone()))?;
    let map = match kind {
        "limits" => resources.and_then(|r| r.limits.as_ref()),
        "requests" => resources.and_then(|r| r.requests.as_ref()),
        _ => return Err(EnvError::UnsupportedResource(sel.resource.clone())),
    };
    let set = map.and_then(|m| m.get(name)).and_then(|q| parse_quantity(&q.0));
    let divisor = sel.divisor.as_ref().and_then(|q| parse_quantity(&q.0));
    match name {
        "cpu" => {
            let fallback = if kind == "limits" {
                facts.node_cpu_millis as f64 / 1000.0
            } else {
                0.0
            };
            let cores = set.unwrap_or(fallback);
            let divisor = divisor.filter(|d| *d > 0.0).unwrap_or(1.0);
            Ok(format!("{}", (cores / divisor).ceil() as u64))
        }
        "memory" | "ephemeral-storage" => {
            let fallback = if kind == "limits" {
                facts.node_memory_bytes as f64
            } else {
                0.0
            };
            let bytes = set.unwrap_or(fallback);
            let divisor = divisor.filter(|d| *d > 0.0).unwrap_or(1.0);
            Ok(format!("{}", (bytes / divisor).ceil() as u64))
        }
        _ => Err(EnvError::UnsupportedResource(sel.resource.clone())),
    }
}

/// Parses a Kubernetes quantity (`500m`, `2`, `128Mi`, `1G`, `1e3`) into a number.
pub fn parse_quantity(q: &str) -> Option<f64> {
    let q = q.trim();
    const SUFFIXES: [(&str, f64); 13] = [
        ("Ki", 1024.0),
        ("Mi", 1024.0 * 1024.0),
        ("Gi", 1024.0 * 1024.0 * 1024.0),
        ("Ti", 1024.0 * 1024.0 * 1024.0 * 1024.0),
        ("Pi", 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0),
        ("Ei", 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
    ];
    for (suffix, factor) in SUFFIXES {
        if let Some(num) = q.strip_suffix(suffix) {
            return num.parse::<f64>().ok().map(|n| n * factor);
        }
    }
    q.parse::<f64>().ok().filter(|n| n.is_finite())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use k8s_openapi::api::core::v1::{
        ConfigMapEnvSource, ConfigMapKeySelector, EnvFromSource, EnvVar, EnvVarSource, ObjectFieldSelector,
        ResourceRequirements, SecretKeySelector,
    };
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use serde_json::json;

    use super::*;

    fn facts() -> PodFacts {
        PodFacts {
            pod_ip: "10.213.0.12".into(),
            host_ip: "10.213.0.1".into(),
            node_name: "sidecert-local".into(),
            api_host: "10.213.0.1".into(),
            api_port: 6443,
            node_cpu_millis: 2000,
            node_memory_bytes: 4 << 30,
        }
    }

    fn pod() -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "web-1", "namespace": "shop", "uid": "u-1",
                          "labels": {"app": "web"}, "annotations": {"sidecert.io/domains": "a.example"}},
            "spec": {"nodeName": "sidecert-local", "serviceAccountName": "web", "containers": []}
        }))
        .unwrap()
    }

    fn field(path: &str) -> Option<EnvVarSource> {
        Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    fn var(name: &str, value: &str) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: Some(value.into()),
            value_from: None,
        }
    }

    fn get<'a>(env: &'a [(String, String)], name: &str) -> Option<&'a str> {
        env.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    #[test]
    fn defaults_and_downward_api() {
        let paths = [
            ("NAME", "metadata.name", "web-1"),
            ("NS", "metadata.namespace", "shop"),
            ("UID", "metadata.uid", "u-1"),
            ("APP", "metadata.labels['app']", "web"),
            ("DOM", "metadata.annotations['sidecert.io/domains']", "a.example"),
            ("NODE", "spec.nodeName", "sidecert-local"),
            ("SA", "spec.serviceAccountName", "web"),
            ("IP", "status.podIP", "10.213.0.12"),
            ("IPS", "status.podIPs", "10.213.0.12"),
            ("HOST", "status.hostIP", "10.213.0.1"),
        ];
        let c = Container {
            env: Some(
                paths
                    .iter()
                    .map(|(n, p, _)| EnvVar {
                        name: (*n).into(),
                        value: None,
                        value_from: field(p),
                    })
                    .collect(),
            ),
            ..Default::default()
        };
        let env = resolve(&pod(), &c, &facts(), &Sources::default()).unwrap();
        for (n, _, want) in paths {
            assert_eq!(get(&env, n), Some(want), "{n}");
        }
        assert_eq!(get(&env, "HOSTNAME"), Some("web-1"));
        assert_eq!(get(&env, "KUBERNETES_SERVICE_HOST"), Some("10.213.0.1"));
        assert_eq!(get(&env, "KUBERNETES_SERVICE_PORT"), Some("6443"));
        assert_eq!(get(&env, "KUBERNETES_SERVICE_PORT_HTTPS"), Some("6443"));
        assert_eq!(get(&env, "PATH"), Some(DEFAULT_PATH));
    }

    #[test]
    fn unsupported_field_is_an_error() {
        let c = Container {
            env: Some(vec![EnvVar {
                name: "X".into(),
                value: None,
                value_from: field("spec.bogus"),
            }]),
            ..Default::default()
        };
        assert_eq!(
            resolve(&pod(), &c, &facts(), &Sources::default()),
            Err(EnvError::UnsupportedField("spec.bogus".into()))
        );
    }

    #[test]
    fn config_maps_secrets_optional_and_env_from() {
        let mut sources = Sources::default();
        sources
            .config_maps
            .insert("cm".into(), [("k".to_string(), "v".to_string())].into());
        sources
            .secrets
            .insert("s".into(), [("pw".to_string(), "hunter2".to_string())].into());
        let cm_ref = |name: &str, key: &str, optional| EnvVarSource {
            config_map_key_ref: Some(ConfigMapKeySelector {
                name: name.into(),
                key: key.into(),
                optional,
            }),
            ..Default::default()
        };
        let secret_ref = |name: &str, key: &str, optional| EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: name.into(),
                key: key.into(),
                optional,
            }),
            ..Default::default()
        };
        let mut c = Container {
            env_from: Some(vec![EnvFromSource {
                config_map_ref: Some(ConfigMapEnvSource {
                    name: "cm".into(),
                    optional: None,
                }),
                prefix: Some("CM_".into()),
                secret_ref: None,
            }]),
            env: Some(vec![
                EnvVar {
                    name: "A".into(),
                    value: None,
                    value_from: Some(cm_ref("cm", "k", None)),
                },
                EnvVar {
                    name: "B".into(),
                    value: None,
                    value_from: Some(secret_ref("s", "pw", None)),
                },
                EnvVar {
                    name: "C".into(),
                    value: None,
                    value_from: Some(cm_ref("nope", "k", Some(true))),
                },
                EnvVar {
                    name: "D".into(),
                    value: None,
                    value_from: Some(secret_ref("s", "nokey", Some(true))),
                },
            ]),
            ..Default::default()
        };
        let env = resolve(&pod(), &c, &facts(), &sources).unwrap();
        assert_eq!(get(&env, "CM_k"), Some("v"));
        assert_eq!(get(&env, "A"), Some("v"));
        assert_eq!(get(&env, "B"), Some("hunter2"));
        assert_eq!(get(&env, "C"), None);
        assert_eq!(get(&env, "D"), None);
        let (cms, secrets) = referenced(&c);
        assert_eq!(cms, ["cm".to_string(), "nope".to_string()].into());
        assert_eq!(secrets, ["s".to_string()].into());

        if let Some(env) = c.env.as_mut() {
            env.push(EnvVar {
                name: "E".into(),
                value: None,
                value_from: Some(secret_ref("missing", "k", None)),
            });
        }
        assert_eq!(
            resolve(&pod(), &c, &facts(), &sources),
            Err(EnvError::SecretMissing("missing".into()))
        );
        if let Some(env) = c.env.as_mut() {
            env.pop();
            env.push(EnvVar {
                name: "E".into(),
                value: None,
                value_from: Some(cm_ref("cm", "absent", None)),
            });
        }
        assert_eq!(
            resolve(&pod(), &c, &facts(), &sources),
            Err(EnvError::ConfigMapKeyMissing {
                name: "cm".into(),
                key: "absent".into()
            })
        );
    }

    #[test]
    fn later_definitions_win_and_expand() {
        let c = Container {
            env: Some(vec![
                var("A", "one"),
                var("B", "$(A)-two"),
                var("A", "three"),
                var("C", "$(UNDEFINED) $$(A) $(A"),
            ]),
            command: Some(vec!["/ignored".into(), "--a=$(A)".into()]),
            args: Some(vec!["--b=$(B)".into(), "x".into()]),
            ..Default::default()
        };
        let env = resolve(&pod(), &c, &facts(), &Sources::default()).unwrap();
        assert_eq!(get(&env, "A"), Some("three"));
        assert_eq!(get(&env, "B"), Some("one-two"));
        assert_eq!(get(&env, "C"), Some("$(UNDEFINED) $(A) $(A"));
        assert_eq!(
            argv(Path::new("/bin/app"), &c, &env),
            ["/bin/app", "--a=three", "--b=one-two", "x"]
        );
        let no_command = Container {
            args: Some(vec!["serve".into()]),
            ..Default::default()
        };
        assert_eq!(
            argv(Path::new("/bin/app"), &no_command, &env),
            ["/bin/app", "serve"]
        );
    }

    #[test]
    fn resource_field_refs() {
        let res = |r: &str, d: Option<&str>| EnvVar {
            name: r.replace('.', "_"),
            value: None,
            value_from: Some(EnvVarSource {
                resource_field_ref: Some(ResourceFieldSelector {
                    resource: r.into(),
                    divisor: d.map(|d| Quantity(d.into())),
                    container_name: None,
                }),
                ..Default::default()
            }),
        };
        let c = Container {
            resources: Some(ResourceRequirements {
                limits: Some([("memory".to_string(), Quantity("64Mi".into()))].into()),
                requests: Some([("cpu".to_string(), Quantity("250m".into()))].into()),
                ..Default::default()
            }),
            env: Some(vec![
                res("limits.memory", Some("1Mi")),
                res("requests.cpu", Some("1m")),
                res("limits.cpu", None),
                res("requests.memory", None),
            ]),
            ..Default::default()
        };
        let env = resolve(&pod(), &c, &facts(), &Sources::default()).unwrap();
        assert_eq!(get(&env, "limits_memory"), Some("64"));
        assert_eq!(get(&env, "requests_cpu"), Some("250"));
        assert_eq!(get(&env, "limits_cpu"), Some("2"));
        assert_eq!(get(&env, "requests_memory"), Some("0"));
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("500m"), Some(0.5));
        assert_eq!(parse_quantity("2"), Some(2.0));
        assert_eq!(parse_quantity("1Ki"), Some(1024.0));
        assert_eq!(parse_quantity("1G"), Some(1e9));
        assert_eq!(parse_quantity("1e3"), Some(1000.0));
        assert_eq!(parse_quantity("lots"), None);
    }
}
