//! The contract between sidecert's parts, as types.
//!
//! The webhook writes it (annotations it reads, the env it injects into the sidecar
//! container); the sidecar reads it. Both sides link this crate, so the encoding has one
//! definition. See `DESIGN.md`, "The contract".

// Input reaches almost every function here: no slicing or indexing that can panic (`get`
// instead); tests may index.
#![cfg_attr(not(test), deny(clippy::indexing_slicing, clippy::string_slice))]

use std::{collections::BTreeSet, fmt, str::FromStr};

use k8s_openapi::{
    api::core::v1::{EnvVar, EnvVarSource, ObjectFieldSelector},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::{Deserialize, Serialize};

/// Expands to `"sidecert.io/<name>"`. The prefix is written here, and only here.
#[macro_export]
macro_rules! key {
    ($name:literal) => {
        concat!("sidecert.io/", $name)
    };
}

/// The prefix of every label and annotation sidecert reads or writes.
pub const PREFIX: &str = key!("");

/// Namespace label that opts a namespace in (`sidecert.io/injection=enabled`).
pub const INJECTION_LABEL: &str = key!("injection");
/// The value of [`INJECTION_LABEL`] that opts in.
pub const INJECTION_ENABLED: &str = "enabled";

/// Namespaces that are never mutated, whatever their labels say.
pub const NEVER_MUTATED_NAMESPACES: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];

pub mod hosts;

/// Annotation keys.
pub mod annotations {
    /// Ingress: the switch (`"true"`).
    pub const ISSUE_TEMPORARY_CERTIFICATE: &str = key!("issue-temporary-certificate");
    /// Ingress or Pod: `letsencrypt`, `letsencrypt-staging` or a directory URL.
    pub const ACME_SERVER: &str = key!("acme-server");
    /// Ingress or Pod: the ACME account's contact address.
    pub const ACME_EMAIL: &str = key!("acme-email");
    /// Ingress or Pod: the ACME profile to ask for (e.g. `tlsserver`, `shortlived`).
    pub const ACME_PROFILE: &str = key!("acme-profile");
    /// Ingress or Pod: see [`crate::KeyAlgorithm`].
    pub const KEY_ALGORITHM: &str = key!("key-algorithm");
    /// Pod: a URL inside the Pod the sidecar calls after a new certificate lands.
    pub const RELOAD_URL: &str = key!("reload-url");
    /// Pod: `"true"` opts in, `"false"` opts out (opt-out wins over everything).
    pub const INJECT: &str = key!("inject");
    /// Pod: comma-separated domains, for a Pod that is not behind an annotated Ingress.
    pub const DOMAINS: &str = key!("domains");
    /// Pod: the Secret to hold the certificate for [`DOMAINS`].
    pub const SECRET_NAME: &str = key!("secret-name");
    /// Pod: written by the webhook; a Pod that carries it is never patched again.
    pub const STATUS: &str = key!("status");
    /// Pod: written by the webhook; the certificates the sidecar owns, as JSON.
    pub const CERTIFICATES: &str = key!("certificates");
    /// Role: set by the Role pruning on a sidecar Role it would narrow or delete; any
    /// admission that touches the Role takes it off, and the next pruning pass acts only on
    /// a Role that still carries it (so a Pod admitted in between keeps its rights).
    pub const PRUNE_CANDIDATE: &str = key!("prune-candidate");
    /// Secret: `"true"` while the certificate is the webhook's temporary self-signed one.
    pub const TEMPORARY: &str = key!("temporary");
    /// Secret: RFC 3339 expiry of the certificate.
    pub const NOT_AFTER: &str = key!("not-after");
    /// Secret: RFC 3339 moment the sidecar plans to renew.
    pub const RENEW_AT: &str = key!("renew-at");
    /// Secret: the ACME directory that issued the certificate.
    pub const ISSUER_URL: &str = key!("issuer-url");
    /// Secret: comma-separated domains the certificate is for.
    pub const DOMAINS_ON_SECRET: &str = key!("domains");
    /// Lease (of a certificate, [`crate::CertificateSpec::lease_name`]): the key
    /// authorizations of the leader's running order, JSON token → key authorization. Every
    /// replica serves them. Key authorizations are public by design.
    pub const CHALLENGES: &str = key!("challenges");
    /// Lease: the holder's failed orders (JSON: `failures`, `notBefore` in unix seconds,
    /// `validations`: domain → unix seconds), so a new holder keeps the backoff and the
    /// CA's hourly limit on failed validations.
    pub const ORDER_FAILURES: &str = key!("order-failures");
    /// Workload Pod template (written by the webhook's reconciler): the `<ingress
    /// uid>:<generation>` keys it was restarted for (the last few), so each Ingress
    /// generation restarts it at most once.
    pub const RESTARTED_FOR: &str = key!("restarted-for");
    /// The webhook's CA Secret: when the running CA rollover started (Unix seconds).
    pub const CA_ROLLOVER_STARTED_AT: &str = key!("ca-rollover-started-at");
}

