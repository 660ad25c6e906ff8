//! sidecert's sidecar: obtains and renews the certificates of its own Pod with ACME
//! (HTTP-01), answers the challenges of every replica, and keeps the certificate in a
//! Kubernetes Secret (and optionally a directory).
//!
//! The layers, from the bottom: [`certificate`]'s pure decisions (`state`, `schedule`,
//! `x509`); capped response bodies ([`body`]); the I/O around them ([`acme`], [`kube`], [`challenge`], [`dir`], [`reload`],
//! [`metrics`]); the executor of one certificate's steps ([`certificate::task`]); the
//! commands ([`run`], [`issue`], [`cli`]). `main.rs` only parses the command line and calls
//! [`cli::main`].

// Input reaches almost every function here: no slicing or indexing that can panic (`get`
// instead); tests may index.
#![cfg_attr(not(test), deny(clippy::indexing_slicing, clippy::string_slice))]

pub mod acme;
pub mod body;
pub mod certificate;
pub mod challenge;
pub mod cli;
pub mod dir;
pub mod error;
pub mod issue;
pub mod kube;
pub mod metrics;
pub mod options;
pub mod reload;
pub mod run;

pub use error::{Error, Result};
