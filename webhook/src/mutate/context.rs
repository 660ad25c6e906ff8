//! What every decision reads: the sidecar's shape, the ACME defaults, and where Ingresses
//! and Services are looked up.

use std::{collections::BTreeSet, sync::Arc};

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
    /// Secrets of the review's namespace that exist and are not sidecert's
    /// ([`sidecert_contract::is_sidecerts_secret`]): a certificate naming one is left
    /// unconfigured. The reviewer finds them; empty elsewhere.
    pub foreign_secrets: BTreeSet<String>,
}

impl Context {
    /// The same context looking Ingresses and Services up in `lookup` instead.
    pub fn with_lookup(&self, lookup: Arc<dyn Lookup>) -> Self {
        Self {
            lookup,
            ..self.clone()
        }
    }

    /// The same context, knowing that `names` are someone else's Secrets.
    pub fn with_foreign_secrets(&self, names: BTreeSet<String>) -> Self {
        Self {
            foreign_secrets: names,
            ..self.clone()
        }
    }
}