/// The value of [`annotations::STATUS`] after injection.
pub const STATUS_INJECTED: &str = "injected";
/// Name of the injected container.
pub const SIDECAR_CONTAINER_NAME: &str = "sidecert";
/// Name of the sidecar's HTTP-01 container port.
pub const HTTP01_PORT_NAME: &str = "sidecert-http";
/// Name of the sidecar's metrics container port (port names are at most 15 characters).
pub const METRICS_PORT_NAME: &str = "sidecert-prom";
/// Default HTTP-01 port of the sidecar.
pub const DEFAULT_HTTP01_PORT: u16 = 8089;
/// Default metrics port of the sidecar.
pub const DEFAULT_METRICS_PORT: u16 = 9089;
/// Suffix of the solver Service created for an Ingress backend Service.
pub const SOLVER_SERVICE_SUFFIX: &str = "-sidecert-solver";
/// Path prefix of HTTP-01 challenges.
pub const ACME_CHALLENGE_PATH: &str = "/.well-known/acme-challenge/";
/// Label the webhook puts on objects it creates (solver Services, Secrets, Roles).
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "sidecert";

/// Whether sidecert may write an existing Secret: only one it made (its managed-by label,
/// which every Secret sidecert ever created carries) or one holding its temporary
/// certificate. Any other Secret a `secretName` names belongs to someone else and is never
/// overwritten, whatever an Ingress or Pod asks. (Absent Secrets are sidecert's to create.)
/// Each mark can only be set by someone who may already write the Secret. The issuer-url
/// annotation is no mark: sidecars before the ownership rules wrote it into other teams'
/// Secrets too, and it stays there after their owners restore their data.
pub fn is_sidecerts_secret(meta: &ObjectMeta) -> bool {
    let labelled = meta
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .is_some_and(|v| v == MANAGED_BY);
    let annotation = |key: &str| meta.annotations.as_ref().and_then(|a| a.get(key));
    let temporary = annotation(annotations::TEMPORARY).is_some_and(|v| v == "true");
    labelled || temporary
}

/// The warning for a certificate whose Secret is someone else's.
pub fn foreign_secret_warning(namespace: &str, name: &str) -> String {
    format!(
        "sidecert: Secret {namespace}/{name} exists and is not sidecert's (no {MANAGED_BY_LABEL}={MANAGED_BY} \
         label, no {}=true annotation); it is left alone and no certificate is issued for it. Name \
         another Secret, or label this one {MANAGED_BY_LABEL}={MANAGED_BY} to hand it to sidecert",
        annotations::TEMPORARY,
    )
}

/// Well-known directory URLs.
pub const LETSENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// Let's Encrypt's staging directory.
pub const LETSENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";

/// Errors in contract values; each message names the offending value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ContractError {
    #[error(
        "unknown key algorithm {0:?}: expected one of ecdsa-p256, ecdsa-p384, rsa-2048, rsa-3072, rsa-4096"
    )]
    UnknownKeyAlgorithm(String),
    #[error(
        "invalid ACME server {0:?}: expected letsencrypt, letsencrypt-staging or an https:// directory URL"
    )]
    InvalidAcmeServer(String),
    #[error("invalid domain {domain:?}: {reason}")]
    InvalidDomain { domain: String, reason: &'static str },
    #[error("invalid Secret name {0:?}: must be a DNS-1123 subdomain")]
    InvalidSecretName(String),
    #[error(
        "Secret name {0:?} is reserved: names starting with {ACCOUNT_SECRET_PREFIX:?} hold the namespace's ACME account"
    )]
    ReservedSecretName(String),
    #[error(
        "Secret name {0:?} is too long for a certificate: at most {MAX_CERTIFICATE_SECRET_NAME} characters, so that its Lease (sidecert-<name>) is a valid name of its own"
    )]
    CertificateSecretNameTooLong(String),
    #[error("missing {0}")]
    Missing(&'static str),
    #[error("invalid {name}: {reason}")]
    Invalid { name: &'static str, reason: String },
}

/// Private key algorithm of issued certificates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum KeyAlgorithm {
    #[default]
    EcdsaP256,
    EcdsaP384,
    Rsa2048,
    Rsa3072,
    Rsa4096,
}

