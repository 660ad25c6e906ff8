//! Joining and leaving a leader election on a Lease (kube-lease-manager), the same way in
//! both binaries: the webhook's reconciler and each certificate's sidecars.

use std::time::Duration;

use kube::Client;
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder, LeaseManagerError};
use tokio::{sync::watch, task::JoinHandle};

/// Which Lease, who we are on it, and how long a holder keeps it without renewing.
#[derive(Debug, Clone)]
pub struct LeaseSpec<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    /// This participant's identity (the Lease's `holderIdentity` while it leads).
    pub identity: &'a str,
    /// The field manager of the server-side applies on the Lease.
    pub field_manager: String,
    /// The Lease duration; clamped to `[min, 300 s]` by [`Election::join`].
    pub duration: Duration,
    /// The shortest duration allowed (the webhook allows 2 s, the sidecar 5 s).
    pub min: Duration,
    /// The grace before expiry at which the holder renews, never below this.
    pub min_grace: Duration,
}

/// A running participation in a Lease election.
pub struct Election {
    /// `true` while this participant holds the Lease.
    pub leader: watch::Receiver<bool>,
    task: JoinHandle<Result<LeaseManager, LeaseManagerError>>,
}

impl Election {
    /// Joins the election (the Lease is created if absent).
    pub async fn join(client: Client, spec: LeaseSpec<'_>) -> Result<Self, LeaseManagerError> {
        let secs = spec.duration.as_secs().clamp(spec.min.as_secs().max(1), 300);
        let manager = LeaseManagerBuilder::new(client, spec.name)
            .with_namespace(spec.namespace)
            .with_identity(spec.identity)
            .with_duration(secs)
            .with_grace((secs / 3).max(spec.min_grace.as_secs().max(1)))
            .with_field_manager(spec.field_manager)
            .build()
            .await?;
        let (leader, task) = manager.watch().await;
        Ok(Self { leader, task })
    }

    /// Whether this participant holds the Lease now.
    pub fn is_leader(&self) -> bool {
        *self.leader.borrow()
    }

    /// Gives the Lease up (if held) and waits three seconds at most for that.
    pub async fn release(self) {
        let Self { leader, task } = self;
        // Dropping the receiver makes the lease task release the Lease and end.
        drop(leader);
        match tokio::time::timeout(Duration::from_secs(3), task).await {
            Ok(Ok(Ok(_))) => tracing::debug!("Lease released"),
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "releasing the Lease"),
            Ok(Err(e)) => tracing::warn!(error = %e, "Lease task"),
            Err(_) => tracing::warn!("releasing the Lease timed out"),
        }
    }
}
