//! What sidecert leaves behind in a namespace it no longer serves (its label came off): the
//! sidecars' Roles and RoleBindings, the solver Services and the HTTP-01 paths go, so no
//! ServiceAccount there keeps a right sidecert gave it and no challenge route stays open.
//! Certificate Secrets, the ACME account Secret and the certificates' Leases stay: they grant
//! nothing, and a namespace labelled again picks up where it was.
//!
//! The leader looks, every [`CLEANUP_INTERVAL`], for namespaces holding sidecert's Roles,
//! RoleBindings or solver Services that it does not serve, asks the API server whether each
//! is still unserved, and cleans it. Every write is conditional on the object being as it was
//! read, and touches only what sidecert made (its label and its names); the chart's
//! ValidatingAdmissionPolicy lets the webhook make exactly these writes in an unlabelled
//! namespace and no other.

use std::{collections::BTreeSet, time::Duration};

use k8s_openapi::{
    NamespaceResourceScope,
    api::{
        core::v1::{Namespace, Service},
        networking::v1::Ingress,
        rbac::v1::{Role, RoleBinding},
    },
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, Preconditions},
};
use serde::de::DeserializeOwned;
use sidecert_contract::{MANAGED_BY, MANAGED_BY_LABEL, SOLVER_SERVICE_SUFFIX};

use crate::{
    error::{Error, Result},
    mutate::{ingress::route_removal_patch, namespace::may_serve},
    reconciler::plan::guarded,
};

/// How often the leader looks for namespaces to clean.
pub const CLEANUP_INTERVAL: Duration = Duration::from_secs(20);

/// The prefix of the sidecars' Role and RoleBinding names.
const ROLE_PREFIX: &str = "sidecert-";

/// What one namespace's cleanup removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cleaned {
    /// Ingresses whose HTTP-01 paths came off.
    pub ingresses: Vec<String>,
    pub services: Vec<String>,
    pub roles: Vec<String>,
    pub role_bindings: Vec<String>,
}

impl Cleaned {
    pub fn is_empty(&self) -> bool {
        self.ingresses.is_empty()
            && self.services.is_empty()
            && self.roles.is_empty()
            && self.role_bindings.is_empty()
    }
}

/// Whether an object of this name is one sidecert makes of `kind`.
fn ours<K: Resource<DynamicType = ()>>(name: &str) -> bool {
    match K::kind(&()).as_ref() {
        "Service" => name.ends_with(SOLVER_SERVICE_SUFFIX),
        _ => name.starts_with(ROLE_PREFIX),
    }
}

fn managed() -> ListParams {
    ListParams::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"))
}

/// The namespaces, other than the system ones and `own`, that hold a Role, RoleBinding or
/// solver Service of sidecert's.
pub async fn namespaces_with_objects(client: &Client, own: &str) -> Result<BTreeSet<String>> {
    let mut found = BTreeSet::new();
    found.extend(holding::<Role>(client).await?);
    found.extend(holding::<RoleBinding>(client).await?);
    found.extend(holding::<Service>(client).await?);
    found.retain(|ns| may_serve(ns, own));
    Ok(found)
}

async fn holding<K>(client: &Client) -> Result<Vec<String>>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let list = Api::<K>::all(client.clone()).list_metadata(&managed()).await?;
    Ok(list
        .items
        .into_iter()
        .filter(|o| ours::<K>(&o.name_any()))
        .filter_map(|o| o.metadata.namespace)
        .collect())
}

/// Whether the API server says `namespace` carries `selector` now.
pub async fn served_live(client: &Client, namespace: &str, selector: &str) -> Result<bool> {
    let lp = ListParams::default()
        .labels(selector)
        .fields(&format!("metadata.name={namespace}"));
    let found = Api::<Namespace>::all(client.clone()).list_metadata(&lp).await?;
    Ok(!found.items.is_empty())
}

/// Takes sidecert's HTTP-01 paths off every Ingress of `ns`, and deletes its solver Services,
/// Roles and RoleBindings there. Each step goes on past a failure; the first error is returned
/// after all were tried (the next pass tries again).
pub async fn clean_namespace(client: &Client, ns: &str) -> (Cleaned, Option<Error>) {
    let mut cleaned = Cleaned::default();
    let mut first_error = None;
    let mut note = |r: Result<Vec<String>>, into: &mut Vec<String>| match r {
        Ok(names) => into.extend(names),
        Err(e) => {
            tracing::warn!(namespace = ns, error = %e, "cannot clean up after sidecert");
            first_error.get_or_insert(e);
        }
    };
    // Paths first: a challenge route must not outlive the Service it points at.
    note(remove_paths(client, ns).await, &mut cleaned.ingresses);
    note(delete_ours::<Service>(client, ns).await, &mut cleaned.services);
    note(
        delete_ours::<RoleBinding>(client, ns).await,
        &mut cleaned.role_bindings,
    );
    note(delete_ours::<Role>(client, ns).await, &mut cleaned.roles);
    (cleaned, first_error)
}

async fn remove_paths(client: &Client, ns: &str) -> Result<Vec<String>> {
    let api = Api::<Ingress>::namespaced(client.clone(), ns);
    let mut done = Vec::new();
    for ingress in api.list(&ListParams::default()).await?.items {
        let patch = route_removal_patch(&ingress);
        if patch.is_empty() {
            continue;
        }
        let name = ingress.name_any();
        api.patch(
            &name,
            &PatchParams::default(),
            &Patch::Json::<()>(guarded(ingress.resource_version().as_deref(), patch)),
        )
        .await?;
        done.push(name);
    }
    Ok(done)
}

/// Deletes the objects of kind `K` in `ns` that carry sidecert's label and one of its names,
/// each on condition that it is unchanged since listed.
async fn delete_ours<K>(client: &Client, ns: &str) -> Result<Vec<String>>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api = Api::<K>::namespaced(client.clone(), ns);
    let mut deleted = Vec::new();
    for object in api.list_metadata(&managed()).await?.items {
        let name = object.name_any();
        if !ours::<K>(&name) {
            continue;
        }
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: object.uid(),
                resource_version: object.resource_version(),
            }),
            ..DeleteParams::default()
        };
        match api.delete(&name, &dp).await {
            Ok(_) => deleted.push(name),
            Err(kube::Error::Api(s)) if s.is_not_found() || s.is_conflict() => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sidecerts_names_are_its_own() {
        assert!(ours::<Role>("sidecert-default"));
        assert!(!ours::<Role>("app-reader"));
        assert!(ours::<RoleBinding>("sidecert-web"));
        assert!(ours::<Service>("web-sidecert-solver"));
        assert!(
            !ours::<Service>("sidecert-web"),
            "a Service is a solver by its suffix"
        );
    }
}