impl KeyAlgorithm {
    /// Every algorithm, in the order the docs list them.
    pub const ALL: [KeyAlgorithm; 5] = [
        Self::EcdsaP256,
        Self::EcdsaP384,
        Self::Rsa2048,
        Self::Rsa3072,
        Self::Rsa4096,
    ];

    /// The annotation value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EcdsaP256 => "ecdsa-p256",
            Self::EcdsaP384 => "ecdsa-p384",
            Self::Rsa2048 => "rsa-2048",
            Self::Rsa3072 => "rsa-3072",
            Self::Rsa4096 => "rsa-4096",
        }
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyAlgorithm {
    type Err = ContractError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        Self::ALL
            .into_iter()
            .find(|a| a.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| ContractError::UnknownKeyAlgorithm(s.to_owned()))
    }
}

impl TryFrom<String> for KeyAlgorithm {
    type Error = ContractError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<KeyAlgorithm> for String {
    fn from(a: KeyAlgorithm) -> String {
        a.as_str().to_owned()
    }
}

/// Resolves an `acme-server` value (`letsencrypt`, `letsencrypt-staging` or a URL) to a
/// directory URL.
pub fn resolve_acme_server(value: &str) -> Result<String, ContractError> {
    let v = value.trim();
    match v {
        "letsencrypt" | "letsencrypt-production" => Ok(LETSENCRYPT.to_owned()),
        "letsencrypt-staging" => Ok(LETSENCRYPT_STAGING.to_owned()),
        url if url.starts_with("https://")
            && url.len() > "https://".len()
            && !url.contains(char::is_whitespace) =>
        {
            Ok(url.to_owned())
        }
        _ => Err(ContractError::InvalidAcmeServer(value.to_owned())),
    }
}

/// Checks a domain name for an HTTP-01 certificate: a lower-case DNS name, no wildcard.
pub fn validate_domain(domain: &str) -> Result<(), ContractError> {
    let bad = |reason| {
        Err(ContractError::InvalidDomain {
            domain: domain.to_owned(),
            reason,
        })
    };
    if domain.starts_with("*.") {
        return bad("wildcard names cannot be validated with HTTP-01");
    }
    if domain.is_empty() || domain.len() > 253 {
        return bad("must be 1 to 253 characters");
    }
    if domain.parse::<std::net::IpAddr>().is_ok() {
        return bad("IP addresses are not supported, only DNS names");
    }
    for label in domain.split('.') {
        if label.is_empty() || label.len() > 63 {
            return bad("each label must be 1 to 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return bad("only lower-case letters, digits, '-' and '.' are allowed");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad("a label must not start or end with '-'");
        }
    }
    Ok(())
}

/// Checks a Secret name (DNS-1123 subdomain).
pub fn validate_secret_name(name: &str) -> Result<(), ContractError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err(ContractError::InvalidSecretName(name.to_owned()))
    }
}

/// Parses a comma-separated `sidecert.io/domains` value: trimmed, lower-cased,
/// deduplicated, sorted, each validated.
/// Names in one certificate at most: what Let's Encrypt accepts in one order with its
/// `classic` profile (its `tlsserver` and `shortlived` profiles take 25).
pub const MAX_NAMES_PER_ORDER: usize = 100;

/// Names Let's Encrypt accepts in one order with its `tlsserver` and `shortlived` profiles.
pub const MAX_NAMES_SHORT_PROFILES: usize = 25;

/// Names in one order with an ACME profile (`None`: the CA's default, `classic` at Let's
/// Encrypt). A profile sidecert does not know gets the larger limit; the CA has the last word.
pub fn max_names_per_order(profile: Option<&str>) -> usize {
    match profile.map(str::trim) {
        Some(p) if p.eq_ignore_ascii_case("tlsserver") || p.eq_ignore_ascii_case("shortlived") => {
            MAX_NAMES_SHORT_PROFILES
        }
        _ => MAX_NAMES_PER_ORDER,
    }
}

pub fn parse_domains(value: &str) -> Result<Vec<String>, ContractError> {
    let set: BTreeSet<String> = value
        .split(',')
        .map(|d| d.trim().to_ascii_lowercase())
        .filter(|d| !d.is_empty())
        .collect();
    if set.is_empty() {
        return Err(ContractError::Missing("domains"));
    }
    if set.len() > MAX_NAMES_PER_ORDER {
        return Err(ContractError::Invalid {
            name: "domains",
            reason: format!(
                "{} names, more than an ACME CA accepts in one order ({MAX_NAMES_PER_ORDER} at Let's Encrypt)",
                set.len()
            ),
        });
    }
    for d in &set {
        validate_domain(d)?;
    }
    Ok(set.into_iter().collect())
}

