//! sidecert's admission webhook.
//!
//! The mutations are pure functions ([`pod::mutate_pod`], [`ingress::mutate_ingress`]) from an
//! `AdmissionRequest` and a [`Context`] to an [`Outcome`]: typed JSON Patch operations,
//! admission warnings, and the side effects ([`effects::Effect`]) the server then carries out
//! (temporary Secrets, solver Services, RBAC). The HTTPS server ([`server`]), the offline
//! commands ([`offline`]) and the tests share that one code path ([`admission::Reviewer`]).

use std::sync::Arc;

use json_patch::{AddOperation, PatchOperation};
use jsonptr::{PointerBuf, Token};
use serde::Serialize;
use serde_json::Value;
use sidecert_contract::ContractError;

pub mod admission;
pub mod config;
pub mod effects;
pub mod ingress;
pub mod metrics;
pub mod offline;
pub mod pod;
pub mod reconciler;
pub mod selection;
pub mod selfsigned;
pub mod server;
pub mod sidecar;
pub mod tls;

pub use admission::Reviewer;
pub use selection::Lookup;
pub use sidecar::{AcmeDefaults, SidecarSettings};

/// Everything that can go wrong in the webhook.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The request body is not an AdmissionReview (HTTP 400).
    #[error("request body is not an admission.k8s.io/v1 AdmissionReview: {0}")]
    InvalidReview(String),
    /// The request body is over the API server's own limit (HTTP 413).
    #[error("request body is {0} bytes, over the limit of {MAX_BODY_BYTES} bytes (3 MiB)")]
    TooLarge(usize),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("the API call did not finish within {0:?}")]
    Timeout(std::time::Duration),
    #[error("backend Service {namespace}/{name} not found")]
    MissingBackend { namespace: String, name: String },
    #[error(transparent)]
    Contract(#[from] ContractError),
    #[error("certificate generation: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("configuration: {0}")]
    Config(String),
}

/// `Result` with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A short, stable name of the error for metric labels.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::InvalidReview(_) => "invalid_review",
            Self::TooLarge(_) => "too_large",
            Self::Kube(kube::Error::Api(s)) if s.is_forbidden() => "forbidden",
            Self::Kube(kube::Error::Api(s)) if s.is_conflict() => "conflict",
            Self::Kube(kube::Error::Api(_)) => "api_error",
            Self::Kube(_) => "api_unreachable",
            Self::Timeout(_) => "timeout",
            Self::MissingBackend { .. } => "missing_backend",
            Self::Contract(_) => "contract",
            Self::Certificate(_) => "certificate",
            Self::Tls(_) => "tls",
            Self::Io { .. } => "io",
            Self::Yaml(_) => "yaml",
            Self::Json(_) => "json",
            Self::Config(_) => "config",
        }
    }

    pub(crate) fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}

/// The API server's own request limit; larger bodies get HTTP 413.
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;

/// What the mutation functions need: the sidecar's shape, the ACME defaults, and where to
/// look Ingresses and Services up.
#[derive(Clone)]
pub struct Context {
    pub sidecar: SidecarSettings,
    pub acme: AcmeDefaults,
    pub lookup: Arc<dyn Lookup>,
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
    pub effects: Vec<effects::Effect>,
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

/// Installs ring as the process's rustls crypto provider (once; later calls are no-ops).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Runs a parsed command line; the thin `main` calls this.
pub async fn run(cli: config::Cli) -> Result<()> {
    config::init_tracing(&cli.log_format);
    match cli.command {
        config::Command::Serve(args) => server::serve(*args).await,
        config::Command::Review(args) => offline::review(args).await,
        config::Command::Inject(args) => offline::inject(args).await,
    }
}
