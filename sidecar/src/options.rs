//! What `sidecert-sidecar run` is told: the contract's configuration and the flags.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use sidecert_contract::{PodIdentity, SidecarConfig};

/// Everything `run` needs beyond the contract's configuration.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub config: SidecarConfig,
    pub pod: PodIdentity,
    pub namespace: String,
    pub http01_listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub cert_dir: Option<PathBuf>,
    pub ari: bool,
    pub retry_base: Duration,
    pub retry_cap: Duration,
    pub lease_duration: Duration,
    /// Upper bound of the wait for the solver Service's endpoints (Ingress certificates).
    pub route_wait: Duration,
    /// Delay after they appear, for the ingress controller to pick them up.
    pub route_settle: Duration,
    /// Wait before calling the reload URL (the files must be where the app reads them).
    pub reload_delay: Duration,
}
