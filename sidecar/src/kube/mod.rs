//! What the sidecar keeps in the Kubernetes API: the certificate's Secret, the namespace's
//! ACME account Secret, the failure record on the certificate's Lease, and Events on the Pod.

pub mod account;
pub mod events;
pub mod lease;
pub mod secret;
