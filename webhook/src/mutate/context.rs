//! What every decision reads: the sidecar's shape, the ACME defaults, and where Ingresses
//! and Services are looked up.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use sidecert_contract::{foreign_secret_warning, hosts::MAX_CLAIMABLE_HOST};

/// The most claims one namespace holds (see [`crate::kube::claims`]): far more hosts than a
/// namespace serves, and what keeps a tenant from filling sidecert's namespace with claims.
pub const MAX_CLAIMS_PER_NAMESPACE: usize = 1000;

/// The most hosts one review claims: far more than a real Ingress or Pod asks for, and what
/// keeps the claims one review writes bounded.
pub const MAX_HOSTS_PER_REVIEW: usize = 256;

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
    /// Which hosts the review's namespace may have certificates for, as the reviewer found
    /// them (claims and allowed domains); empty (every host allowed) elsewhere.
    pub hosts: HostChecks,
}

/// What the reviewer found of the hosts a review's certificates name: claimed by another
/// namespace, outside the namespace's allowed domains, or not known in time. A host with a
/// standing gets no certificate, no HTTP-01 path and no temporary Secret.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostChecks {
    /// The hosts left out, with the warning that says why.
    pub left_out: BTreeMap<String, HostStanding>,
    /// When set, the only hosts claimed for the namespace: any other (one a decision made
    /// again found) is left out as [`HostStanding::Unknown`].
    pub claimed: Option<BTreeSet<String>>,
}

impl HostChecks {
    /// Why the namespace may not have a certificate for `host`, if it may not.
    pub fn standing(&self, host: &str) -> Option<&HostStanding> {
        if let Some(standing) = self.left_out.get(host) {
            return Some(standing);
        }
        match &self.claimed {
            Some(claimed) if !claimed.contains(host) => Some(&HostStanding::Unknown),
            _ => None,
        }
    }

    /// `domains` without the hosts left out; a warning for each one left out.
    pub fn keep(&self, namespace: &str, domains: &[String], warnings: &mut Vec<String>) -> Vec<String> {
        domains
            .iter()
            .filter(|d| match self.standing(d) {
                Some(standing) => {
                    let warning = standing.warning(namespace, d);
                    if !warnings.contains(&warning) {
                        warnings.push(warning);
                    }
                    false
                }
                None => true,
            })
            .cloned()
            .collect()
    }
}

/// Why a host is left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostStanding {
    /// Another namespace claimed it first.
    Claimed,
    /// Outside the domains the namespace may claim; the warning says which list refused it.
    NotAllowed(String),
    /// Too long to have a claim.
    Unclaimable,
    /// Past the most hosts one review claims.
    TooMany,
    /// Unclaimed, and the namespace holds the most claims it may.
    TooManyClaims,
    /// The API server did not say in time who owns it.
    Unknown,
}

impl HostStanding {
    /// The admission warning for `host` in `namespace`.
    pub fn warning(&self, namespace: &str, host: &str) -> String {
        match self {
            Self::Claimed => format!(
                "sidecert: {host} is claimed by another namespace, which asked for it first; namespace \
                 {namespace} gets no certificate, HTTP-01 path or temporary Secret for it (a cluster \
                 admin can see the claim: kubectl get leases -n <sidecert's namespace> \
                 sidecert-host-{host})"
            ),
            Self::NotAllowed(warning) => warning.clone(),
            Self::Unclaimable => format!(
                "sidecert: {host} is longer than the {MAX_CLAIMABLE_HOST} characters a host claim \
                 takes; it gets no certificate, HTTP-01 path or temporary Secret"
            ),
            // One warning for all of them (the texts name no host), however many there are.
            Self::TooMany => format!(
                "sidecert: this review asks for more than {MAX_HOSTS_PER_REVIEW} hosts; the ones past \
                 the first {MAX_HOSTS_PER_REVIEW} (in name order) get no certificate, HTTP-01 path or \
                 temporary Secret"
            ),
            Self::TooManyClaims => format!(
                "sidecert: namespace {namespace} holds {MAX_CLAIMS_PER_NAMESPACE} host claims, the \
                 most it may; hosts it has not claimed yet get no certificate, HTTP-01 path or \
                 temporary Secret (claims no object uses are released after a while)"
            ),
            Self::Unknown => format!(
                "sidecert: cannot tell in time whether namespace {namespace} owns {host}; no \
                 certificate is configured for it this time (the next admission decides again)"
            ),
        }
    }
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

    /// The same context, knowing which hosts the namespace may have certificates for.
    pub fn with_host_checks(&self, hosts: HostChecks) -> Self {
        Self {
            hosts,
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
