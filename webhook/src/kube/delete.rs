//! The one way sidecert deletes what it read: on condition that the object is still the one
//! read (same uid and resourceVersion), so a delete never takes an object that changed (or
//! was replaced) since the decision to delete it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{
    Api,
    api::{DeleteParams, Preconditions},
};
use serde::de::DeserializeOwned;

/// How a conditional delete went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    /// It was deleted (or is being deleted).
    Yes,
    /// It was gone already.
    Gone,
    /// It changed since it was read, and is left (the caller decides whether that is an error).
    Changed,
}

/// Deletes the object `meta` describes (as read) from `api`, unless it changed since.
pub async fn delete_unchanged<K>(api: &Api<K>, meta: &ObjectMeta) -> Result<Deleted, kube::Error>
where
    K: Clone + DeserializeOwned + std::fmt::Debug,
{
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid: meta.uid.clone(),
            resource_version: meta.resource_version.clone(),
        }),
        ..DeleteParams::default()
    };
    let name = meta.name.as_deref().unwrap_or_default();
    match api.delete(name, &dp).await {
        Ok(_) => Ok(Deleted::Yes),
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(Deleted::Gone),
        Err(kube::Error::Api(s)) if s.is_conflict() => Ok(Deleted::Changed),
        Err(e) => Err(e),
    }
}
