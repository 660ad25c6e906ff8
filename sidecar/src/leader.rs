//! Leader election per certificate (kube-lease-manager) and the publication of key
//! authorizations on the same Lease, which every replica watches.

use std::{collections::HashMap, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Secret};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    runtime::{WatchStreamExt, watcher},
};
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder, LeaseManagerError};
use tokio::{sync::watch, task::JoinHandle};

use crate::{Error, Result, acme::Publisher, issue::self_check, responder::ChallengeStore};

/// Lease annotation holding the pending key authorizations while the leader's order runs.
pub const CHALLENGES_ANNOTATION: &str = sidecert_contract::annotations::CHALLENGES;
/// Lease annotation holding the certificate's failed orders ([`FailureRecord`]), so a new
/// holder of the Lease (another replica, a restarted Pod) keeps the backoff and the CA's
/// hourly limit on failed validations instead of starting afresh.
pub const FAILURES_ANNOTATION: &str = sidecert_contract::annotations::ORDER_FAILURES;
/// Field manager of the sidecar's own writes.
pub const FIELD_MANAGER: &str = "sidecert-sidecar";

/// A running election for one Lease.
pub struct Election {
    pub leader: watch::Receiver<bool>,
    task: JoinHandle<Result<LeaseManager, LeaseManagerError>>,
}

impl Election {
    /// Joins the election for `lease` (created if absent).
    pub async fn start(
        client: Client,
        namespace: &str,
        lease: &str,
        identity: &str,
        duration: Duration,
    ) -> Result<Self> {
        let secs = duration.as_secs().clamp(5, 300);
        let manager = LeaseManagerBuilder::new(client, lease)
            .with_namespace(namespace)
            .with_identity(identity)
            .with_duration(secs)
            .with_grace((secs / 3).max(2))
            .with_field_manager(format!("sidecert-lease-{identity}"))
            .build()
            .await?;
        let (leader, task) = manager.watch().await;
        Ok(Self { leader, task })
    }

    /// Gives the Lease up (if held) and waits a few seconds at most.
    pub async fn release(self) {
        let Self { leader, task } = self;
        drop(leader);
        match tokio::time::timeout(Duration::from_secs(3), task).await {
            Ok(Ok(Ok(_))) => tracing::debug!("Lease released"),
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "releasing the Lease"),
            Ok(Err(e)) => tracing::warn!(error = %e, "Lease task"),
            Err(_) => tracing::warn!("releasing the Lease timed out"),
        }
    }
}

/// What the holder of a certificate's Lease hands on about its failed orders.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailureRecord {
    /// Failed orders in a row.
    pub failures: u32,
    /// No order before this moment (unix seconds).
    pub not_before: i64,
    /// Failed validations per domain (unix seconds), at most the last five.
    pub validations: std::collections::BTreeMap<String, Vec<i64>>,
}

/// Reads the failure record on `lease`; none (or unreadable) is an empty record.
pub async fn read_failures(api: &Api<Lease>, lease: &str) -> FailureRecord {
    match api.get_opt(lease).await {
        Ok(l) => l
            .and_then(|l| l.metadata.annotations?.remove(FAILURES_ANNOTATION))
            .and_then(|v| serde_json::from_str(&v).ok())
            .unwrap_or_default(),
        Err(e) => {
            tracing::warn!(lease, error = %e, "reading the failure record");
            FailureRecord::default()
        }
    }
}

/// Writes (or with `None` removes) the failure record on `lease`; best effort.
pub async fn write_failures(api: &Api<Lease>, lease: &str, record: Option<&FailureRecord>) {
    let value = record.and_then(|r| serde_json::to_string(r).ok());
    let patch = serde_json::json!({ "metadata": { "annotations": { FAILURES_ANNOTATION: value } } });
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    if let Err(e) = api.patch(lease, &params, &Patch::Merge(&patch)).await {
        tracing::warn!(lease, error = %e, "writing the failure record");
    }
}

/// Parses the challenges annotation of a Lease.
pub fn lease_challenges(lease: &Lease) -> HashMap<String, String> {
    lease
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(CHALLENGES_ANNOTATION))
        .and_then(|v| serde_json::from_str(v).ok())
        .unwrap_or_default()
}

/// Feeds the challenges published on `lease` into `store` (scope = the Lease name) until
/// the stream ends (never, in practice: the watcher reconnects with backoff).
pub async fn watch_challenges(api: Api<Lease>, lease: String, store: ChallengeStore) {
    let cfg = watcher::Config::default().fields(&format!("metadata.name={lease}"));
    let mut stream = watcher(api, cfg).default_backoff().boxed();
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(watcher::Event::Apply(l) | watcher::Event::InitApply(l)) => {
                store.set_scope(&lease, lease_challenges(&l));
            }
            Ok(watcher::Event::Delete(_)) => store.set_scope(&lease, HashMap::new()),
            Ok(_) => {}
            Err(e) => tracing::warn!(lease, error = %e, "watching the Lease"),
        }
    }
}

/// Follows the Secret `name`: sends every version (None when absent).
pub async fn watch_secret(api: Api<Secret>, name: String, tx: watch::Sender<Option<Secret>>) {
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = watcher(api, cfg).default_backoff().boxed();
    let mut seen = false;
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => {
                seen = true;
                tx.send_replace(Some(s));
            }
            Ok(watcher::Event::Delete(_)) => {
                seen = false;
                tx.send_replace(None);
            }
            Ok(watcher::Event::Init) => seen = false,
            Ok(watcher::Event::InitDone) => {
                if !seen {
                    tx.send_replace(None);
                }
            }
            Err(e) => tracing::warn!(secret = name, error = %e, "watching the Secret"),
        }
        if tx.is_closed() {
            return;
        }
    }
}

/// Publishes key authorizations as an annotation on the certificate's Lease.
pub struct LeasePublisher {
    pub api: Api<Lease>,
    pub lease: String,
    pub store: ChallengeStore,
    /// Base URL of this replica's responder.
    pub self_url: String,
}

impl LeasePublisher {
    async fn set(&self, value: Option<String>) -> Result<()> {
        let patch = serde_json::json!({
            "metadata": { "annotations": { CHALLENGES_ANNOTATION: value } }
        });
        self.api
            .patch(
                &self.lease,
                &PatchParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..Default::default()
                },
                &Patch::Merge(&patch),
            )
            .await
            .map(|_| ())
            .map_err(Error::from)
    }
}

impl Publisher for LeasePublisher {
    async fn publish(&self, tokens: &HashMap<String, String>) -> Result<()> {
        let json = serde_json::to_string(tokens)
            .map_err(|e| Error::Order(format!("serialising challenges: {e}")))?;
        self.set(Some(json)).await?;
        // Our own watcher must deliver them (the same path every replica uses) ...
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while tokens.keys().any(|t| self.store.get(t).is_none()) {
            if tokio::time::Instant::now() > deadline {
                return Err(Error::Order(
                    "published challenges did not come back through the Lease watch".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // ... and our responder must serve them.
        self_check(&self.self_url, tokens).await
    }

    async fn withdraw(&self) {
        if let Err(e) = self.set(None).await {
            tracing::warn!(lease = self.lease, error = %e, "withdrawing challenges");
        }
    }
}
