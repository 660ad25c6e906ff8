//! Keys, CSRs and the parts of a certificate the sidecar looks at.

use std::collections::BTreeSet;

use instant_acme::CertificateIdentifier;
use rcgen::{CertificateParams, DistinguishedName, KeyPair};
use rustls::pki_types::CertificateDer;
use sidecert_contract::KeyAlgorithm;
use time::OffsetDateTime;

use crate::{
    certificate::schedule::Lifetime,
    error::{Error, Result},
};

/// A freshly generated private key.
pub struct PrivateKey(KeyPair);

impl PrivateKey {
    /// Generates a key of the given algorithm.
    ///
    /// RSA keys are generated with the `rsa` crate (ring cannot generate them, only sign
    /// with them) and can take seconds: call this from a blocking task. Only generation and
    /// PKCS#8 encoding are used from it; RUSTSEC-2023-0071 (Marvin, a timing side channel
    /// in its RSA decryption) does not reach this code. The CSR is signed by ring.
    pub fn generate(alg: KeyAlgorithm) -> Result<Self> {
        let bits = match alg {
            KeyAlgorithm::EcdsaP256 => {
                return Self::generate_ec(&rcgen::PKCS_ECDSA_P256_SHA256);
            }
            KeyAlgorithm::EcdsaP384 => {
                return Self::generate_ec(&rcgen::PKCS_ECDSA_P384_SHA384);
            }
            KeyAlgorithm::Rsa2048 => 2048,
            KeyAlgorithm::Rsa3072 => 3072,
            KeyAlgorithm::Rsa4096 => 4096,
        };
        use rsa::pkcs8::EncodePrivateKey;
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, bits)
            .map_err(|e| Error::key_from(format!("RSA {bits}"), e))?;
        let der = key
            .to_pkcs8_der()
            .map_err(|e| Error::key_from(format!("RSA {bits} PKCS#8"), e))?;
        let pkcs8 = rustls::pki_types::PrivatePkcs8KeyDer::from(der.as_bytes().to_vec());
        KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_RSA_SHA256)
            .map(Self)
            .map_err(|e| Error::key_from("", e))
    }

    fn generate_ec(sig: &'static rcgen::SignatureAlgorithm) -> Result<Self> {
        KeyPair::generate_for(sig)
            .map(Self)
            .map_err(|e| Error::key_from("", e))
    }

    /// [`Self::generate`] on the blocking pool.
    pub async fn generate_async(alg: KeyAlgorithm) -> Result<Self> {
        tokio::task::spawn_blocking(move || Self::generate(alg))
            .await
            .map_err(|e| Error::key_from("key generation task", e))?
    }

    /// PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
    pub fn pkcs8_pem(&self) -> String {
        self.0.serialize_pem()
    }

    /// A DER CSR for `domains` (SANs only, empty subject, as Let's Encrypt prefers).
    pub fn csr_der(&self, domains: &[String]) -> Result<Vec<u8>> {
        let mut params = CertificateParams::new(domains.to_vec())
            .map_err(|e| Error::certificate_from("CSR parameters", e))?;
        params.distinguished_name = DistinguishedName::new();
        let csr = params
            .serialize_request(&self.0)
            .map_err(|e| Error::certificate_from("CSR", e))?;
        Ok(csr.der().to_vec())
    }
}

/// What the sidecar needs to know about a certificate chain (its first certificate).
#[derive(Debug, Clone)]
pub struct CertInfo {
    pub lifetime: Lifetime,
    /// DNS SANs, lower-case.
    pub domains: BTreeSet<String>,
    /// RFC 9773 identifier (for ARI and `replaces`), when the leaf has an AKI.
    pub ari_id: Option<CertificateIdentifier<'static>>,
    /// The leaf's public key (the subjectPublicKey bits), for [`key_matches`].
    pub public_key: Vec<u8>,
}

impl CertInfo {
    /// Parses the leaf (first certificate) of a PEM chain.
    pub fn from_pem_chain(pem: &str) -> Result<Self> {
        let certs = pem_certificates(pem)?;
        let leaf = certs
            .first()
            .ok_or_else(|| Error::certificate("no certificate in PEM"))?;
        Self::from_der(leaf)
    }