/// Checks the name of a certificate's Secret: a valid Secret name that is not one of the
/// namespace's ACME account Secrets (every sidecar there may write those; a certificate
/// written into one would destroy the account).
pub fn validate_certificate_secret_name(name: &str) -> Result<(), ContractError> {
    validate_secret_name(name)?;
    if name.starts_with(ACCOUNT_SECRET_PREFIX) {
        return Err(ContractError::ReservedSecretName(name.to_owned()));
    }
    if name.len() > MAX_CERTIFICATE_SECRET_NAME {
        return Err(ContractError::CertificateSecretNameTooLong(name.to_owned()));
    }
    Ok(())
}

/// The longest certificate Secret name: its Lease, `sidecert-<name>`, must fit in 253
/// characters as it is. A cut name (even with a hash) could equal another certificate's
/// Lease name, and two certificates would share a Lease.
pub const MAX_CERTIFICATE_SECRET_NAME: usize = 253 - "sidecert-".len();

/// One certificate a sidecar owns: the Secret that holds it and its domains.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateSpec {
    pub secret_name: String,
    /// Sorted, deduplicated, lower-case.
    pub domains: Vec<String>,
    /// For a certificate selected through an Ingress: the solver Service
    /// (`<backend>-sidecert-solver`) whose endpoints the Ingress host routes challenges to.
    /// The leader waits for this Pod set to be routable before telling the CA to validate.
    /// `None` for direct-annotation Pods (no wait).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub solver_service: Option<String>,
}

impl CertificateSpec {
    /// Builds a validated spec; domains are normalised (sorted, deduplicated, lower-case).
    pub fn new(
        secret_name: impl Into<String>,
        domains: impl IntoIterator<Item = impl AsRef<str>>,
    ) -> Result<Self, ContractError> {
        let secret_name = secret_name.into();
        validate_certificate_secret_name(&secret_name)?;
        let joined = domains
            .into_iter()
            .map(|d| d.as_ref().to_owned())
            .collect::<Vec<_>>()
            .join(",");
        Ok(Self {
            secret_name,
            domains: parse_domains(&joined)?,
            solver_service: None,
        })
    }

    /// Sets the solver Service whose endpoints the Ingress routes challenges to
    /// (validated as a DNS-1123 label, like every Service name).
    pub fn with_solver_service(mut self, name: impl Into<String>) -> Result<Self, ContractError> {
        let name = name.into();
        validate_service_name(&name)?;
        self.solver_service = Some(name);
        Ok(self)
    }

    /// The Lease that elects the one sidecar ordering this certificate.
    pub fn lease_name(&self) -> String {
        lease_name(&self.secret_name)
    }
}

/// The Lease name for the certificate held in `secret_name`: `sidecert-<secret_name>`. A
/// certificate's Secret name is at most [`MAX_CERTIFICATE_SECRET_NAME`] long, so this is
/// never cut; for any longer input it stays a valid name (cut, with a hash).
pub fn lease_name(secret_name: &str) -> String {
    bounded_name(&format!("sidecert-{secret_name}"), 253)
}

/// Encodes a certificate list (for the `certificates` annotation and the env).
pub fn encode_certificates(certs: &[CertificateSpec]) -> String {
    // Serialising plain strings into JSON cannot fail.
    serde_json::to_string(certs).unwrap_or_else(|_| "[]".to_owned())
}

/// Decodes and validates a certificate list.
pub fn decode_certificates(value: &str) -> Result<Vec<CertificateSpec>, ContractError> {
    let raw: Vec<CertificateSpec> = serde_json::from_str(value).map_err(|e| ContractError::Invalid {
        name: "certificates",
        reason: e.to_string(),
    })?;
    if raw.is_empty() {
        return Err(ContractError::Missing("certificates"));
    }
    raw.into_iter()
        .map(|c| {
            let spec = CertificateSpec::new(c.secret_name, c.domains)?;
            match c.solver_service {
                Some(svc) => spec.with_solver_service(svc),
                None => Ok(spec),
            }
        })
        .collect()
}

/// Checks a Service name (DNS-1035 label: at most 63 characters, lower-case letters,
/// digits and '-', starting with a letter, not ending with '-').
pub fn validate_service_name(name: &str) -> Result<(), ContractError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(ContractError::Invalid {
            name: "solverService",
            reason: format!("{name:?} is not a valid Service name (DNS-1035 label)"),
        })
    }
}

