//! sidecert's local plane, Rust side.
//!
//! * [`localnode`] — the kubelet stand-in that `e2e/cluster-up.sh` starts as
//!   `sidecert-e2e localnode ...`: it registers a Node, binds Pods to it, runs the Pods whose
//!   images map to binaries of this project in their own network namespaces, reports their
//!   status and keeps pebble-challtestsrv's DNS in line with the cluster.
//! * [`Plane`] — the helper integration tests use to reach (or bring up) the plane and get a
//!   fresh namespace.

mod error;
pub mod localnode;
mod plane;

pub use error::{Error, Result};
pub use plane::{Plane, TestNamespace, create_until, dump_on_failure, wait_for};

/// Installs rustls' ring crypto provider for the process (idempotent). kube, reqwest and
/// instant-acme all use rustls; with more than one provider compiled in, rustls needs to be
/// told which one to use.
pub fn install_crypto_provider() {
    // An error only means a provider is already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
