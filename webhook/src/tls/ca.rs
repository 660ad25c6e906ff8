//! The webhook's CA and the format of its Secret (`ca.crt`, `ca.key`; `next-ca.crt`,
//! `next-ca.key` and the rollover annotation during a rollover), and the serving
//! certificates issued from it.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{ByteString, api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType,
};
use rustls::sign::CertifiedKey;
use sidecert_contract::annotations::CA_ROLLOVER_STARTED_AT;
use time::OffsetDateTime;
use x509_parser::{certificate::X509Certificate, pem::Pem};

use crate::{
    error::{Error, Result},
    tls::{
        resolver::certified_key,
        rotation::{earlier, later},
    },
};

/// The field manager of the `caBundle` server-side apply, and the `managed-by` of the CA Secret.
pub const FIELD_MANAGER: &str = "sidecert-webhook";
/// Secret keys.
pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const NEXT_CA_CERT: &str = "next-ca.crt";
pub const NEXT_CA_KEY: &str = "next-ca.key";
/// Certificates start a little in the past, for clocks that run behind.
const BACKDATE: Duration = Duration::from_secs(300);

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

pub(crate) fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, c)| c)
        .map_err(|e| Error::tls("certificate", e))
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
            .and_then(|a| a.get(CA_ROLLOVER_STARTED_AT))
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
    pub(crate) fn write_into(&self, secret: &mut Secret) {
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
                annotations.insert(CA_ROLLOVER_STARTED_AT.to_owned(), t.unix_timestamp().to_string());
            }
            _ => {
                annotations.remove(CA_ROLLOVER_STARTED_AT);
            }
        }
    }

    pub(crate) fn to_new_secret(&self, name: &str, namespace: &str) -> Secret {
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

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
}
