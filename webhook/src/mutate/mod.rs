//! The pure admission decisions: what a review changes, from the request and a [`Context`].
//! Nothing here talks to the API server (no `kube::Api`, no `kube::Client`); the watch
//! caches, the live re-check and the executor of [`Effect`]s are in [`crate::kube`].
//!
//! - [`pod`]: the Pod decision (sidecar, status annotations, and when to re-check live);
//! - [`ingress`]: the Ingress decision (HTTP-01 routes, what must exist for it);
//! - [`select`]: which Ingress (through which Service) selects a Pod, and when to re-check live;
//! - [`lookup`]: where Ingresses and Services are looked up ([`Lookup`], [`Snapshot`]);
//! - [`container`]: the injected container and its configuration;
//! - [`namespace`]: the namespaces sidecert never acts in;
//! - [`effect`]: the side effects a decision asks for, as data;
//! - [`objects`]: the objects those effects create (temporary Secret, solver Service, Role);
//! - [`context`] and [`outcome`]: what every decision reads and returns.

pub mod container;
pub mod context;
pub mod effect;
pub mod gateway;
pub mod ingress;
pub mod lookup;
pub mod namespace;
pub mod objects;
pub mod outcome;
pub mod pod;
pub mod select;

pub use container::{AcmeDefaults, SidecarSettings};
pub use context::Context;
pub use effect::Effect;
pub use lookup::{Lookup, Snapshot};
pub use outcome::{Outcome, SkipReason};
