//! How the reconciler behaves, and its name.

use std::time::Duration;

/// The name in Events and in the field manager.
pub const CONTROLLER_NAME: &str = "sidecert-webhook";

/// How the reconciler behaves.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Restart workloads whose Pods lack the sidecar (else: only an Event).
    pub rollout_restart: bool,
    /// Label selector of the reconciled namespaces.
    pub namespace_selector: String,
    /// The release namespace (never reconciled).
    pub own_namespace: String,
    /// Requeue interval of an annotated Ingress.
    pub interval: Duration,
    /// This replica's name on the Lease and in Events.
    pub identity: String,
    /// The chart's ACME profile (`--acme-profile`), which decides how many names an
    /// Ingress's certificate may hold unless the Ingress names its own.
    pub default_profile: Option<String>,
    /// How long a host's claim outlives the last object of its namespace that asks for it.
    pub host_claim_release_after: Duration,
}