/// How the names of the namespace's ACME account Secrets begin.
pub const ACCOUNT_SECRET_PREFIX: &str = "sidecert-acme-account-";

/// Name of the Secret holding the ACME account for (server, email) in a namespace.
/// Stable across releases: every sidecar of the namespace must derive the same name. The
/// hash is no protection (a Pod author picks the email): the webhook grants a right on the
/// name only after the API server says the Secret is absent or sidecert's.
pub fn account_secret_name(directory_url: &str, email: Option<&str>) -> String {
    let h = fnv1a64(format!("{directory_url}\n{}", email.unwrap_or("")).as_bytes());
    format!("{ACCOUNT_SECRET_PREFIX}{:012x}", h & 0xffff_ffff_ffff)
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A generated object name of at most `max` bytes (for `max` of 10 or more), whatever
/// `name` holds: `name` itself when it fits, else its longest prefix that ends on a character boundary and fits beside a `-`
/// and eight hex digits of a hash of the whole name (trailing `-` and `.` dropped), so two
/// long names that share a prefix still get two names. Never panics, even when byte `max`
/// falls inside a multi-byte character.
pub fn bounded_name(name: &str, max: usize) -> String {
    if name.len() <= max {
        return name.to_owned();
    }
    let hash = format!("{:08x}", fnv1a64(name.as_bytes()) & 0xffff_ffff);
    let mut cut = max.saturating_sub(hash.len() + 1).min(name.len());
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    let prefix = name.get(..cut).unwrap_or_default().trim_end_matches(['-', '.']);
    format!("{prefix}-{hash}")
}

/// Environment variable names of the injected sidecar container.
pub mod env {
    pub const CERTIFICATES: &str = "SIDECERT_CERTIFICATES";
    pub const ACME_SERVER: &str = "SIDECERT_ACME_SERVER";
    pub const ACME_EMAIL: &str = "SIDECERT_ACME_EMAIL";
    pub const ACME_PROFILE: &str = "SIDECERT_ACME_PROFILE";
    pub const ACME_CA_BUNDLE: &str = "SIDECERT_ACME_CA_BUNDLE";
    pub const EAB_SECRET: &str = "SIDECERT_EAB_SECRET";
    pub const KEY_ALGORITHM: &str = "SIDECERT_KEY_ALGORITHM";
    pub const RELOAD_URL: &str = "SIDECERT_RELOAD_URL";
    pub const HTTP01_PORT: &str = "SIDECERT_HTTP01_PORT";
    pub const METRICS_PORT: &str = "SIDECERT_METRICS_PORT";
    pub const POD_NAME: &str = "SIDECERT_POD_NAME";
    pub const POD_NAMESPACE: &str = "SIDECERT_POD_NAMESPACE";
    pub const POD_UID: &str = "SIDECERT_POD_UID";
    pub const POD_IP: &str = "SIDECERT_POD_IP";
}

/// What the webhook tells the sidecar: everything but the Pod's own identity, which comes
/// from the downward API (see [`PodIdentity`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SidecarConfig {
    pub certificates: Vec<CertificateSpec>,
    /// Directory URL.
    pub acme_server: String,
    pub acme_email: Option<String>,
    pub acme_profile: Option<String>,
    /// PEM bundle to trust for the ACME server's HTTPS, for private CAs (and Pebble).
    pub acme_ca_bundle: Option<String>,
    /// Secret (in the Pod's namespace) with `keyId` and `hmacKey` for external account binding.
    pub eab_secret: Option<String>,
    pub key_algorithm: KeyAlgorithm,
    pub reload_url: Option<String>,
    pub http01_port: u16,
    pub metrics_port: u16,
}

impl SidecarConfig {
    /// The container env that carries this configuration, plus the downward-API fields.
    pub fn to_env(&self) -> Vec<EnvVar> {
        let mut out = vec![
            plain(env::CERTIFICATES, encode_certificates(&self.certificates)),
            plain(env::ACME_SERVER, self.acme_server.clone()),
            plain(env::KEY_ALGORITHM, self.key_algorithm.as_str().to_owned()),
            plain(env::HTTP01_PORT, self.http01_port.to_string()),
            plain(env::METRICS_PORT, self.metrics_port.to_string()),
        ];
        let optional = [
            (env::ACME_EMAIL, &self.acme_email),
            (env::ACME_PROFILE, &self.acme_profile),
            (env::ACME_CA_BUNDLE, &self.acme_ca_bundle),
            (env::EAB_SECRET, &self.eab_secret),
            (env::RELOAD_URL, &self.reload_url),
        ];
        out.extend(
            optional
                .into_iter()
                .filter_map(|(k, v)| v.clone().map(|v| plain(k, v))),
        );
        out.extend([
            field(env::POD_NAME, "metadata.name"),
            field(env::POD_NAMESPACE, "metadata.namespace"),
            field(env::POD_UID, "metadata.uid"),
            field(env::POD_IP, "status.podIP"),
        ]);
        out
    }

