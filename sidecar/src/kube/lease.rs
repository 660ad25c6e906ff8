//! The certificate's Lease beyond the election (which is `sidecert_runtime::Election`): the
//! failure record its holder leaves for the next one.

use k8s_openapi::api::coordination::v1::Lease;
use kube::{
    Api,
    api::{Patch, PatchParams},
};

use crate::certificate::state::FailureRecord;

/// Lease annotation holding the certificate's failed orders ([`FailureRecord`]), so a new
/// holder of the Lease (another replica, a restarted Pod) keeps the backoff and the CA's
/// hourly limit on failed validations instead of starting afresh.
pub const FAILURES_ANNOTATION: &str = sidecert_contract::annotations::ORDER_FAILURES;
/// Field manager of the sidecar's own writes.
pub const FIELD_MANAGER: &str = "sidecert-sidecar";

/// The field manager of one participant's writes through the election.
pub fn election_field_manager(identity: &str) -> String {
    format!("sidecert-lease-{identity}")
}

/// Patch parameters of the sidecar's own writes on a Lease.
pub fn patch_params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    }
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
    if let Err(e) = api.patch(lease, &patch_params(), &Patch::Merge(&patch)).await {
        tracing::warn!(lease, error = %e, "writing the failure record");
    }
}
