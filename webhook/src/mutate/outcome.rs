//! What a decision returns: patch operations, warnings, side effects, or why nothing
//! changed; and the helpers that build patch operations.

use json_patch::{AddOperation, PatchOperation};
use jsonptr::{PointerBuf, Token};
use serde::Serialize;
use serde_json::Value;

use crate::mutate::effect::Effect;

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
    /// The namespace did not opt in, or is a system namespace or sidecert's own.
    NamespaceNotServed,
    /// Every certificate the review asks for names a Secret that is someone else's.
    ForeignSecret,
    /// The API server did not say in time whose Secret a certificate names (none was
    /// someone else's, none could be configured).
    SecretOwnerUnknown,
    /// Every certificate holds more names than the ACME profile takes in one order.
    TooManyNames,
    /// Every host the review asks for is claimed by another namespace, outside the domains
    /// the namespace may claim, or of an owner not known in time.
    HostNotOwned,
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
            Self::NamespaceNotServed => "namespace_not_served",
            Self::ForeignSecret => "foreign_secret",
            Self::SecretOwnerUnknown => "secret_owner_unknown",
            Self::TooManyNames => "too_many_names",
            Self::HostNotOwned => "host_not_owned",
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
    /// Secrets a decision made again may pick instead of the ones the effects name (a host's
    /// later TLS entries): the reviewer asks the API server about them with the others, so
    /// that a Pod and its Ingress settle on the same Secret.
    pub secret_candidates: Vec<String>,
}

impl Outcome {
    pub(crate) fn skip(reason: SkipReason) -> Self {
        Self {
            skipped: Some(reason),
            ..Self::default()
        }
    }

    /// A skip that carries the warnings gathered so far.
    pub(crate) fn skip_with(reason: SkipReason, warnings: Vec<String>) -> Self {
        Self {
            warnings,
            ..Self::skip(reason)
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
