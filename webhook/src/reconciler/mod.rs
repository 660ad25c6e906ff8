//! The Ingress reconciler: keeps the cluster in line with the annotated Ingresses of the
//! labelled namespaces, for what admission alone cannot guarantee (an Ingress admitted while
//! the webhook was down with `failurePolicy: Ignore`, Pods that ran before the annotation, a
//! deleted solver Service, an annotation taken off).
//!
//! For an annotated Ingress:
//! - the HTTP-01 path is on every TLS host's rule ([`crate::mutate::ingress::route_patch`]);
//! - the temporary Secrets exist where no Secret does (an existing Secret is never touched),
//!   and so do the certificates' Leases (the sidecar's Role cannot create them);
//! - the solver Services exist, are owned by the Ingress and carry their backend's selector;
//! - Pods behind its backends that lack the sidecar get their workload restarted once per
//!   Ingress generation (like `kubectl rollout restart`), with an Event on the Ingress; Pods
//!   without a restartable owner are named in an Event, never deleted.
//!
//! For an Ingress without the annotation: the HTTP-01 paths and sidecert's solver Services go;
//! Secrets stay.
//!
//! Annotated Gateways and ListenerSets get the same ([`gateway`]): temporary Secrets, solver
//! Services, sidecert's HTTP-01 HTTPRoutes, restarts, and an Event for every listener it
//! cannot serve; without the annotation, its HTTPRoutes and solver Services go.
//!
//! For a namespace that loses its label: sidecert's HTTP-01 paths, solver Services, Roles and
//! RoleBindings there go; Secrets and Leases stay ([`cleanup`]).
//!
//! For the sidecars' Roles in a served namespace: names no injected Pod asks for any more go,
//! and a Role whose ServiceAccount has no injected Pod left goes, each only on the pass after
//! the one that marked it ([`prune`]).
//!
//! One replica reconciles: the holder of a Lease ([`run`]); every replica serves admission.

pub mod cleanup;
pub mod context;
pub mod controller;
pub mod gateway;
pub mod leader;
pub mod plan;
pub mod prune;
pub mod settings;
pub mod workload;

pub use context::{Reconciler, remove_solvers};
pub use controller::run_controller;
pub use leader::{LeaderSettings, default_identity, run};
pub use plan::RESTARTED_AT;
pub use settings::{CONTROLLER_NAME, Settings};
pub use sidecert_contract::annotations::RESTARTED_FOR;
pub use workload::restart_workload;
