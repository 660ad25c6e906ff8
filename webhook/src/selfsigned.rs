//! `serve --self-signed`: the webhook manages its own serving certificate.
//!
//! - **CA**: a P-256 CA in the Secret `--ca-secret-name` of the release namespace (keys
//!   `ca.crt`, `ca.key`; `next-ca.crt`, `next-ca.key` during a rollover). It is read at
//!   start, or created if absent; when two replicas race, the loser of the create (409)
//!   re-reads and uses the winner's CA, so there is always one CA.
//! - **Serving certificate**: issued in memory (never written to disk) for `<svc>`,
//!   `<svc>.<ns>`, `<svc>.<ns>.svc`, `<svc>.<ns>.svc.cluster.local` and the extra names and
//!   addresses, and swapped into a [`MemoryResolver`]; connections in flight keep theirs.
//! - **caBundle**: every webhook of the MutatingWebhookConfiguration gets the current CA (and
//!   the next one during a rollover) by server-side apply with the field manager
//!   [`FIELD_MANAGER`], sending only `name` and `clientConfig.caBundle` of the webhooks that
//!   exist (so a webhook removed by `helm upgrade` is never recreated half-empty).
//! - **Rotation**: the serving certificate is re-issued when less than
//!   `--serving-rotate-before` is left, or when the signing CA changes. When the CA has less
//!   than `--ca-rotate-before` left, one replica writes a next CA into the Secret (update
//!   with resourceVersion; a conflict means another replica did it); every replica publishes
//!   the bundle current+next; once the next CA has stood in the live `caBundle` for
//!   `--ca-rollover-delay`, each replica serves a certificate from the next CA; after twice
//!   that delay from the start of the rollover, a replica that already serves from the next
//!   CA promotes it (next → current) and the old CA leaves the bundle. Replicas follow each
//!   other through a watch on the Secret.
//! - **Readiness**: `/readyz` is true only while the served certificate chains to a CA in the
//!   live `caBundle` of every webhook of the configuration (checked on every change of the
//!   Secret or the configuration, and every 30 s). When the API server cannot be reached, the
//!   last answer stands and the certificate in memory keeps being served and renewed.
//!
//! RBAC this needs (the chart's Role and ClusterRole):
//!
//! ```yaml
//! # Role in the release namespace
//! - apiGroups: [""]
//!   resources: [secrets]
//!   verbs: [create]                      # create can not be limited by resourceNames
//! - apiGroups: [""]
//!   resources: [secrets]
//!   resourceNames: [sidecert-webhook-ca] # --ca-secret-name
//!   verbs: [get, list, watch, update]    # list/watch use a metadata.name field selector
//! # ClusterRole
//! - apiGroups: [admissionregistration.k8s.io]
//!   resources: [mutatingwebhookconfigurations]
//!   resourceNames: [sidecert]            # --webhook-configuration-name
//!   verbs: [get, list, watch, patch]
//! ```
//!
//! The chart must not template the CA Secret (Helm would overwrite or delete it), and must
//! leave `caBundle` out of the configuration's webhooks.

use std::{collections::BTreeMap, net::IpAddr, sync::Arc, time::Duration};

use futures::{StreamExt, stream};
use k8s_openapi::{
    ByteString,
    api::{admissionregistration::v1::MutatingWebhookConfiguration, core::v1::Secret},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType,
};
use rustls::sign::CertifiedKey;
use serde_json::json;
use time::OffsetDateTime;
use x509_parser::{certificate::X509Certificate, pem::Pem, time::ASN1Time};

use crate::{
    Error, Result,
    admission::Readiness,
    config::SelfSignedArgs,
    metrics::Metrics,
    tls::{MemoryResolver, certified_key},
};

/// The field manager of the `caBundle` server-side apply.
pub const FIELD_MANAGER: &str = "sidecert-webhook";
/// Secret keys.
pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const NEXT_CA_CERT: &str = "next-ca.crt";
pub const NEXT_CA_KEY: &str = "next-ca.key";
/// When the running rollover started (Unix seconds), on the CA Secret.
pub const ROLLOVER_STARTED_ANNOTATION: &str = sidecert_contract::key!("ca-rollover-started-at");
/// Where in-cluster processes find their namespace.
pub const SERVICE_ACCOUNT_NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";
/// How often the live `caBundle` and the Secret are checked even without a watch event.
pub const RECHECK: Duration = Duration::from_secs(30);
/// How often a missing configuration is looked for besides its watch.
const CONFIG_RECHECK: Duration = Duration::from_secs(5);
/// Certificates start a little in the past, for clocks that run behind.
const BACKDATE: Duration = Duration::from_secs(300);

/// The resolved settings of `--self-signed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub namespace: String,
    pub ca_secret_name: String,
    pub webhook_configuration_name: String,
    pub dns_names: Vec<String>,
    pub ip_sans: Vec<IpAddr>,
    pub ca_validity: Duration,
    pub ca_rotate_before: Duration,
    pub serving_validity: Duration,
    pub serving_rotate_before: Duration,
    pub rollover_delay: Duration,
}

