//! The injected container and the configuration it carries.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{
        Capabilities, Container, ContainerPort, HTTPGetAction, Probe, ResourceRequirements, SeccompProfile,
        SecurityContext,
    },
    apimachinery::pkg::{api::resource::Quantity, util::intstr::IntOrString},
};
use sidecert_contract::{
    CertificateSpec, DEFAULT_HTTP01_PORT, DEFAULT_METRICS_PORT, HTTP01_PORT_NAME, KeyAlgorithm,
    SIDECAR_CONTAINER_NAME, SidecarConfig, annotations, resolve_acme_server,
};

use crate::{
    config::MutationArgs,
    error::{Error, Result},
};

/// The non-root user the sidecar runs as (distroless `nonroot`).
pub const SIDECAR_UID: i64 = 65532;

/// How the sidecar container looks.
#[derive(Debug, Clone, PartialEq)]
pub struct SidecarSettings {
    pub image: String,
    pub pull_policy: String,
    pub resources: ResourceRequirements,
}

/// ACME settings used when neither the Ingress nor the Pod overrides them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeDefaults {
    /// Directory URL.
    pub server: String,
    pub email: Option<String>,
    pub profile: Option<String>,
    pub key_algorithm: KeyAlgorithm,
    pub eab_secret: Option<String>,
    /// PEM, inlined into the sidecar's env.
    pub ca_bundle: Option<String>,
    /// Directory URLs an `acme-server` annotation may name besides `server` and Let's
    /// Encrypt's two.
    pub allowed_servers: Vec<String>,
}

impl Default for AcmeDefaults {
    fn default() -> Self {
        Self {
            server: sidecert_contract::LETSENCRYPT.to_owned(),
            email: None,
            profile: None,
            key_algorithm: KeyAlgorithm::default(),
            eab_secret: None,
            ca_bundle: None,
            allowed_servers: Vec::new(),
        }
    }
}

impl SidecarSettings {
    /// Settings from flags.
    pub fn from_args(args: &MutationArgs) -> Self {
        let quantities = |pairs: [(&str, &str); 2]| {
            let map: BTreeMap<String, Quantity> = pairs
                .into_iter()
                .filter(|(_, v)| !v.trim().is_empty())
                .map(|(k, v)| (k.to_owned(), Quantity(v.trim().to_owned())))
                .collect();
            (!map.is_empty()).then_some(map)
        };
        Self {
            image: args.sidecar_image.clone(),
            pull_policy: args.sidecar_image_pull_policy.clone(),
            resources: ResourceRequirements {
                requests: quantities([
                    ("cpu", &args.sidecar_cpu_request),
                    ("memory", &args.sidecar_memory_request),
                ]),
                limits: quantities([
                    ("cpu", &args.sidecar_cpu_limit),
                    ("memory", &args.sidecar_memory_limit),
                ]),
                ..Default::default()
            },
        }
    }
}

impl Default for SidecarSettings {
    fn default() -> Self {
        let args = default_mutation_args();
        Self::from_args(&args)
    }
}

/// The flags' defaults, for tests and library users.
pub fn default_mutation_args() -> MutationArgs {
    MutationArgs::default()
}

impl AcmeDefaults {
    /// Defaults from flags; reads the CA bundle file.
    pub fn from_args(args: &MutationArgs) -> Result<Self> {
        let ca_bundle = match &args.acme_ca_bundle_file {
            Some(path) => {
                let pem = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
                if !pem.contains("-----BEGIN CERTIFICATE-----") {
                    return Err(Error::Config(format!(
                        "{}: no PEM certificate in the ACME CA bundle",
                        path.display()
                    )));
                }
                Some(pem)
            }
            None => None,
        };
        let nonempty = |v: &Option<String>| v.clone().filter(|s| !s.trim().is_empty());
        let allowed_servers = args
            .allowed_acme_servers
            .iter()
            .filter(|s| !s.trim().is_empty())
            .map(|s| resolve_acme_server(s))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            allowed_servers,
            server: resolve_acme_server(&args.acme_server)?,
            email: nonempty(&args.acme_email),
            profile: nonempty(&args.acme_profile),
            key_algorithm: args.key_algorithm,
            eab_secret: nonempty(&args.eab_secret),
            ca_bundle,
        })
    }
}

impl AcmeDefaults {
    /// Whether an `acme-server` annotation may name `value`: Let's Encrypt's production or
    /// staging directory, the default server, or one of `--allowed-acme-servers`. A value
    /// that does not resolve is allowed here (it falls back to the default with a warning).
    pub fn allows_server(&self, value: &str) -> bool {
        match resolve_acme_server(value) {
            Ok(url) => {
                url == self.server
                    || url == sidecert_contract::LETSENCRYPT
                    || url == sidecert_contract::LETSENCRYPT_STAGING
                    || self.allowed_servers.contains(&url)
            }
            Err(_) => true,
        }
    }
}

