//! sidecert's local plane, Rust side.
//!
//! * [`dns`] — `sidecert-e2e plane-dns`, which `e2e/scripts/cluster-up.sh` starts: it keeps
//!   pebble-challtestsrv's DNS in line with the cluster (Ingress hosts, Pod domains). A real
//!   kubelet on containerd runs the node (`e2e/scripts/node.sh`).
//! * [`ingress`] — requests through the plane's ingress controller (Traefik), keeping the
//!   certificate chain it served.
//! * [`Plane`] — the helper integration tests use to reach (or bring up) the plane and get a
//!   fresh namespace.

pub mod dns;
mod error;
pub mod ingress;
mod plane;

use std::path::Path;

use kube::{
    Client,
    config::{KubeConfigOptions, Kubeconfig},
};

pub use error::{Error, Result};
pub use plane::{Plane, TestNamespace, create_until, dump_on_failure, print_container_logs, wait_for};

/// Installs rustls' ring crypto provider for the process (idempotent). kube, reqwest and
/// instant-acme all use rustls; with more than one provider compiled in, rustls needs to be
/// told which one to use.
pub fn install_crypto_provider() {
    // An error only means a provider is already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A kube client from a kubeconfig file.
pub async fn client_from_kubeconfig(path: &Path) -> Result<Client> {
    let kubeconfig = Kubeconfig::read_from(path)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}