impl Settings {
    /// Resolves the namespace (flag, service-account file, `POD_NAMESPACE`) and checks the
    /// periods.
    pub fn from_args(args: &SelfSignedArgs) -> Result<Self> {
        let namespace = match args.namespace.as_deref().map(str::trim) {
            Some(ns) if !ns.is_empty() => ns.to_owned(),
            _ => own_namespace(
                std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE_FILE).ok(),
                std::env::var("POD_NAMESPACE").ok(),
            )?,
        };
        check_periods(args).map_err(Error::Config)?;
        for (flag, value) in [
            ("--service-name", &args.service_name),
            ("--ca-secret-name", &args.ca_secret_name),
            ("--webhook-configuration-name", &args.webhook_configuration_name),
        ] {
            if value.trim().is_empty() {
                return Err(Error::Config(format!("{flag} is empty")));
            }
        }
        let names = dns_names(&args.service_name, &namespace, &args.extra_dns_names);
        // A bad name is a configuration error: fail now, not on every retry.
        subject_alt_names(&names, &args.extra_ip_sans)?;
        Ok(Self {
            dns_names: names,
            namespace,
            ca_secret_name: args.ca_secret_name.clone(),
            webhook_configuration_name: args.webhook_configuration_name.clone(),
            ip_sans: args.extra_ip_sans.clone(),
            ca_validity: args.ca_validity,
            ca_rotate_before: args.ca_rotate_before,
            serving_validity: args.serving_validity,
            serving_rotate_before: args.serving_rotate_before,
            rollover_delay: args.ca_rollover_delay,
        })
    }
}

/// The namespace when `--namespace` is not given: the service-account file, then
/// `POD_NAMESPACE`.
pub fn own_namespace(file: Option<String>, env: Option<String>) -> Result<String> {
    [file, env]
        .into_iter()
        .flatten()
        .map(|s| s.trim().to_owned())
        .find(|s| !s.is_empty())
        .ok_or_else(|| {
            Error::Config(format!(
                "--self-signed needs a namespace: give --namespace, or run in a Pod \
                 ({SERVICE_ACCOUNT_NAMESPACE_FILE}) or set POD_NAMESPACE"
            ))
        })
}

/// The validity periods must leave room to rotate.
pub fn check_periods(args: &SelfSignedArgs) -> Result<(), String> {
    if args.serving_validity.is_zero() || args.ca_validity.is_zero() {
        return Err("validity periods must be longer than zero".to_owned());
    }
    if args.serving_rotate_before >= args.serving_validity {
        return Err(format!(
            "--serving-rotate-before ({:?}) must be shorter than --serving-validity ({:?})",
            args.serving_rotate_before, args.serving_validity
        ));
    }
    if args.ca_rotate_before >= args.ca_validity {
        return Err(format!(
            "--ca-rotate-before ({:?}) must be shorter than --ca-validity ({:?})",
            args.ca_rotate_before, args.ca_validity
        ));
    }
    if args.ca_rotate_before <= args.ca_rollover_delay.saturating_mul(2) {
        return Err(format!(
            "--ca-rotate-before ({:?}) must be longer than twice --ca-rollover-delay ({:?}): \
             the rollover must finish before the CA expires",
            args.ca_rotate_before, args.ca_rollover_delay
        ));
    }
    Ok(())
}

/// The Service's DNS names, then the extra ones, without duplicates or blanks.
pub fn dns_names(service: &str, namespace: &str, extra: &[String]) -> Vec<String> {
    let service = service.trim();
    let own = [
        service.to_owned(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ];
    let mut names: Vec<String> = Vec::new();
    for name in own.into_iter().chain(extra.iter().map(|s| s.trim().to_owned())) {
        if !name.is_empty() && !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

/// Subject alternative names: the DNS names, then the IP addresses.
pub fn subject_alt_names(dns: &[String], ips: &[IpAddr]) -> Result<Vec<SanType>> {
    let mut sans = Vec::with_capacity(dns.len() + ips.len());
    for name in dns {
        let ia5 = name
            .as_str()
            .try_into()
            .map_err(|_| Error::Config(format!("{name:?} is not a valid DNS name")))?;
        sans.push(SanType::DnsName(ia5));
    }
    sans.extend(ips.iter().copied().map(SanType::IpAddress));
    Ok(sans)
}

fn far_future() -> OffsetDateTime {
    time::PrimitiveDateTime::MAX.assume_utc()
}

/// `t + d`, saturating.
pub fn later(t: OffsetDateTime, d: Duration) -> OffsetDateTime {
    time::Duration::try_from(d)
        .ok()
        .and_then(|d| t.checked_add(d))
        .unwrap_or_else(far_future)
}

/// `t - d`, saturating.
pub fn earlier(t: OffsetDateTime, d: Duration) -> OffsetDateTime {
    time::Duration::try_from(d)
        .ok()
        .and_then(|d| t.checked_sub(d))
        .unwrap_or(time::PrimitiveDateTime::MIN.assume_utc())
}

/// Whether the serving certificate should be re-issued: less than `rotate_before` left —
/// unless it already lasts as long as its CA, so that a new one would not last longer.
pub fn serving_due(
    not_after: OffsetDateTime,
    ca_not_after: OffsetDateTime,
    rotate_before: Duration,
    now: OffsetDateTime,
) -> bool {
    now >= earlier(not_after, rotate_before) && not_after < ca_not_after
}

/// A running CA rollover as this replica sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rollover {
    /// When the next CA was written (the Secret's annotation; `None` when it is missing).
    pub started: Option<OffsetDateTime>,
    /// This replica serves a certificate from the next CA.
    pub serving_next: bool,
}

/// What to do with the CA Secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaStep {
    Keep,
    /// Write a next CA beside the current one.
    StartRollover,
    /// Make the next CA the current one and drop the old.
    Promote,
    /// The current CA has expired and there is no next one: replace it (an overlap would
    /// not help, nothing trusts an expired CA).
    Replace,
}

/// The CA step at `now`: start a rollover when the current CA has less than `rotate_before`
/// left; promote once this replica serves from the next CA and `2 × delay` has passed since
/// the rollover started (every replica has had `delay` to switch). An expired CA is replaced,
/// or its next one promoted, at once.
pub fn ca_step(
    current_not_after: OffsetDateTime,
    rollover: Option<Rollover>,
    now: OffsetDateTime,
    rotate_before: Duration,
    delay: Duration,
) -> CaStep {
    match rollover {
        None if now >= current_not_after => CaStep::Replace,
        None if now >= earlier(current_not_after, rotate_before) => CaStep::StartRollover,
        // The current CA has expired: the next one is all there is.
        Some(_) if now >= current_not_after => CaStep::Promote,
        None => CaStep::Keep,
        Some(r) if r.serving_next && r.started.is_none_or(|t| now >= later(t, delay.saturating_mul(2))) => {
            CaStep::Promote
        }
        Some(_) => CaStep::Keep,
    }
}

/// Whether to sign the serving certificate with the next CA: once it has stood in the live
/// `caBundle` for `delay` (as seen by this replica).
pub fn sign_with_next(
    next_in_bundle_since: Option<OffsetDateTime>,
    now: OffsetDateTime,
    delay: Duration,
) -> bool {
    next_in_bundle_since.is_some_and(|t| now >= later(t, delay))
}

/// How long to sleep: until the earliest deadline still ahead, at most `max`, at least 100 ms.
pub fn next_wake(
    now: OffsetDateTime,
    deadlines: impl IntoIterator<Item = OffsetDateTime>,
    max: Duration,
) -> Duration {
    deadlines
        .into_iter()
        .filter(|d| *d > now)
        .map(|d| Duration::try_from(d - now).unwrap_or(max))
        .min()
        .unwrap_or(max)
        .clamp(Duration::from_millis(100), max.max(Duration::from_millis(100)))
}

/// A CA: certificate and key.
#[derive(Clone)]
pub struct Ca {
    pub cert_pem: String,
    key_pem: String,
    pub der: Vec<u8>,
    pub not_after: OffsetDateTime,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, c)| c)
        .map_err(|e| Error::Tls(format!("certificate: {e}")))
}