    /// Decodes the configuration from an environment (`std::env::var` in the sidecar).
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Self, ContractError> {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let port = |k: &'static str, default: u16| -> Result<u16, ContractError> {
            get(k).map_or(Ok(default), |v| {
                v.trim().parse().map_err(|_| ContractError::Invalid {
                    name: k,
                    reason: format!("{v:?} is not a port number"),
                })
            })
        };
        Ok(Self {
            certificates: decode_certificates(
                &get(env::CERTIFICATES).ok_or(ContractError::Missing(env::CERTIFICATES))?,
            )?,
            acme_server: resolve_acme_server(
                &get(env::ACME_SERVER).ok_or(ContractError::Missing(env::ACME_SERVER))?,
            )?,
            acme_email: get(env::ACME_EMAIL),
            acme_profile: get(env::ACME_PROFILE),
            acme_ca_bundle: get(env::ACME_CA_BUNDLE),
            eab_secret: get(env::EAB_SECRET),
            key_algorithm: get(env::KEY_ALGORITHM).map_or(Ok(KeyAlgorithm::default()), |v| v.parse())?,
            reload_url: get(env::RELOAD_URL),
            http01_port: port(env::HTTP01_PORT, DEFAULT_HTTP01_PORT)?,
            metrics_port: port(env::METRICS_PORT, DEFAULT_METRICS_PORT)?,
        })
    }
}

/// The Pod's identity, from the downward API.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodIdentity {
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub uid: Option<String>,
    pub ip: Option<String>,
}

impl PodIdentity {
    /// Reads the identity from an environment.
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Self {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        Self {
            name: get(env::POD_NAME),
            namespace: get(env::POD_NAMESPACE),
            uid: get(env::POD_UID),
            ip: get(env::POD_IP),
        }
    }
}

fn plain(name: &str, value: String) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value),
        value_from: None,
    }
}

