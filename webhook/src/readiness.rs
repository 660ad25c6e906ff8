//! What `/readyz` answers, shared by the HTTP handlers, the serving-certificate manager
//! (which sets whether the API server trusts the certificate) and the server (caches,
//! draining). Plain state at the bottom of the crate, so none of them imports another.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

/// What `/readyz` waits for: the Ingress and Service caches, and a served certificate the API
/// server trusts (always true with certificate files; see [`crate::tls::manager`]).
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    caches: Arc<AtomicBool>,
    certificate: Arc<AtomicBool>,
    draining: Arc<AtomicBool>,
}

impl Readiness {
    pub fn new(caches: bool, certificate: bool) -> Self {
        Self {
            caches: Arc::new(AtomicBool::new(caches)),
            certificate: Arc::new(AtomicBool::new(certificate)),
            draining: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Shutting down: `/readyz` answers 503 from now on and every response closes its
    /// connection, while reviews are still served.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn set_caches(&self, ready: bool) {
        self.caches.store(ready, Ordering::Relaxed);
    }

    pub fn set_certificate(&self, ready: bool) {
        self.certificate.store(ready, Ordering::Relaxed);
    }

    pub fn certificate(&self) -> bool {
        self.certificate.load(Ordering::Relaxed)
    }

    /// `None` when ready, else what is missing.
    pub fn waiting_for(&self) -> Option<&'static str> {
        if self.draining() {
            return Some("shutting down");
        }
        match (
            self.caches.load(Ordering::Relaxed),
            self.certificate.load(Ordering::Relaxed),
        ) {
            (true, true) => None,
            (false, true) => Some("waiting for the Ingress and Service caches"),
            (true, false) => Some("waiting for the caBundle to trust the serving certificate"),
            (false, false) => Some(
                "waiting for the Ingress and Service caches and for the caBundle to trust the serving certificate",
            ),
        }
    }
}