/// The DER of every `CERTIFICATE` block of a PEM bundle (other blocks and garbage skipped).
pub fn pem_certificates(pem: &[u8]) -> Vec<Vec<u8>> {
    Pem::iter_from_buffer(pem)
        .map_while(|p| p.ok())
        .filter(|p| p.label == "CERTIFICATE")
        .map(|p| p.contents)
        .collect()
}

impl Ca {
    /// A new self-signed CA valid from a little before `now` for `validity`.
    pub fn generate(namespace: &str, now: OffsetDateTime, validity: Duration) -> Result<Self> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "sidecert");
        // Distinct subjects keep the old and the next CA apart in clients' chain building.
        dn.push(
            DnType::CommonName,
            format!("sidecert-webhook CA {namespace} {}", now.unix_timestamp()),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = earlier(now, BACKDATE);
        params.not_after = later(now, validity);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
            not_after: params.not_after,
        })
    }

    /// Reads a CA from PEM; checks that the key belongs to the certificate.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self> {
        let der = pem_certificates(cert_pem.as_bytes())
            .into_iter()
            .next()
            .ok_or_else(|| Error::Tls("no certificate in the CA PEM".to_owned()))?;
        let key = KeyPair::from_pem(key_pem)?;
        let cert = parse_cert(&der)?;
        if cert.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(Error::Tls(
                "the CA key does not match the CA certificate".to_owned(),
            ));
        }
        let not_after = cert.validity().not_after.to_datetime();
        Ok(Self {
            cert_pem: cert_pem.trim().to_owned() + "\n",
            key_pem: key_pem.to_owned(),
            der,
            not_after,
        })
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>> {
        let key = KeyPair::from_pem(&self.key_pem)?;
        Ok(Issuer::from_ca_cert_der(&self.der.as_slice().into(), key)?)
    }
}

/// The CA Secret's content.
#[derive(Debug, Clone)]
pub struct CaSet {
    pub current: Ca,
    pub next: Option<Ca>,
    pub rollover_started: Option<OffsetDateTime>,
}

fn data_str<'a>(data: &'a BTreeMap<String, ByteString>, key: &str) -> Option<&'a str> {
    data.get(key).and_then(|b| std::str::from_utf8(&b.0).ok())
}

impl CaSet {
    /// Reads the Secret. A missing or broken current CA is an error; a broken next CA is
    /// dropped (with a warning) and the rollover starts again.
    pub fn from_secret(secret: &Secret) -> Result<Self> {
        let empty = BTreeMap::new();
        let data = secret.data.as_ref().unwrap_or(&empty);
        let current = match (data_str(data, CA_CERT), data_str(data, CA_KEY)) {
            (Some(c), Some(k)) => Ca::from_pem(c, k)?,
            _ => return Err(Error::Tls(format!("the CA Secret has no {CA_CERT} and {CA_KEY}"))),
        };
        let next = match (data_str(data, NEXT_CA_CERT), data_str(data, NEXT_CA_KEY)) {
            (Some(c), Some(k)) => match Ca::from_pem(c, k) {
                Ok(ca) => Some(ca),
                Err(e) => {
                    tracing::warn!(error = %e, "the next CA in the CA Secret is unusable; ignoring it");
                    None
                }
            },
            _ => None,
        };
        let rollover_started = secret
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ROLLOVER_STARTED_ANNOTATION))
            .and_then(|v| v.trim().parse::<i64>().ok())
            .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok());
        Ok(Self {
            current,
            next,
            rollover_started,
        })
    }

    /// The `caBundle`: the current CA, then the next one.
    pub fn bundle(&self) -> String {
        let mut pem = self.current.cert_pem.clone();
        if let Some(next) = &self.next {
            pem.push_str(&next.cert_pem);
        }
        pem
    }

    /// Writes this set into `secret` (data and the rollover annotation).
    fn write_into(&self, secret: &mut Secret) {
        let mut data = BTreeMap::from([
            (
                CA_CERT.to_owned(),
                ByteString(self.current.cert_pem.clone().into_bytes()),
            ),
            (
                CA_KEY.to_owned(),
                ByteString(self.current.key_pem.clone().into_bytes()),
            ),
        ]);
        if let Some(next) = &self.next {
            data.insert(
                NEXT_CA_CERT.to_owned(),
                ByteString(next.cert_pem.clone().into_bytes()),
            );
            data.insert(
                NEXT_CA_KEY.to_owned(),
                ByteString(next.key_pem.clone().into_bytes()),
            );
        }
        secret.data = Some(data);
        secret.string_data = None;
        let annotations = secret.metadata.annotations.get_or_insert_with(BTreeMap::new);
        match (&self.next, self.rollover_started) {
            (Some(_), Some(t)) => {
                annotations.insert(
                    ROLLOVER_STARTED_ANNOTATION.to_owned(),
                    t.unix_timestamp().to_string(),
                );
            }
            _ => {
                annotations.remove(ROLLOVER_STARTED_ANNOTATION);
            }
        }
    }

    fn to_new_secret(&self, name: &str, namespace: &str) -> Secret {
        let mut secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(namespace.to_owned()),
                labels: Some(BTreeMap::from([
                    (
                        "app.kubernetes.io/managed-by".to_owned(),
                        FIELD_MANAGER.to_owned(),
                    ),
                    ("app.kubernetes.io/component".to_owned(), "webhook-ca".to_owned()),
                ])),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".to_owned()),
            ..Secret::default()
        };
        self.write_into(&mut secret);
        secret
    }
}