/// Per-object overrides of the ACME defaults (Ingress or Pod annotations).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    pub acme_server: Option<String>,
    pub acme_email: Option<String>,
    pub acme_profile: Option<String>,
    pub key_algorithm: Option<String>,
}

impl Overrides {
    /// Reads the override annotations.
    pub fn from_annotations(map: Option<&BTreeMap<String, String>>) -> Self {
        let get = |k: &str| {
            map.and_then(|m| m.get(k))
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        Self {
            acme_server: get(annotations::ACME_SERVER),
            acme_email: get(annotations::ACME_EMAIL),
            acme_profile: get(annotations::ACME_PROFILE),
            key_algorithm: get(annotations::KEY_ALGORITHM),
        }
    }

    /// `self` where set, else `fallback`.
    pub fn or(self, fallback: &Self) -> Self {
        Self {
            acme_server: self.acme_server.or_else(|| fallback.acme_server.clone()),
            acme_email: self.acme_email.or_else(|| fallback.acme_email.clone()),
            acme_profile: self.acme_profile.or_else(|| fallback.acme_profile.clone()),
            key_algorithm: self.key_algorithm.or_else(|| fallback.key_algorithm.clone()),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// The sidecar's configuration: defaults, then overrides. Invalid override values fall back
/// to the default and add a warning.
pub fn sidecar_config(
    certificates: Vec<CertificateSpec>,
    defaults: &AcmeDefaults,
    overrides: &Overrides,
    reload_url: Option<String>,
    warnings: &mut Vec<String>,
) -> SidecarConfig {
    let acme_server = match overrides.acme_server.as_deref().map(resolve_acme_server) {
        Some(Ok(url)) => url,
        Some(Err(e)) => {
            warnings.push(format!("sidecert: {e}; using {}", defaults.server));
            defaults.server.clone()
        }
        None => defaults.server.clone(),
    };
    let key_algorithm = match overrides.key_algorithm.as_deref().map(str::parse::<KeyAlgorithm>) {
        Some(Ok(a)) => a,
        Some(Err(e)) => {
            warnings.push(format!("sidecert: {e}; using {}", defaults.key_algorithm));
            defaults.key_algorithm
        }
        None => defaults.key_algorithm,
    };
    SidecarConfig {
        certificates,
        acme_server,
        acme_email: overrides.acme_email.clone().or_else(|| defaults.email.clone()),
        acme_profile: overrides
            .acme_profile
            .clone()
            .or_else(|| defaults.profile.clone()),
        acme_ca_bundle: defaults.ca_bundle.clone(),
        eab_secret: defaults.eab_secret.clone(),
        key_algorithm,
        reload_url,
        http01_port: DEFAULT_HTTP01_PORT,
        metrics_port: DEFAULT_METRICS_PORT,
    }
}

/// The `sidecert` container for a configuration.
pub fn container(settings: &SidecarSettings, config: &SidecarConfig) -> Container {
    let probe = |path: &str| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String(HTTP01_PORT_NAME.to_owned()),
            ..Default::default()
        }),
        period_seconds: Some(10),
        timeout_seconds: Some(2),
        failure_threshold: Some(3),
        ..Default::default()
    };
    Container {
        name: SIDECAR_CONTAINER_NAME.to_owned(),
        image: Some(settings.image.clone()),
        image_pull_policy: Some(settings.pull_policy.clone()),
        command: Some(vec!["/sidecert-sidecar".to_owned()]),
        args: Some(vec!["run".to_owned()]),
        env: Some(config.to_env()),
        ports: Some(vec![
            ContainerPort {
                name: Some(HTTP01_PORT_NAME.to_owned()),
                container_port: i32::from(config.http01_port),
                protocol: Some("TCP".to_owned()),
                ..Default::default()
            },
            ContainerPort {
                name: Some(sidecert_contract::METRICS_PORT_NAME.to_owned()),
                container_port: i32::from(config.metrics_port),
                protocol: Some("TCP".to_owned()),
                ..Default::default()
            },
        ]),
        readiness_probe: Some(probe("/readyz")),
        liveness_probe: Some(probe("/healthz")),
        resources: Some(settings.resources.clone()),
        // A native sidecar (every supported Kubernetes release has them): it starts before
        // the app's containers, runs beside them, and does not keep a Job from completing.
        restart_policy: Some("Always".to_owned()),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(SIDECAR_UID),
            run_as_group: Some(SIDECAR_UID),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                add: None,
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                localhost_profile: None,
            }),
            ..Default::default()
        }),
        termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
        ..Default::default()
    }
}