    pub fn from_der(der: &CertificateDer<'_>) -> Result<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| Error::certificate_from("parsing", e))?;
        let validity = cert.validity();
        let mut domains = BTreeSet::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let x509_parser::extensions::GeneralName::DNSName(d) = name {
                    domains.insert(d.to_ascii_lowercase());
                }
            }
        }
        Ok(Self {
            lifetime: Lifetime {
                not_before: validity.not_before.to_datetime(),
                not_after: validity.not_after.to_datetime(),
            },
            domains,
            ari_id: CertificateIdentifier::try_from(der)
                .ok()
                .map(CertificateIdentifier::into_owned),
            public_key: cert.public_key().subject_public_key.data.to_vec(),
        })
    }

    /// True when the certificate is for exactly `domains` and has not expired at `now`.
    pub fn covers(&self, domains: &[String], now: OffsetDateTime) -> bool {
        self.domains.len() == domains.len()
            && domains.iter().all(|d| self.domains.contains(d))
            && now < self.lifetime.not_after
            && now >= self.lifetime.not_before - time::Duration::minutes(5)
    }
}

/// The certificates of a PEM bundle, in order.
pub fn pem_certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| Error::certificate_from("PEM", e))?;
    if certs.is_empty() {
        return Err(Error::certificate("no certificate in PEM"));
    }
    Ok(certs)
}

/// False when `key_pem` is proven not to be the private key of the certificate `info`
/// describes (a hand-edited Secret serves no TLS at all, so it is not kept), or holds no
/// private key. A PKCS#1 or SEC1 key (another tool's format; the sidecar writes PKCS#8) is
/// not compared and counts as matching.
pub fn key_matches(info: &CertInfo, key_pem: &str) -> bool {
    use rustls::pki_types::{PrivateKeyDer, pem::PemObject};
    let der = match PrivateKeyDer::from_pem_slice(key_pem.as_bytes()) {
        Ok(PrivateKeyDer::Pkcs8(der)) => der,
        Ok(_) => return true,
        Err(_) => return false,
    };
    KeyPair::try_from(&der).is_ok_and(|key| info.public_key == key.public_key_raw())
}

/// Formats a moment as RFC 3339 (for annotations).
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// A certificate with its key: from the Secret, or fresh from the CA.
#[derive(Clone)]
pub struct Held {
    /// Leaf first, then the chain.
    pub chain_pem: String,
    /// PKCS#8 PEM.
    pub key_pem: String,
    pub info: CertInfo,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held").field("info", &self.info).finish()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn csr_and_self_signed_round_trip() {
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP384).unwrap();
        assert!(key.pkcs8_pem().starts_with("-----BEGIN PRIVATE KEY-----"));
        let domains = vec!["a.example".to_owned(), "b.example".to_owned()];
        assert!(!key.csr_der(&domains).unwrap().is_empty());
        let params = CertificateParams::new(domains.clone()).unwrap();
        let cert = params.self_signed(&key.0).unwrap();
        let info = CertInfo::from_pem_chain(&cert.pem()).unwrap();
        assert!(info.covers(&domains, OffsetDateTime::now_utc()));
        assert!(!info.covers(&domains[..1], OffsetDateTime::now_utc()));
        assert!(key_matches(&info, &key.pkcs8_pem()));
        let rsa = PrivateKey::generate(KeyAlgorithm::Rsa2048).unwrap();
        assert!(rsa.pkcs8_pem().starts_with("-----BEGIN PRIVATE KEY-----"));
        assert!(!rsa.csr_der(&domains).unwrap().is_empty());
        let rsa_cert = CertificateParams::new(domains.clone())
            .unwrap()
            .self_signed(&rsa.0)
            .unwrap();
        let rsa_info = CertInfo::from_pem_chain(&rsa_cert.pem()).unwrap();
        assert!(key_matches(&rsa_info, &rsa.pkcs8_pem()));
        // Another key, or garbage: no match.
        assert!(!key_matches(&info, &rsa.pkcs8_pem()));
        assert!(!key_matches(&rsa_info, &key.pkcs8_pem()));
        assert!(!key_matches(&info, "nope"));
        // Another tool's SEC1 key is not compared.
        let sec1 = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIB6xR7dC/6ckV1aUrHKkN0GkFq0rJ8GcbV3Zx4L0cH3HoAoGCCqGSM49\nAwEHoUQDQgAE\n-----END EC PRIVATE KEY-----\n";
        assert!(key_matches(&info, sec1));
        // A chain that does not parse has no CertInfo to compare with
        // (garbage_is_an_error_not_a_panic).
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(CertInfo::from_pem_chain("nope").is_err());
        assert!(pem_certificates("").is_err());
    }
}