/// A serving certificate issued here.
pub struct Served {
    /// DER of the CA that signed it.
    pub ca_der: Vec<u8>,
    pub leaf_der: Vec<u8>,
    pub not_after: OffsetDateTime,
    pub key: CertifiedKey,
}

/// Issues a serving certificate from `ca` for `sans`, valid for `validity` but never past
/// the CA's own expiry.
pub fn issue_serving(ca: &Ca, sans: &[SanType], now: OffsetDateTime, validity: Duration) -> Result<Served> {
    let issuer = ca.issuer()?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    let cn = match sans.first() {
        Some(SanType::DnsName(name)) => name.as_str().to_owned(),
        _ => "sidecert-webhook".to_owned(),
    };
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.subject_alt_names = sans.to_vec();
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = earlier(now, BACKDATE);
    params.not_after = later(now, validity).min(ca.not_after);
    let cert = params.signed_by(&key, &issuer)?;
    let ck = certified_key(cert.pem().as_bytes(), key.serialize_pem().as_bytes())?;
    Ok(Served {
        ca_der: ca.der.clone(),
        leaf_der: cert.der().to_vec(),
        not_after: params.not_after,
        key: ck,
    })
}

/// The raw `caBundle` of every webhook in the configuration (empty when unset).
pub fn webhook_bundles(cfg: &MutatingWebhookConfiguration) -> Vec<Vec<u8>> {
    cfg.webhooks
        .iter()
        .flatten()
        .map(|w| {
            w.client_config
                .ca_bundle
                .as_ref()
                .map(|b| b.0.clone())
                .unwrap_or_default()
        })
        .collect()
}

/// Whether `leaf` chains to a CA in each of `bundles` (at least one bundle): a CA whose
/// subject is the leaf's issuer, that is valid at `now` and whose key verifies the leaf's
/// signature.
pub fn trusted_by_all(leaf_der: &[u8], bundles: &[Vec<u8>], now: OffsetDateTime) -> bool {
    let Ok(leaf) = parse_cert(leaf_der) else {
        return false;
    };
    let at = ASN1Time::from(now);
    !bundles.is_empty()
        && bundles.iter().all(|bundle| {
            pem_certificates(bundle).iter().any(|der| {
                parse_cert(der).is_ok_and(|ca| {
                    leaf.issuer() == ca.subject()
                        && ca.validity().is_valid_at(at)
                        && leaf.verify_signature(Some(ca.public_key())).is_ok()
                })
            })
        })
}

/// Whether the CA `der` is in each of `bundles` (at least one).
pub fn in_all_bundles(der: &[u8], bundles: &[Vec<u8>]) -> bool {
    !bundles.is_empty()
        && bundles
            .iter()
            .all(|b| pem_certificates(b).iter().any(|c| c.as_slice() == der))
}

/// The server-side apply body that sets `bundle` on every webhook of `cfg` (only `name` and
/// `clientConfig.caBundle`, only for webhooks that exist); `None` when all already have it.
pub fn ca_bundle_apply(cfg: &MutatingWebhookConfiguration, bundle: &str) -> Option<serde_json::Value> {
    let hooks = cfg.webhooks.as_deref().unwrap_or_default();
    let current = webhook_bundles(cfg);
    if hooks.is_empty() || current.iter().all(|b| b.as_slice() == bundle.as_bytes()) {
        return None;
    }
    let encoded = crate::to_json(&ByteString(bundle.as_bytes().to_vec()));
    let webhooks: Vec<_> = hooks
        .iter()
        .map(|w| json!({"name": w.name, "clientConfig": {"caBundle": encoded}}))
        .collect();
    Some(json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": cfg.metadata.name},
        "webhooks": webhooks,
    }))
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Tls(format!("certificate task: {e}")))?
}

/// Keeps the serving certificate, the CA Secret and the `caBundle` in line.
pub struct SelfSigned {
    settings: Settings,
    sans: Vec<SanType>,
    secrets: Api<Secret>,
    hooks: Api<MutatingWebhookConfiguration>,
    resolver: Arc<MemoryResolver>,
    metrics: Metrics,
    readiness: Readiness,
    cas: CaSet,
    served: Served,
    /// The next CA and when this replica first saw it in every webhook's live `caBundle`.
    next_seen: Option<(Vec<u8>, OffsetDateTime)>,
    waiting_for_config: bool,
}

