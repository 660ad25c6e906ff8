//! The side effects an admission decision asks for, as plain data: the server carries them
//! out ([`crate::kube::executor::Executor`]) unless the review is a dry run.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

use crate::mutate::objects::rbac_name;

/// Something to create in the cluster after a review.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// A `kubernetes.io/tls` Secret with a self-signed certificate, unless one exists.
    TemporarySecret {
        namespace: String,
        name: String,
        domains: Vec<String>,
    },
    /// The solver Service for a backend Service, unless one exists.
    SolverService {
        namespace: String,
        name: String,
        backend: String,
        owner: Option<OwnerReference>,
    },
    /// Role + RoleBinding `sidecert-<serviceAccount>`, merged with an existing Role.
    Rbac {
        namespace: String,
        service_account: String,
        /// The certificates' Secrets (read and written).
        certificates: Vec<String>,
        /// The namespace's ACME account Secret (read and written; the reviewer asks the API
        /// server whose it is before the Role may name it).
        account: String,
        /// The operator's external-account-binding Secret (read only).
        eab: Option<String>,
        /// The certificates' Leases.
        leases: Vec<String>,
    },
}

impl Effect {
    /// Metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::TemporarySecret { .. } => "temporary_secret",
            Self::SolverService { .. } => "solver_service",
            Self::Rbac { .. } => "rbac",
        }
    }

    /// Human description for warnings.
    pub fn describe(&self) -> String {
        match self {
            Self::TemporarySecret { namespace, name, .. } => format!("temporary Secret {namespace}/{name}"),
            Self::SolverService { namespace, name, .. } => format!("solver Service {namespace}/{name}"),
            Self::Rbac {
                namespace,
                service_account,
                ..
            } => format!("Role/RoleBinding {namespace}/{}", rbac_name(service_account)),
        }
    }
}
