//! The pure admission decisions: what a review changes, from the request and a [`Context`].
//! Nothing here talks to the API server (no `kube::Api`, no `kube::Client`); the watch
//! caches, the live re-check and the executor of [`Effect`]s are in [`crate::kube`].
//!
//! - [`pod`]: the Pod decision (sidecar, status annotations, and when to re-check live);
//! - [`ingress`]: the Ingress decision (HTTP-01 routes, what must exist for it);
//! - [`select`]: which Ingress (through which Service) selects a Pod; the [`Lookup`] trait;
//! - [`container`]: the injected container and its configuration;
//! - [`effect`]: the side effects a decision asks for, as data;
//! - [`objects`]: the objects those effects create (temporary Secret, solver Service, Role).

use std::sync::Arc;

use json_patch::{AddOperation, PatchOperation};
use jsonptr::{PointerBuf, Token};
use serde::Serialize;
use serde_json::Value;

pub mod container;
pub mod effect;
pub mod ingress;
pub mod objects;
pub mod pod;
pub mod select;

pub use container::{AcmeDefaults, SidecarSettings};
pub use effect::Effect;
pub use select::{Lookup, Snapshot};

/// What the mutation functions need: the sidecar's shape, the ACME defaults, and where to
/// look Ingresses and Services up.
#[derive(Clone)]
pub struct Context {
    pub sidecar: SidecarSettings,
    pub acme: AcmeDefaults,
    pub lookup: Arc<dyn Lookup>,
}

impl Context {
    /// The same context looking Ingresses and Services up in `lookup` instead.
    pub fn with_lookup(&self, lookup: Arc<dyn Lookup>) -> Self {
        Self {
            lookup,
            ..self.clone()
        }
    }
}
/// Why a review produced no patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// Pods are mutated on CREATE only; Ingresses on CREATE and UPDATE.
    Operation,
    /// The review carries no object (or a subresource).
    NoObject,
    /// `sidecert.io/inject: "false"`.
    OptedOut,
    /// `sidecert.io/status: injected` or a `sidecert` container already present.
    AlreadyInjected,
    /// Neither an annotated Ingress nor the Pod's own annotations select it.
    NotSelected,
    /// The Pod's annotations ask for injection but are invalid.
    InvalidAnnotations,
    /// The Ingress is not annotated `sidecert.io/issue-temporary-certificate: "true"`.
    NotAnnotated,
    /// Nothing left to change (an Ingress already mutated).
    Unchanged,
    /// Not a Pod or an Ingress, or an object that could not be decoded.
    UnknownKind,
}

impl SkipReason {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Operation => "operation",
            Self::NoObject => "no_object",
            Self::OptedOut => "opted_out",
            Self::AlreadyInjected => "already_injected",
            Self::NotSelected => "not_selected",
            Self::InvalidAnnotations => "invalid_annotations",
            Self::NotAnnotated => "not_annotated",
            Self::Unchanged => "unchanged",
            Self::UnknownKind => "unknown_kind",
        }
    }
}

/// The result of a mutation: patch operations, warnings, side effects to carry out.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub patch: Vec<PatchOperation>,
    pub warnings: Vec<String>,
    pub effects: Vec<Effect>,
    pub skipped: Option<SkipReason>,
}

impl Outcome {
    pub(crate) fn skip(reason: SkipReason) -> Self {
        Self {
            skipped: Some(reason),
            ..Self::default()
        }
    }

    pub(crate) fn warn(mut self, warning: impl Into<String>) -> Self {
        self.warnings.push(warning.into());
        self
    }
}

/// An `add` operation at the pointer made of `tokens`.
pub(crate) fn add<'t>(tokens: impl IntoIterator<Item: Into<Token<'t>>>, value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: PointerBuf::from_tokens(tokens),
        value,
    })
}

/// Serialises a Kubernetes type. These types hold only strings, numbers, maps and lists,
/// which serde_json always serialises.
pub(crate) fn to_json<T: Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or_default()
}