impl SelfSigned {
    /// Loads or creates the CA and issues the first serving certificate. Serve with the
    /// returned resolver, then [`SelfSigned::run`].
    pub async fn start(
        client: Client,
        settings: Settings,
        metrics: Metrics,
        readiness: Readiness,
    ) -> Result<(Self, Arc<MemoryResolver>)> {
        let sans = subject_alt_names(&settings.dns_names, &settings.ip_sans)?;
        let secrets = Api::<Secret>::namespaced(client.clone(), &settings.namespace);
        let hooks = Api::<MutatingWebhookConfiguration>::all(client);
        let (_, cas) = load_or_create(&secrets, &settings).await?;
        let served = {
            let (ca, sans, validity) = (cas.current.clone(), sans.clone(), settings.serving_validity);
            blocking(move || issue_serving(&ca, &sans, OffsetDateTime::now_utc(), validity)).await?
        };
        metrics.rotations.with_label_values(&["serving"]).inc();
        let resolver = Arc::new(MemoryResolver::new(served.key.clone()));
        readiness.set_certificate(false);
        let this = Self {
            settings,
            sans,
            secrets,
            hooks,
            resolver: resolver.clone(),
            metrics,
            readiness,
            cas,
            served,
            next_seen: None,
            waiting_for_config: false,
        };
        this.record();
        tracing::info!(
            namespace = %this.settings.namespace,
            secret = %this.settings.ca_secret_name,
            names = ?this.settings.dns_names,
            not_after = %this.served.not_after,
            "serving certificate issued from the webhook's CA"
        );
        Ok((this, resolver))
    }

    fn record(&self) {
        self.metrics
            .ca_not_after
            .set(self.cas.current.not_after.unix_timestamp() as f64);
        self.metrics
            .serving_cert_not_after
            .set(self.served.not_after.unix_timestamp() as f64);
    }

