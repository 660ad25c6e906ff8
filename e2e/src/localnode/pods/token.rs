//! The Pod's ServiceAccount token (TokenRequest API, bound to the Pod), `ca.crt` and
//! `namespace`, written to a directory that is bind-mounted into each container process.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::{
    api::{
        authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
        core::v1::{ConfigMap, Pod, ServiceAccount},
    },
    jiff::Timestamp,
};
use kube::{Api, api::PostParams};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::super::Ctx;
use crate::{Error, Result};

/// Requested token lifetime.
const TOKEN_SECONDS: i64 = 3600;

/// Whether the Pod gets a token (`automountServiceAccountToken` is not `false`).
pub fn wants_token(pod: &Pod) -> bool {
    pod.spec.as_ref().and_then(|s| s.automount_service_account_token) != Some(false)
}

/// Requests a token and writes `token`, `ca.crt` and `namespace` into `dir`. Returns when the
/// token expires.
pub async fn write(ctx: &Ctx, pod: &Pod, dir: &Path) -> Result<Timestamp> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let request = TokenRequest {
        spec: TokenRequestSpec {
            expiration_seconds: Some(TOKEN_SECONDS),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(name),
                uid: pod.metadata.uid.clone(),
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let api: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &ns);
    let response: TokenRequest = api
        .create_subresource("token", &sa, &PostParams::default(), &request)
        .await?;
    let status = response
        .status
        .ok_or_else(|| Error::invalid("TokenRequest", "response without status"))?;
    let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let ca = cms
        .get_opt("kube-root-ca.crt")
        .await?
        .and_then(|cm| cm.data)
        .and_then(|d| d.get("ca.crt").cloned())
        .ok_or_else(|| {
            Error::invalid(
                "ConfigMap kube-root-ca.crt",
                format!("no ca.crt in namespace {ns}"),
            )
        })?;
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| Error::io(dir, e))?;
    write_atomic(&dir.join("ca.crt"), ca.as_bytes()).await?;
    write_atomic(&dir.join("namespace"), ns.as_bytes()).await?;
    write_atomic(&dir.join("token"), status.token.as_bytes()).await?;
    Ok(status.expiration_timestamp.0)
}

/// Renews the token at 80% of its lifetime until cancelled.
pub async fn refresh(
    ctx: Arc<Ctx>,
    pod: Arc<Pod>,
    dir: PathBuf,
    mut expiry: Timestamp,
    stop: CancellationToken,
) {
    loop {
        let left = expiry.duration_since(Timestamp::now()).as_secs().max(0);
        let wait = Duration::from_secs(u64::try_from(left * 4 / 5).unwrap_or(0).max(10));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        match write(&ctx, &pod, &dir).await {
            Ok(e) => {
                info!(dir = %dir.display(), "ServiceAccount token refreshed");
                expiry = e;
            }
            Err(e) => warn!(dir = %dir.display(), error = %e, "ServiceAccount token refresh failed"),
        }
    }
}

async fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    tokio::fs::write(&tmp, data)
        .await
        .map_err(|e| Error::io(&tmp, e))?;
    tokio::fs::rename(&tmp, path)
        .await
        .map_err(|e| Error::io(path, e))
}