fn field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                api_version: None,
                field_path: path.to_owned(),
            }),
            ..Default::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn only_secrets_sidecert_made_or_holds_a_temporary_certificate_in_are_its_own() {
        let meta = |labels: &[(&str, &str)], annotations: &[(&str, &str)]| ObjectMeta {
            labels: Some(labels.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect()),
            annotations: Some(
                annotations
                    .iter()
                    .map(|(k, v)| ((*k).into(), (*v).into()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        };
        assert!(is_sidecerts_secret(&meta(&[(MANAGED_BY_LABEL, MANAGED_BY)], &[])));
        assert!(is_sidecerts_secret(&meta(
            &[],
            &[(annotations::TEMPORARY, "true")]
        )));
        assert!(!is_sidecerts_secret(&ObjectMeta::default()));
        assert!(!is_sidecerts_secret(&meta(
            &[(MANAGED_BY_LABEL, "cert-manager")],
            &[]
        )));
        assert!(!is_sidecerts_secret(&meta(
            &[],
            &[(annotations::TEMPORARY, "false")]
        )));
        assert!(!is_sidecerts_secret(&meta(&[("sidecert", "sidecert")], &[])));
        // Another team's Secret an old sidecar wrote into keeps the issuer-url annotation
        // after its owner restores it: still theirs.
        assert!(!is_sidecerts_secret(&meta(
            &[],
            &[(annotations::ISSUER_URL, "https://acme.example/dir")]
        )));
        assert_eq!(max_names_per_order(None), 100);
        assert_eq!(max_names_per_order(Some("classic")), 100);
        assert_eq!(max_names_per_order(Some(" ShortLived ")), 25);
        assert_eq!(max_names_per_order(Some("tlsserver")), 25);
    }

    #[test]
    fn no_two_certificates_share_a_lease() {
        // Two Secret names of 245+ characters with one prefix shared a Lease when it was cut
        // at 253; with a hash instead, a short name could still equal the cut one. A
        // certificate's Secret name is now short enough for its Lease to be never cut.
        let longest = "x".repeat(MAX_CERTIFICATE_SECRET_NAME);
        assert!(CertificateSpec::new(longest.as_str(), ["a.example"]).is_ok());
        assert_eq!(lease_name(&longest), format!("sidecert-{longest}"));
        assert_eq!(lease_name(&longest).len(), 253);
        let longer = format!("{longest}x");
        let err = CertificateSpec::new(longer.as_str(), ["a.example"]).unwrap_err();
        assert!(
            matches!(err, ContractError::CertificateSecretNameTooLong(_)),
            "{err}"
        );
        assert!(lease_name(&longer).len() <= 253);
        assert_eq!(lease_name("web-tls"), "sidecert-web-tls");
    }

    #[test]
    fn bounded_names_fit_and_never_collide_or_panic() {
        assert_eq!(bounded_name("web-sidecert-solver", 63), "web-sidecert-solver");
        let long_a = format!("{}-a-sidecert-solver", "x".repeat(60));
        let long_b = format!("{}-b-sidecert-solver", "x".repeat(60));
        let (a, b) = (bounded_name(&long_a, 63), bounded_name(&long_b, 63));
        assert!(a.len() <= 63 && b.len() <= 63, "{a} {b}");
        assert_ne!(a, b, "same 54-byte prefix, different names");
        assert!(validate_service_name(&a).is_ok(), "{a}");
        // Byte 54 (and 63) inside a two-byte character: cut before it, no panic.
        for pad in 50..70 {
            let name = format!("{}{}", "a".repeat(pad), "é".repeat(20));
            let got = bounded_name(&name, 63);
            assert!(got.len() <= 63, "{got}");
            assert!(got.ends_with(&format!("{:08x}", fnv1a64(name.as_bytes()) & 0xffff_ffff)));
        }
        // A prefix of dashes and dots leaves no trailing separator before the hash.
        let got = bounded_name(&format!("a{}", "-.".repeat(200)), 63);
        assert!(got.starts_with("a-") && got.len() == 10, "{got}");
        assert!(bounded_name("ééééé", 3).len() <= 9);
    }

    /// The env the webhook would inject for `cfg`, by name.
    fn env_map(cfg: &SidecarConfig) -> HashMap<String, String> {
        cfg.to_env()
            .into_iter()
            .filter_map(|e| e.value.map(|v| (e.name, v)))
            .collect()
    }

    #[test]
    fn every_key_has_the_prefix() {
        assert_eq!(PREFIX, "sidecert.io/");
        for k in [
            INJECTION_LABEL,
            annotations::ISSUE_TEMPORARY_CERTIFICATE,
            annotations::STATUS,
            annotations::TEMPORARY,
        ] {
            assert!(k.starts_with(PREFIX), "{k}");
        }
    }

    #[test]
    fn port_names_are_valid_iana_service_names() {
        for name in [HTTP01_PORT_NAME, METRICS_PORT_NAME] {
            assert!(name.len() <= 15, "{name} is longer than 15 characters");
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            );
            assert!(!name.contains("--") && !name.starts_with('-') && !name.ends_with('-'));
        }
    }

    #[test]
    fn key_algorithms_round_trip() {
        for a in KeyAlgorithm::ALL {
            assert_eq!(a.as_str().parse::<KeyAlgorithm>().unwrap(), a);
        }
        assert_eq!(
            "ECDSA-P384".parse::<KeyAlgorithm>().unwrap(),
            KeyAlgorithm::EcdsaP384
        );
        let err = "ed25519".parse::<KeyAlgorithm>().unwrap_err();
        assert!(err.to_string().contains("ed25519"));
    }

    #[test]
    fn acme_servers() {
        assert_eq!(resolve_acme_server("letsencrypt").unwrap(), LETSENCRYPT);
        assert_eq!(
            resolve_acme_server("letsencrypt-staging").unwrap(),
            LETSENCRYPT_STAGING
        );
        assert_eq!(resolve_acme_server("https://ca/dir").unwrap(), "https://ca/dir");
        assert!(resolve_acme_server("http://ca/dir").is_err());
        assert!(resolve_acme_server("zerossl").is_err());
    }

    #[test]
    fn domains_are_normalised_and_checked() {
        assert_eq!(
            parse_domains(" B.example, a.example,b.example ").unwrap(),
            ["a.example", "b.example"]
        );
        assert!(
            parse_domains("*.example.com")
                .unwrap_err()
                .to_string()
                .contains("wildcard")
        );
        assert!(parse_domains("").is_err());
        assert!(parse_domains("a_b.example").is_err());
        assert!(parse_domains("10.0.0.1").is_err());
    }

    #[test]
    fn env_round_trips() {
        let cfg = SidecarConfig {
            certificates: vec![
                CertificateSpec::new("web-tls", ["www.example", "example"]).unwrap(),
                CertificateSpec::new("api-tls", ["api.example"]).unwrap(),
            ],
            acme_server: "https://pebble:14000/dir".into(),
            acme_email: Some("ops@example.com".into()),
            acme_profile: Some("shortlived".into()),
            acme_ca_bundle: None,
            eab_secret: None,
            key_algorithm: KeyAlgorithm::Rsa3072,
            reload_url: Some("http://127.0.0.1:8080/-/reload".into()),
            http01_port: 8089,
            metrics_port: 9089,
        };
        let env = env_map(&cfg);
        let back = SidecarConfig::from_env(|k| env.get(k).cloned()).unwrap();
        assert_eq!(back, cfg);
        assert_eq!(back.certificates[0].domains, ["example", "www.example"]);
    }

    #[test]
    fn env_round_trips_with_and_without_solver_service() {
        let with = CertificateSpec::new("web-tls", ["www.example"])
            .unwrap()
            .with_solver_service("web-sidecert-solver")
            .unwrap();
        let without = CertificateSpec::new("api-tls", ["api.example"]).unwrap();
        assert_eq!(without.solver_service, None);
        let cfg = SidecarConfig {
            certificates: vec![with.clone(), without.clone()],
            acme_server: "https://pebble:14000/dir".into(),
            acme_email: None,
            acme_profile: None,
            acme_ca_bundle: None,
            eab_secret: None,
            key_algorithm: KeyAlgorithm::default(),
            reload_url: None,
            http01_port: 8089,
            metrics_port: 9089,
        };
        let env = env_map(&cfg);
        let encoded = &env[env::CERTIFICATES];
        assert!(
            encoded.contains("\"solverService\":\"web-sidecert-solver\""),
            "{encoded}"
        );
        // Absent, not null, when there is none: older sidecars decode it unchanged.
        assert_eq!(encoded.matches("solverService").count(), 1, "{encoded}");
        let back = SidecarConfig::from_env(|k| env.get(k).cloned()).unwrap();
        assert_eq!(back, cfg);
        assert_eq!(
            back.certificates[0].solver_service.as_deref(),
            Some("web-sidecert-solver")
        );
        assert_eq!(back.certificates[1].solver_service, None);

        // Encodings written before the field existed still decode.
        let old = decode_certificates("[{\"secretName\":\"x\",\"domains\":[\"a.example\"]}]").unwrap();
        assert_eq!(old, [CertificateSpec::new("x", ["a.example"]).unwrap()]);
        // A bad solver Service name is named in the error.
        let err = decode_certificates(
            "[{\"secretName\":\"x\",\"domains\":[\"a.example\"],\"solverService\":\"Bad_Name\"}]",
        )
        .unwrap_err();
        assert!(err.to_string().contains("Bad_Name"), "{err}");
    }

    #[test]
    fn bad_env_names_the_variable() {
        let err = SidecarConfig::from_env(|_| None).unwrap_err();
        assert_eq!(err.to_string(), "missing SIDECERT_CERTIFICATES");
        let err = decode_certificates("[{\"secretName\":\"x\",\"domains\":[\"*.a\"]}]").unwrap_err();
        assert!(err.to_string().contains("wildcard"));
    }

    #[test]
    fn account_secret_name_is_stable() {
        let a = account_secret_name("https://ca/dir", Some("a@b"));
        assert_eq!(a, account_secret_name("https://ca/dir", Some("a@b")));
        assert_ne!(a, account_secret_name("https://ca/dir", None));
        assert!(validate_secret_name(&a).is_ok());
        assert_eq!(a, "sidecert-acme-account-794f0b4680dd"); // pinned: changing it orphans accounts
    }

    #[test]
    fn a_certificate_never_lives_in_an_account_secret() {
        let account = account_secret_name("https://ca/dir", Some("a@b"));
        for name in [account.as_str(), "sidecert-acme-account-web"] {
            let err = CertificateSpec::new(name, ["a.example"]).unwrap_err();
            assert!(matches!(err, ContractError::ReservedSecretName(_)), "{err}");
            assert!(err.to_string().contains("ACME account"), "{err}");
        }
        // What the sidecar decodes is checked the same way.
        let encoded = format!("[{{\"secretName\":\"{account}\",\"domains\":[\"a.example\"]}}]");
        assert!(decode_certificates(&encoded).is_err());
        assert!(CertificateSpec::new("sidecert-acme-web", ["a.example"]).is_ok());
    }
}
