//! sidecert's sidecar: obtains and renews the certificates of its own Pod with ACME
//! (HTTP-01), answers the challenges of every replica, and keeps the certificate in a
//! Kubernetes Secret (and optionally a directory).
//!
//! `main.rs` only parses the command line and calls [`cli::main`].

pub mod acme;
pub mod cert;
pub mod cli;
pub mod events;
pub mod issue;
pub mod leader;
pub mod metrics;
pub mod reload;
pub mod responder;
pub mod route;
pub mod run;
pub mod schedule;
pub mod store;

/// Everything that can go wrong in the sidecar.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Contract(#[from] sidecert_contract::ContractError),
    #[error("ACME: {0}")]
    Acme(#[from] instant_acme::Error),
    /// A challenge failed validation; `detail` is the CA's problem document.
    #[error("validation failed for {domains}: {detail}")]
    Validation { domains: String, detail: String },
    #[error("ACME order: {0}")]
    Order(String),
    #[error("certificate: {0}")]
    Certificate(String),
    #[error("key generation: {0}")]
    Key(String),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("leader election: {0}")]
    Lease(#[from] kube_lease_manager::LeaseManagerError),
    #[error("I/O on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("HTTP: {0}")]
    Http(String),
    #[error("lost the Lease during the order")]
    LostLease,
    #[error("shutting down")]
    Shutdown,
}

impl Error {
    /// The CA answered that it does not know the account (RFC 8555 `accountDoesNotExist`).
    pub fn is_account_unknown(&self) -> bool {
        matches!(self, Self::Acme(instant_acme::Error::Api(p))
            if p.r#type.as_deref() == Some("urn:ietf:params:acme:error:accountDoesNotExist"))
    }

    /// A short, bounded name for metrics labels.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Config(_) | Self::Contract(_) => "config",
            Self::Acme(_) => "acme",
            Self::Validation { .. } => "validation",
            Self::Order(_) => "order",
            Self::Certificate(_) => "certificate",
            Self::Key(_) => "key",
            Self::Kube(_) => "kube",
            Self::Lease(_) => "lease",
            Self::Io { .. } => "io",
            Self::Http(_) => "http",
            Self::Metrics(_) => "metrics",
            Self::LostLease => "lost_lease",
            Self::Shutdown => "shutdown",
        }
    }

    pub(crate) fn io(path: impl std::fmt::Display, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_string(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
