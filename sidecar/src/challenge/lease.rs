//! The key authorizations on the certificate's Lease: the holder publishes them there while
//! its order runs, and every replica follows them into its responder.

use std::{collections::HashMap, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{
    Api,
    api::Patch,
    runtime::{WatchStreamExt, watcher},
};

use crate::{
    acme::Publisher,
    challenge::responder::{ChallengeStore, self_check},
    error::{Error, Result},
    kube::lease::patch_params,
};

/// Lease annotation holding the pending key authorizations while the leader's order runs.
pub const CHALLENGES_ANNOTATION: &str = sidecert_contract::annotations::CHALLENGES;

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
            .patch(&self.lease, &patch_params(), &Patch::Merge(&patch))
            .await
            .map(|_| ())
            .map_err(Error::from)
    }
}

impl Publisher for LeasePublisher {
    async fn publish(&self, tokens: &HashMap<String, String>) -> Result<()> {
        let json =
            serde_json::to_string(tokens).map_err(|e| Error::order_from("serialising challenges", e))?;
        self.set(Some(json)).await?;
        // Our own watcher must deliver them (the same path every replica uses) ...
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while tokens.keys().any(|t| self.store.get(t).is_none()) {
            if tokio::time::Instant::now() > deadline {
                return Err(Error::order(
                    "published challenges did not come back through the Lease watch",
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
