//! The serving certificate: a rustls `ResolvesServerCert` over an `ArcSwap`, reloaded when
//! the files change (polling their content, which also catches Kubernetes' `..data` symlink
//! swap that file watchers miss). Connections in flight keep their certificate.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use rustls::{
    RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};

use crate::error::{Error, Result};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds a certified key from PEM chain and key.
pub fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::tls("certificate PEM", e))?;
    if chain.is_empty() {
        return Err(Error::Tls("no certificate in the certificate file".to_owned()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| Error::tls("private key PEM", e))?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| Error::tls("private key", e))?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match()
        .map_err(|e| Error::tls("key does not match the certificate", e))?;
    Ok(ck)
}

/// Serves the current certificate; [`ReloadingResolver::watch`] swaps in new ones.
#[derive(Debug)]
pub struct ReloadingResolver {
    current: ArcSwap<CertifiedKey>,
    cert_file: PathBuf,
    key_file: PathBuf,
    last: std::sync::Mutex<(Vec<u8>, Vec<u8>)>,
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

impl ReloadingResolver {
    /// Loads the files once; fails when they are missing or invalid.
    pub fn load(cert_file: impl Into<PathBuf>, key_file: impl Into<PathBuf>) -> Result<Self> {
        let (cert_file, key_file) = (cert_file.into(), key_file.into());
        let (cert, key) = (read(&cert_file)?, read(&key_file)?);
        let ck = certified_key(&cert, &key)?;
        Ok(Self {
            current: ArcSwap::from_pointee(ck),
            cert_file,
            key_file,
            last: std::sync::Mutex::new((cert, key)),
        })
    }

    /// Re-reads the files; swaps the certificate when they changed and are valid.
    /// Returns whether it swapped.
    pub fn reload(&self) -> Result<bool> {
        let (cert, key) = (read(&self.cert_file)?, read(&self.key_file)?);
        let mut last = self
            .last
            .lock()
            .map_err(|_| Error::Tls("reload lock poisoned".to_owned()))?;
        if last.0 == cert && last.1 == key {
            return Ok(false);
        }
        let ck = certified_key(&cert, &key)?;
        self.current.store(Arc::new(ck));
        *last = (cert, key);
        Ok(true)
    }

    /// Polls the files every `interval` until the process ends.
    pub async fn watch(self: Arc<Self>, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match self.reload() {
                Ok(true) => {
                    tracing::info!(file = %self.cert_file.display(), "reloaded the serving certificate")
                }
                Ok(false) => {}
                // Half-written files (cert updated, key not yet): keep the old pair, retry.
                Err(e) => tracing::warn!(error = %e, "serving certificate not reloaded"),
            }
        }
    }

    /// The certificate being served now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }
}

impl ResolvesServerCert for ReloadingResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// A certificate held in memory and swapped atomically (`serve --self-signed`: the key never
/// touches the disk). Connections in flight keep their certificate.
#[derive(Debug)]
pub struct MemoryResolver {
    current: ArcSwap<CertifiedKey>,
}

impl MemoryResolver {
    pub fn new(ck: CertifiedKey) -> Self {
        Self {
            current: ArcSwap::from_pointee(ck),
        }
    }

    /// Serves `ck` from the next handshake on.
    pub fn store(&self, ck: CertifiedKey) {
        self.current.store(Arc::new(ck));
    }

    /// The certificate being served now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }
}

impl ResolvesServerCert for MemoryResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The CA bundle of the clients [`server_config`] accepts a certificate from.
pub fn client_roots(pem: &[u8]) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| Error::tls("client CA PEM", e))?;
        roots
            .add(cert)
            .map_err(|e| Error::tls("client CA certificate", e))?;
    }
    if roots.is_empty() {
        return Err(Error::Tls("no certificate in the client CA file".to_owned()));
    }
    Ok(roots)
}

/// A rustls server config (ring, TLS 1.2 and 1.3, HTTP/1.1) using `resolver`. With
/// `client_roots`, a client certificate is asked for and, when presented, must chain to
/// them (or the handshake fails); a client without one still connects (the probes do), and
/// the routes decide ([`crate::admission::http`]).
pub fn server_config(
    resolver: Arc<dyn ResolvesServerCert>,
    client_roots: Option<RootCertStore>,
) -> Result<ServerConfig> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::tls("protocol versions", e))?;
    let builder = match client_roots {
        None => builder.with_no_client_auth(),
        Some(roots) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .allow_unauthenticated()
                .build()
                .map_err(|e| Error::tls("client certificate verifier", e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut cfg = builder.with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}
