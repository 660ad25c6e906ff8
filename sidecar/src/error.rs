//! Everything that can go wrong in the sidecar, and its name in metrics.

/// Everything that can go wrong in the sidecar.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("configuration: {}", detail(context, source))]
    Config {
        context: String,
        source: Option<BoxError>,
    },
    #[error(transparent)]
    Contract(#[from] sidecert_contract::ContractError),
    #[error("ACME: {0}")]
    Acme(#[from] instant_acme::Error),
    /// A challenge failed validation; `detail` is the CA's problem document.
    #[error("validation failed for {domains}: {detail}")]
    Validation { domains: String, detail: String },
    #[error("ACME order: {}", detail(context, source))]
    Order {
        context: String,
        source: Option<BoxError>,
    },
    #[error("certificate: {}", detail(context, source))]
    Certificate {
        context: String,
        source: Option<BoxError>,
    },
    #[error("key generation: {}", detail(context, source))]
    Key {
        context: String,
        source: Option<BoxError>,
    },
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
    #[error("HTTP: {}", detail(context, source))]
    Http {
        context: String,
        source: Option<BoxError>,
    },
    #[error("lost the Lease during the order")]
    LostLease,
    #[error(
        "Secret {0} exists and is not sidecert's (no app.kubernetes.io/managed-by=sidecert label, no \
         sidecert.io/temporary=true annotation); it is left alone, and no \
         certificate is ordered for it until it is labelled app.kubernetes.io/managed-by=sidecert or deleted"
    )]
    ForeignSecret(String),
    #[error(
        "Secret {0}, where this namespace's ACME account belongs, exists and is not sidecert's; no \
         account is read from it or written to it until it is deleted or renamed"
    )]
    ForeignAccount(String),
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
            Self::Config { .. } | Self::Contract(_) => "config",
            Self::Acme(_) => "acme",
            Self::Validation { .. } => "validation",
            Self::Order { .. } => "order",
            Self::Certificate { .. } => "certificate",
            Self::Key { .. } => "key",
            Self::Kube(_) => "kube",
            Self::Lease(_) => "lease",
            Self::Io { .. } => "io",
            Self::Http { .. } => "http",
            Self::Metrics(_) => "metrics",
            Self::LostLease => "lost_lease",
            Self::ForeignSecret(_) | Self::ForeignAccount(_) => "foreign_secret",
            Self::Shutdown => "shutdown",
        }
    }

    /// A configuration error with nothing underneath.
    pub fn config(context: impl Into<String>) -> Self {
        Self::Config {
            context: context.into(),
            source: None,
        }
    }

    /// A configuration error caused by `source`.
    pub fn config_from(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Config {
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// An order that could not go on, with nothing underneath.
    pub fn order(context: impl Into<String>) -> Self {
        Self::Order {
            context: context.into(),
            source: None,
        }
    }

    /// An order that could not go on because of `source`.
    pub fn order_from(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Order {
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// A certificate that cannot be read or made, with nothing underneath.
    pub fn certificate(context: impl Into<String>) -> Self {
        Self::Certificate {
            context: context.into(),
            source: None,
        }
    }

    /// A certificate that cannot be read or made because of `source`.
    pub fn certificate_from(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Certificate {
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// A key that could not be generated because of `source`.
    pub fn key_from(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Key {
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// A plain-HTTP exchange that failed, with nothing underneath.
    pub fn http(context: impl Into<String>) -> Self {
        Self::Http {
            context: context.into(),
            source: None,
        }
    }

    /// A plain-HTTP exchange that failed because of `source`.
    pub fn http_from(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Http {
            context: context.into(),
            source: Some(source.into()),
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

/// The underlying error of a variant that adds context to it.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `context: source` (either alone when the other is missing), as the messages read.
fn detail(context: &str, source: &Option<BoxError>) -> String {
    match source {
        None => context.to_owned(),
        Some(s) if context.is_empty() => s.to_string(),
        Some(s) => format!("{context}: {s}"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::error::Error as _;

    use super::*;

    #[test]
    fn variants_keep_their_sources_and_read_as_before() {
        let parse = "x".parse::<u8>().unwrap_err();
        let e = Error::config_from("account Secret a", parse.clone());
        assert_eq!(e.to_string(), format!("configuration: account Secret a: {parse}"));
        assert_eq!(e.source().unwrap().to_string(), parse.to_string());
        assert_eq!(e.metric_label(), "config");
        let e = Error::order("Secret watch ended");
        assert_eq!(e.to_string(), "ACME order: Secret watch ended");
        assert!(e.source().is_none());
        assert_eq!(
            Error::key_from("", parse.clone()).to_string(),
            format!("key generation: {parse}")
        );
        assert_eq!(Error::http("u: timed out").metric_label(), "http");
    }
}