    /// Follows the CA Secret and the configuration (watches, plus a timer) until the process
    /// ends.
    pub async fn run(mut self) {
        let fields = |name: &str| watcher::Config::default().fields(&format!("metadata.name={name}"));
        let secret_events = watcher(self.secrets.clone(), fields(&self.settings.ca_secret_name))
            .default_backoff()
            .map(|_| ())
            .boxed();
        let hook_events = watcher(
            self.hooks.clone(),
            fields(&self.settings.webhook_configuration_name),
        )
        .default_backoff()
        .map(|_| ())
        .boxed();
        let mut events = stream::select(secret_events, hook_events);
        let mut failures: u32 = 0;
        loop {
            let wait = match self.reconcile(OffsetDateTime::now_utc()).await {
                Ok(wait) => {
                    failures = 0;
                    wait
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let wait = Duration::from_secs(1u64 << failures.min(5)).min(RECHECK);
                    tracing::warn!(error = %e, retry_in = ?wait, "serving certificate management");
                    wait
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                Some(()) = events.next() => {
                    // Let a burst of events (a watch's initial list) settle.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// One pass: CA step, `caBundle`, serving certificate, readiness. Returns how long to
    /// sleep before the next pass.
    pub async fn reconcile(&mut self, now: OffsetDateTime) -> Result<Duration> {
        // 1. The CA Secret (on failure, keep the CA we know and carry on with it).
        let mut first_error = None;
        match self.ca_pass(now).await {
            Ok(()) => {}
            Err(e) => first_error = Some(e),
        }
        // 2. The live configuration and its caBundle.
        let mut config_missing = false;
        let live = match self.publish().await {
            Ok(Some(cfg)) => Some(cfg),
            Ok(None) => {
                config_missing = true;
                None
            }
            Err(e) => {
                first_error.get_or_insert(e);
                None
            }
        };
        let bundles = live.as_ref().map(webhook_bundles);
        match (&self.cas.next, &bundles) {
            (Some(next), Some(b)) if in_all_bundles(&next.der, b) => {
                if self.next_seen.as_ref().is_none_or(|(der, _)| *der != next.der) {
                    tracing::info!("the next CA is in the live caBundle");
                    self.next_seen = Some((next.der.clone(), now));
                }
            }
            // Unknown (API error): keep what we saw.
            (Some(_), None) if !config_missing => {}
            _ => self.next_seen = None,
        }
        // 3. The serving certificate.
        let next_since = self.next_seen.as_ref().map(|(_, t)| *t);
        let signing = match &self.cas.next {
            Some(next) if sign_with_next(next_since, now, self.settings.rollover_delay) => next,
            _ => &self.cas.current,
        };
        if self.served.ca_der != signing.der
            || serving_due(
                self.served.not_after,
                signing.not_after,
                self.settings.serving_rotate_before,
                now,
            )
        {
            let (ca, sans, validity) = (signing.clone(), self.sans.clone(), self.settings.serving_validity);
            let new_ca = self.served.ca_der != signing.der;
            let served = blocking(move || issue_serving(&ca, &sans, now, validity)).await?;
            self.resolver.store(served.key.clone());
            self.served = served;
            self.metrics.rotations.with_label_values(&["serving"]).inc();
            tracing::info!(not_after = %self.served.not_after, new_ca, "new serving certificate");
        }
        self.record();
        // 4. Readiness: the served certificate chains to the live caBundle.
        if let Some(b) = &bundles {
            let trusted = trusted_by_all(&self.served.leaf_der, b, now);
            if trusted != self.readiness.certificate() {
                tracing::info!(trusted, "serving certificate trusted by the live caBundle");
            }
            self.readiness.set_certificate(trusted);
            self.waiting_for_config = false;
        } else if config_missing {
            if !self.waiting_for_config {
                // At install the chart creates it in the same release: its watch tells us.
                tracing::info!(
                    configuration = %self.settings.webhook_configuration_name,
                    "waiting for the MutatingWebhookConfiguration"
                );
                self.waiting_for_config = true;
            }
            self.readiness.set_certificate(false);
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        // 5. The next deadline.
        let s = &self.settings;
        let mut deadlines = vec![
            earlier(self.served.not_after, s.serving_rotate_before),
            earlier(self.cas.current.not_after, s.ca_rotate_before),
        ];
        if let Some(t) = next_since {
            deadlines.push(later(t, s.rollover_delay));
        }
        if let Some(t) = self.cas.rollover_started {
            deadlines.push(later(t, s.rollover_delay.saturating_mul(2)));
        }
        let max = if config_missing { CONFIG_RECHECK } else { RECHECK };
        Ok(next_wake(now, deadlines, max))
    }

    /// Reads the CA Secret and takes the CA step it calls for.
    async fn ca_pass(&mut self, now: OffsetDateTime) -> Result<()> {
        let (mut secret, mut cas) = load_or_create(&self.secrets, &self.settings).await?;
        for _ in 0..3 {
            let rollover = cas.next.as_ref().map(|next| Rollover {
                started: cas.rollover_started,
                serving_next: self.served.ca_der == next.der,
            });
            let step = ca_step(
                cas.current.not_after,
                rollover,
                now,
                self.settings.ca_rotate_before,
                self.settings.rollover_delay,
            );
            let wanted = match step {
                CaStep::Keep => break,
                CaStep::StartRollover => {
                    let (ns, validity) = (self.settings.namespace.clone(), self.settings.ca_validity);
                    let next = blocking(move || Ca::generate(&ns, now, validity)).await?;
                    CaSet {
                        current: cas.current.clone(),
                        next: Some(next),
                        rollover_started: Some(now),
                    }
                }
                CaStep::Replace => {
                    tracing::warn!(not_after = %cas.current.not_after, "the CA has expired; replacing it");
                    let (ns, validity) = (self.settings.namespace.clone(), self.settings.ca_validity);
                    CaSet {
                        current: blocking(move || Ca::generate(&ns, now, validity)).await?,
                        next: None,
                        rollover_started: None,
                    }
                }
                CaStep::Promote => match cas.next.clone() {
                    Some(next) => CaSet {
                        current: next,
                        next: None,
                        rollover_started: None,
                    },
                    None => break,
                },
            };
            wanted.write_into(&mut secret);
            let kind = match step {
                CaStep::StartRollover => "ca_rollover",
                CaStep::Replace => "ca_replace",
                _ => "ca_promote",
            };
            // `replace` carries the resourceVersion we read: a conflict means another replica
            // moved first; read again and decide again.
            match self
                .secrets
                .replace(&self.settings.ca_secret_name, &PostParams::default(), &secret)
                .await
            {
                Ok(written) => {
                    tracing::info!(step = kind, "CA Secret updated");
                    self.metrics.rotations.with_label_values(&[kind]).inc();
                    cas = CaSet::from_secret(&written)?;
                    secret = written;
                }
                Err(e) if is_status(&e, 409) => {
                    tracing::debug!("CA Secret changed meanwhile; reading it again");
                    (secret, cas) = load_or_create(&self.secrets, &self.settings).await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        if cas.current.der != self.cas.current.der {
            tracing::info!(not_after = %cas.current.not_after, "current CA changed");
        }
        self.cas = cas;
        Ok(())
    }

    /// Sets the `caBundle` of every webhook in the configuration when it differs; returns the
    /// live configuration (`None` when it does not exist).
    async fn publish(&self) -> Result<Option<MutatingWebhookConfiguration>> {
        let name = &self.settings.webhook_configuration_name;
        let Some(cfg) = self.hooks.get_opt(name).await? else {
            return Ok(None);
        };
        let Some(body) = ca_bundle_apply(&cfg, &self.cas.bundle()) else {
            return Ok(Some(cfg));
        };
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let cfg = self.hooks.patch(name, &params, &Patch::Apply(&body)).await?;
        tracing::info!(
            configuration = %name,
            cas = if self.cas.next.is_some() { 2 } else { 1 },
            "caBundle published"
        );
        Ok(Some(cfg))
    }
}

/// Reads the CA Secret or creates it. Two replicas racing: the create of one fails with 409
/// and it reads the other's. A Secret without a usable CA gets a new one.
pub async fn load_or_create(secrets: &Api<Secret>, settings: &Settings) -> Result<(Secret, CaSet)> {
    let name = &settings.ca_secret_name;
    let mut last_error = None;
    for _ in 0..5 {
        let existing = secrets.get_opt(name).await?;
        let fresh = || {
            let (ns, validity) = (settings.namespace.clone(), settings.ca_validity);
            blocking(move || {
                Ok(CaSet {
                    current: Ca::generate(&ns, OffsetDateTime::now_utc(), validity)?,
                    next: None,
                    rollover_started: None,
                })
            })
        };
        match existing {
            Some(secret) => match CaSet::from_secret(&secret) {
                Ok(cas) => return Ok((secret, cas)),
                Err(e) => {
                    tracing::warn!(error = %e, secret = %name, "the CA Secret holds no usable CA; writing a new one");
                    let cas = fresh().await?;
                    let mut secret = secret;
                    cas.write_into(&mut secret);
                    match secrets.replace(name, &PostParams::default(), &secret).await {
                        Ok(written) => return Ok((written, cas)),
                        Err(e) if is_status(&e, 409) => last_error = Some(e),
                        Err(e) => return Err(e.into()),
                    }
                }
            },
            None => {
                let cas = fresh().await?;
                let secret = cas.to_new_secret(name, &settings.namespace);
                match secrets.create(&PostParams::default(), &secret).await {
                    Ok(written) => {
                        tracing::info!(secret = %name, not_after = %cas.current.not_after, "created the webhook's CA");
                        return Ok((written, cas));
                    }
                    // Another replica created it first: use that one.
                    Err(e) if is_status(&e, 409) => last_error = Some(e),
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    Err(match last_error {
        Some(e) => e.into(),
        None => Error::Config(format!("CA Secret {name}: gave up after repeated conflicts")),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use k8s_openapi::api::admissionregistration::v1::{MutatingWebhook, WebhookClientConfig};

    fn t0() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_893_456_000).unwrap()
    }
    const MIN: Duration = Duration::from_secs(60);

    fn args() -> SelfSignedArgs {
        SelfSignedArgs {
            enabled: true,
            namespace: Some("sidecert-system".into()),
            ..SelfSignedArgs::default()
        }
    }

    #[test]
    fn dns_names_cover_the_service_then_extras() {
        let names = dns_names(
            "sidecert-webhook",
            "sidecert-system",
            &["hook.example".into(), " ".into(), "sidecert-webhook".into()],
        );
        assert_eq!(
            names,
            [
                "sidecert-webhook",
                "sidecert-webhook.sidecert-system",
                "sidecert-webhook.sidecert-system.svc",
                "sidecert-webhook.sidecert-system.svc.cluster.local",
                "hook.example",
            ]
        );
    }

    #[test]
    fn sans_have_dns_names_and_ips() {
        let ip: IpAddr = "10.213.0.1".parse().unwrap();
        let sans = subject_alt_names(&["a.b".into()], &[ip]).unwrap();
        assert_eq!(sans.len(), 2);
        assert!(matches!(&sans[0], SanType::DnsName(n) if n.as_str() == "a.b"));
        assert_eq!(sans[1], SanType::IpAddress(ip));
        assert!(subject_alt_names(&["bad name\u{e9}".into()], &[]).is_err());
    }

    #[test]
    fn settings_resolve_namespace_and_check_periods() {
        let s = Settings::from_args(&args()).unwrap();
        assert_eq!(s.namespace, "sidecert-system");
        assert_eq!(s.dns_names[2], "sidecert-webhook.sidecert-system.svc");
        assert_eq!(own_namespace(None, Some("ns-env".into())).unwrap(), "ns-env");
        assert_eq!(
            own_namespace(Some("ns-file\n".into()), Some("x".into())).unwrap(),
            "ns-file"
        );
        assert!(own_namespace(Some(" ".into()), None).is_err());

        let mut a = args();
        a.serving_rotate_before = a.serving_validity;
        assert!(check_periods(&a).unwrap_err().contains("--serving-rotate-before"));
        let mut a = args();
        a.ca_rotate_before = Duration::from_secs(50);
        a.ca_rollover_delay = Duration::from_secs(30);
        assert!(check_periods(&a).unwrap_err().contains("twice"));
        let mut a = args();
        a.ca_validity = a.ca_rotate_before;
        assert!(check_periods(&a).is_err());
    }

    #[test]
    fn serving_rotation_decisions() {
        let not_after = t0() + time::Duration::minutes(40);
        let ca_end = t0() + time::Duration::days(1);
        let before = 20 * MIN;
        assert!(!serving_due(not_after, ca_end, before, t0()));
        assert!(!serving_due(
            not_after,
            ca_end,
            before,
            t0() + time::Duration::minutes(19)
        ));
        assert!(serving_due(
            not_after,
            ca_end,
            before,
            t0() + time::Duration::minutes(20)
        ));
        assert!(serving_due(
            not_after,
            ca_end,
            before,
            t0() + time::Duration::hours(2)
        ));
        // Capped by the CA: a new one would not last longer.
        assert!(!serving_due(
            ca_end,
            ca_end,
            before,
            ca_end - time::Duration::minutes(1)
        ));
    }

    #[test]
    fn ca_rollover_decisions() {
        let end = t0() + time::Duration::days(365);
        let before = Duration::from_secs(90 * 86400);
        let delay = 30 * Duration::from_secs(1);
        let keep = ca_step(end, None, t0(), before, delay);
        assert_eq!(keep, CaStep::Keep);
        let start_at = end - time::Duration::days(90);
        assert_eq!(
            ca_step(end, None, start_at - time::Duration::seconds(1), before, delay),
            CaStep::Keep
        );
        assert_eq!(ca_step(end, None, start_at, before, delay), CaStep::StartRollover);

        let started = Some(start_at);
        let r = |serving_next| {
            Some(Rollover {
                started,
                serving_next,
            })
        };
        // Not serving from the next CA yet: never promote.
        assert_eq!(
            ca_step(end, r(false), start_at + time::Duration::hours(1), before, delay),
            CaStep::Keep
        );
        // Serving from it, but not 2 × delay yet.
        assert_eq!(
            ca_step(
                end,
                r(true),
                start_at + time::Duration::seconds(59),
                before,
                delay
            ),
            CaStep::Keep
        );
        assert_eq!(
            ca_step(
                end,
                r(true),
                start_at + time::Duration::seconds(60),
                before,
                delay
            ),
            CaStep::Promote
        );
        // No start time recorded: promote as soon as this replica serves from the next CA.
        // Expired: replace, or promote whatever the replica serves.
        assert_eq!(ca_step(end, None, end, before, delay), CaStep::Replace);
        assert_eq!(ca_step(end, r(false), end, before, delay), CaStep::Promote);
        let unknown = Some(Rollover {
            started: None,
            serving_next: true,
        });
        assert_eq!(ca_step(end, unknown, t0(), before, delay), CaStep::Promote);
    }

    #[test]
    fn switch_to_the_next_ca_after_the_delay() {
        let delay = Duration::from_secs(30);
        assert!(!sign_with_next(None, t0(), delay));
        assert!(!sign_with_next(
            Some(t0()),
            t0() + time::Duration::seconds(29),
            delay
        ));
        assert!(sign_with_next(
            Some(t0()),
            t0() + time::Duration::seconds(30),
            delay
        ));
    }

    #[test]
    fn wake_at_the_earliest_deadline_ahead() {
        let d = |s| t0() + time::Duration::seconds(s);
        assert_eq!(
            next_wake(t0(), [d(10), d(5), d(-3)], RECHECK),
            Duration::from_secs(5)
        );
        assert_eq!(next_wake(t0(), [d(100)], RECHECK), RECHECK);
        assert_eq!(next_wake(t0(), [], RECHECK), RECHECK);
        assert_eq!(
            next_wake(t0(), [t0() + time::Duration::milliseconds(1)], RECHECK),
            Duration::from_millis(100)
        );
        assert_eq!(later(t0(), Duration::MAX), far_future());
    }

    fn config(bundles: &[Option<&str>]) -> MutatingWebhookConfiguration {
        MutatingWebhookConfiguration {
            metadata: ObjectMeta {
                name: Some("sidecert".into()),
                ..ObjectMeta::default()
            },
            webhooks: Some(
                bundles
                    .iter()
                    .enumerate()
                    .map(|(i, b)| MutatingWebhook {
                        name: format!("h{i}.sidecert.io"),
                        client_config: WebhookClientConfig {
                            ca_bundle: b.map(|b| ByteString(b.as_bytes().to_vec())),
                            url: Some("https://10.0.0.1/mutate".into()),
                            service: None,
                        },
                        ..MutatingWebhook::default()
                    })
                    .collect(),
            ),
        }
    }

    #[test]
    fn issued_certificates_chain_to_their_ca_only() {
        let now = OffsetDateTime::now_utc();
        let ca = Ca::generate("ns", now, Duration::from_secs(3600)).unwrap();
        let other = Ca::generate("ns", now, Duration::from_secs(3600)).unwrap();
        let sans = subject_alt_names(&dns_names("svc", "ns", &[]), &["10.0.0.1".parse().unwrap()]).unwrap();
        let served = issue_serving(&ca, &sans, now, Duration::from_secs(40)).unwrap();
        assert_eq!(served.not_after, later(now, Duration::from_secs(40)));
        assert_eq!(served.ca_der, ca.der);
        // Never past the CA's expiry.
        let capped = issue_serving(&ca, &sans, now, Duration::from_secs(7200)).unwrap();
        assert_eq!(capped.not_after, ca.not_after);

        let leaf = parse_cert(&served.leaf_der).unwrap();
        let names: Vec<String> = leaf
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert!(names.contains(&"DNSName(svc.ns.svc)".to_owned()), "{names:?}");
        assert!(names.contains(&"IPAddress(0a:00:00:01)".to_owned()), "{names:?}");

        let both = format!("{}{}", other.cert_pem, ca.cert_pem);
        assert!(trusted_by_all(
            &served.leaf_der,
            &[both.clone().into_bytes()],
            now
        ));
        assert!(!trusted_by_all(
            &served.leaf_der,
            &[other.cert_pem.clone().into_bytes()],
            now
        ));
        assert!(!trusted_by_all(
            &served.leaf_der,
            &[both.clone().into_bytes(), Vec::new()],
            now
        ));
        assert!(!trusted_by_all(&served.leaf_der, &[], now));
        // The CA must still be valid.
        assert!(!trusted_by_all(
            &served.leaf_der,
            &[both.into_bytes()],
            now + time::Duration::hours(2)
        ));
        assert!(in_all_bundles(&ca.der, &[ca.cert_pem.clone().into_bytes()]));
        assert!(!in_all_bundles(&ca.der, &[other.cert_pem.clone().into_bytes()]));
    }

    #[test]
    fn ca_secret_round_trip() {
        let now = OffsetDateTime::now_utc();
        let set = CaSet {
            current: Ca::generate("ns", now, Duration::from_secs(3600)).unwrap(),
            next: Some(Ca::generate("ns", now, Duration::from_secs(7200)).unwrap()),
            rollover_started: Some(OffsetDateTime::from_unix_timestamp(now.unix_timestamp()).unwrap()),
        };
        let secret = set.to_new_secret("sidecert-webhook-ca", "ns");
        assert_eq!(secret.data.as_ref().unwrap().len(), 4);
        let back = CaSet::from_secret(&secret).unwrap();
        assert_eq!(back.current.der, set.current.der);
        assert_eq!(back.next.as_ref().unwrap().der, set.next.as_ref().unwrap().der);
        assert_eq!(back.rollover_started, set.rollover_started);
        assert_eq!(pem_certificates(back.bundle().as_bytes()).len(), 2);

        // A key that does not belong to the certificate is refused.
        let mut broken = secret.clone();
        let data = broken.data.as_mut().unwrap();
        let next_key = data[NEXT_CA_KEY].clone();
        data.insert(CA_KEY.into(), next_key);
        assert!(CaSet::from_secret(&broken).is_err());
        assert!(CaSet::from_secret(&Secret::default()).is_err());
    }

    #[test]
    fn apply_body_names_each_webhook_with_only_its_bundle() {
        let cfg = config(&[None, Some("old")]);
        let body = ca_bundle_apply(&cfg, "PEM").unwrap();
        assert_eq!(body["kind"], "MutatingWebhookConfiguration");
        assert_eq!(body["metadata"]["name"], "sidecert");
        let hooks = body["webhooks"].as_array().unwrap();
        assert_eq!(hooks.len(), 2);
        assert_eq!(
            hooks[0],
            json!({"name": "h0.sidecert.io", "clientConfig": {"caBundle": "UEVN"}})
        );
        assert_eq!(hooks[1]["name"], "h1.sidecert.io");
        // Already current everywhere, or no webhooks: nothing to apply.
        assert!(ca_bundle_apply(&config(&[Some("PEM"), Some("PEM")]), "PEM").is_none());
        assert!(ca_bundle_apply(&config(&[]), "PEM").is_none());
    }
}
