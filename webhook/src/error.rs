//! The webhook's one error type, at the bottom of the crate: every module may use it.

use sidecert_contract::ContractError;

/// The API server's own request limit; larger bodies get HTTP 413.
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;

/// Everything that can go wrong in the webhook.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The request body is not an AdmissionReview (HTTP 400).
    #[error("request body is not an admission.k8s.io/v1 AdmissionReview: {0}")]
    InvalidReview(String),
    /// `inject`'s input is not a manifest it reads.
    #[error("manifest: {0}")]
    InvalidManifest(String),
    /// The request body is not JSON of an AdmissionReview's shape (HTTP 400).
    #[error("request body is not an admission.k8s.io/v1 AdmissionReview: {0}")]
    UndecodableReview(#[source] serde_json::Error),
    /// The request body is over the API server's own limit (HTTP 413).
    #[error("request body is {0} bytes, over the limit of {MAX_BODY_BYTES} bytes (3 MiB)")]
    TooLarge(usize),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("the API call did not finish within {0:?}")]
    Timeout(std::time::Duration),
    /// An object changed under every look in a row (another writer raced each one).
    #[error("{0}")]
    Contended(String),
    #[error("backend Service {namespace}/{name} not found")]
    MissingBackend { namespace: String, name: String },
    /// An object of the name sidecert would write exists and is not sidecert's.
    #[error(
        "{kind} {namespace}/{name} exists and is not sidecert's (no app.kubernetes.io/managed-by=sidecert label); it is left alone"
    )]
    Foreign {
        kind: &'static str,
        namespace: String,
        name: String,
    },
    #[error(transparent)]
    Contract(#[from] ContractError),
    #[error("certificate generation: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("TLS: {0}")]
    Tls(String),
    /// A TLS failure, with the error that caused it.
    #[error("TLS: {what}: {source}")]
    TlsCaused {
        what: String,
        #[source]
        source: BoxError,
    },
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
    /// A configuration failure, with the error that caused it.
    #[error("configuration: {what}: {source}")]
    ConfigCaused {
        what: String,
        #[source]
        source: BoxError,
    },
}

/// The cause of a [`Error::TlsCaused`] or [`Error::ConfigCaused`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `Result` with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A short, stable name of the error for metric labels.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::InvalidReview(_) | Self::UndecodableReview(_) => "invalid_review",
            Self::InvalidManifest(_) => "invalid_manifest",
            Self::TooLarge(_) => "too_large",
            Self::Kube(kube::Error::Api(s)) if s.is_forbidden() => "forbidden",
            Self::Kube(kube::Error::Api(s)) if s.is_conflict() => "conflict",
            Self::Kube(kube::Error::Api(_)) => "api_error",
            Self::Kube(_) => "api_unreachable",
            Self::Timeout(_) => "timeout",
            Self::Contended(_) => "conflict",
            Self::MissingBackend { .. } => "missing_backend",
            Self::Foreign { .. } => "foreign_object",
            Self::Contract(_) => "contract",
            Self::Certificate(_) => "certificate",
            Self::Tls(_) | Self::TlsCaused { .. } => "tls",
            Self::Io { .. } => "io",
            Self::Yaml(_) => "yaml",
            Self::Json(_) => "json",
            Self::Config(_) | Self::ConfigCaused { .. } => "config",
        }
    }

    /// A TLS failure caused by `source`.
    pub(crate) fn tls(what: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::TlsCaused {
            what: what.into(),
            source: source.into(),
        }
    }

    /// A configuration failure caused by `source`.
    pub(crate) fn config(what: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::ConfigCaused {
            what: what.into(),
            source: source.into(),
        }
    }

    pub(crate) fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}
