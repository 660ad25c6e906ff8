//! What every decision reads: the sidecar's shape, the ACME defaults, and where Ingresses
//! and Services are looked up.

use std::sync::Arc;

use crate::mutate::{
    container::{AcmeDefaults, SidecarSettings},
    lookup::Lookup,
};

/// What the mutation functions need: the sidecar's shape, the ACME defaults, and where to
/// look Ingresses and Services up.
#[derive(Clone)]
pub struct Context {
    pub sidecar: SidecarSettings,
    pub acme: AcmeDefaults,
    pub lookup: Arc<dyn Lookup>,
}

impl Context {
    /// The same context looking Ingresses and Services up in `lookup` instead.
    pub fn with_lookup(&self, lookup: Arc<dyn Lookup>) -> Self {
        Self {
            lookup,
            ..self.clone()
        }
    }
}
