//! What every decision reads: the sidecar's shape, the ACME defaults, and where Ingresses
//! and Services are looked up.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

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
    /// Which Secrets of the review's namespace a certificate may use, as the reviewer found
    /// them; empty (every name allowed) elsewhere.
    pub secrets: SecretChecks,
}

/// What the API server said of the Secrets a review's certificates name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecretChecks {
    /// Secrets that exist and are not sidecert's ([`sidecert_contract::is_sidecerts_secret`]),
    /// and ones whose owner could not be told in time. A certificate naming one is left
    /// unconfigured.
    pub left_out: BTreeMap<String, SecretStanding>,
    /// When set, the only names the API server was asked about: a certificate naming any other
    /// (one a second look at the caches or the API server found) is left out as
    /// [`SecretStanding::Unknown`], so that no unchecked name reaches a Role.
    pub checked: Option<BTreeSet<String>>,
}

impl SecretChecks {
    /// Why a certificate may not use the Secret `name`, if it may not.
    pub fn standing(&self, name: &str) -> Option<SecretStanding> {
        if let Some(standing) = self.left_out.get(name) {
            return Some(*standing);
        }
        match &self.checked {
            Some(checked) if !checked.contains(name) => Some(SecretStanding::Unknown),
            _ => None,
        }
    }
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

    /// The same context, knowing which Secrets a certificate may use.
    pub fn with_secret_checks(&self, secrets: SecretChecks) -> Self {
        Self {
            secrets,
            ..self.clone()
        }
    }
}
