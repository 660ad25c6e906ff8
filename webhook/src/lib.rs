//! sidecert's admission webhook.
//!
//! The layers, bottom up (a module imports only from layers below it):
//!
//! - [`error`], [`config`] (the flags), [`metrics`], [`readiness`];
//! - [`mutate`]: the pure decisions — the Pod ([`mutate::pod`]) and Ingress
//!   ([`mutate::ingress`]) mutations from an `AdmissionRequest` and a [`Context`] to an
//!   [`Outcome`] (typed JSON Patch operations, warnings, and the side effects
//!   ([`mutate::Effect`]) to carry out), selection ([`mutate::select`]), the injected
//!   container ([`mutate::container`]); nothing there talks to the API server;
//! - [`kube`]: what talks to the API server — the watch caches, the live re-check, the
//!   executor of effects;
//! - [`admission`] (codec, [`Reviewer`], HTTP handlers), [`reconciler`] (the Ingress
//!   reconciler on the elected leader), [`tls`] (the serving certificate);
//! - [`https`] (the HTTPS server: connection limits, TLS, HTTP/1.1, the admission routes);
//! - [`server`], [`offline`] and [`cli`] at the top.

// Input reaches almost every function here: no slicing or indexing that can panic (`get`
// instead); tests may index.
#![cfg_attr(not(test), deny(clippy::indexing_slicing, clippy::string_slice))]

pub mod admission;
pub mod cli;
pub mod config;
pub mod error;
pub mod https;
pub mod kube;
pub mod metrics;
pub mod mutate;
pub mod offline;
pub mod readiness;
pub mod reconciler;
pub mod server;
pub mod tls;

#[cfg(test)]
mod testing;

pub use admission::Reviewer;
pub use cli::{install_crypto_provider, run};
pub use error::{Error, MAX_BODY_BYTES, Result};
pub use mutate::{AcmeDefaults, Context, Lookup, Outcome, SidecarSettings, SkipReason};
