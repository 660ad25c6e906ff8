//! What every decision reads: the sidecar's shape, the ACME defaults, and where Ingresses
//! and Services are looked up.

use std::{collections::BTreeMap, sync::Arc};

use sidecert_contract::foreign_secret_warning;

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
    /// Secrets of the review's namespace that a certificate may not use: ones that exist and
    /// are not sidecert's ([`sidecert_contract::is_sidecerts_secret`]), and ones whose owner
    /// could not be told in time. A certificate naming one is left unconfigured. The
    /// reviewer finds them; empty elsewhere.
    pub foreign_secrets: BTreeMap<String, SecretStanding>,
}

/// Why a certificate's Secret is left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretStanding {
    /// It exists and is someone else's.
    Foreign,
    /// The API server did not say whose it is in time: no right is granted on a name that
    /// may be someone else's.
    Unknown,
}

impl SecretStanding {
    /// The admission warning for the Secret `namespace/name`.
    pub fn warning(self, namespace: &str, name: &str) -> String {
        match self {
            Self::Foreign => foreign_secret_warning(namespace, name),
            Self::Unknown => format!(
                "sidecert: cannot tell in time whose Secret {namespace}/{name} is; no certificate is \
                 configured for it this time (the next admission decides again)"
            ),
        }
    }
}

impl Context {
    /// The same context looking Ingresses and Services up in `lookup` instead.
    pub fn with_lookup(&self, lookup: Arc<dyn Lookup>) -> Self {
        Self {
            lookup,
            ..self.clone()
        }
    }

    /// The same context, knowing that `names` are Secrets a certificate may not use.
    pub fn with_foreign_secrets(&self, names: BTreeMap<String, SecretStanding>) -> Self {
        Self {
            foreign_secrets: names,
            ..self.clone()
        }
    }
}
