//! What sidecert leaves behind in a namespace it no longer serves (its label came off): the
//! sidecars' Roles and RoleBindings, the solver Services and the HTTP-01 paths go, so no
//! ServiceAccount there keeps a right sidecert gave it and no challenge route stays open.
//! Certificate Secrets, the ACME account Secret and the certificates' Leases stay: they grant
//! nothing. A namespace labelled again gets its paths and solver Services back from the
//! reconciler, its Pods' Roles when a Pod is admitted again.
//!
//! On uninstall ([`uninstall`], the chart's pre-delete hook) the same goes in every namespace
//! sidecert serves or served, after admission and the reconciler are stopped.
//!
//! The leader looks, every [`CLEANUP_INTERVAL`], at the namespaces it served (they hold its
//! host claims) and does not serve any more, asks the API server whether each is still
//! unserved, and cleans it. It lists only inside those namespaces, never across the cluster
//! (with strict RBAC it may read nothing elsewhere). Every write is conditional on the object
//! being as it was read, and touches only what sidecert made (its label and its names); the chart's
//! ValidatingAdmissionPolicy lets the webhook make exactly these writes in an unlabelled
//! namespace and no other.

use std::{collections::BTreeSet, time::Duration};

use k8s_openapi::{
    NamespaceResourceScope,
    api::{
        admissionregistration::v1::MutatingWebhookConfiguration,
        apps::v1::Deployment,
        authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec},
        coordination::v1::Lease,
        core::v1::{Namespace, Pod, Service},
        networking::v1::Ingress,
        rbac::v1::{Role, RoleBinding},
    },
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde::de::DeserializeOwned;
use sidecert_contract::{
    MANAGED_BY, MANAGED_BY_LABEL, SOLVER_SERVICE_SUFFIX,
    hosts::{CLAIM_LABEL, CLAIM_LABEL_VALUE},
};

use crate::{
    error::{Error, Result},
    kube::delete::{Deleted, delete_unchanged},
    mutate::{ingress::route_removal_patch, namespace::may_serve},
    reconciler::plan::{guarded, selector_string},
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
    /// sidecert's HTTP-01 HTTPRoutes (Gateway API).
    pub routes: Vec<String>,
    pub services: Vec<String>,
    pub roles: Vec<String>,
    pub role_bindings: Vec<String>,
}

impl Cleaned {
    pub fn is_empty(&self) -> bool {
        self.ingresses.is_empty()
            && self.routes.is_empty()
            && self.services.is_empty()
            && self.roles.is_empty()
            && self.role_bindings.is_empty()
    }

    /// Logs what went from `ns`, and `why`.
    pub fn log(&self, ns: &str, why: &str) {
        tracing::info!(
            namespace = ns,
            ingresses = ?self.ingresses,
            routes = ?self.routes,
            services = ?self.services,
            roles = ?self.roles,
            role_bindings = ?self.role_bindings,
            why,
            "removed sidecert's HTTP-01 paths, solver Services, Roles and RoleBindings (Secrets stay)"
        );
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

/// The namespaces holding a host claim in `own`: those this release served (a certificate
/// claims its hosts), and so the only ones its cleanup pass may touch; a namespace another
/// webhook serves under another selector holds none.
pub async fn claim_holders(client: &Client, own: &str) -> Result<BTreeSet<String>> {
    let lp = ListParams::default().labels(&format!("{CLAIM_LABEL}={CLAIM_LABEL_VALUE}"));
    let claims = Api::<Lease>::namespaced(client.clone(), own).list(&lp).await?;
    Ok(claims
        .items
        .into_iter()
        .filter_map(|l| l.spec?.holder_identity)
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

/// Whether RBAC lets the webhook delete its Roles in `ns` (asked of the API server: a
/// namespace strict RBAC no longer lists grants it nothing, and is not worth a try).
pub async fn may_clean(client: &Client, ns: &str) -> Result<bool> {
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(ns.to_owned()),
                group: Some("rbac.authorization.k8s.io".to_owned()),
                resource: Some("roles".to_owned()),
                verb: Some("delete".to_owned()),
                ..ResourceAttributes::default()
            }),
            ..SelfSubjectAccessReviewSpec::default()
        },
        ..SelfSubjectAccessReview::default()
    };
    let answer = Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

/// Takes sidecert's HTTP-01 paths off every Ingress of `ns`, and deletes its HTTP-01
/// HTTPRoutes, solver Services, Roles and RoleBindings there. Each step goes on past a failure; the first error is returned
/// after all were tried (the next pass tries again). While an Ingress keeps a path, the solver
/// Services stay, so that the next pass finds the namespace again. With `still_unserved`
/// (the reconciler's selector), the namespace is asked about once more before its Roles
/// go: one labelled again meanwhile keeps them.
pub async fn clean_namespace(
    client: &Client,
    ns: &str,
    still_unserved: Option<&str>,
) -> (Cleaned, Option<Error>) {
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
    let (done, failed) = remove_paths(client, ns).await;
    cleaned.ingresses = done;
    let routes = delete_solver_routes(client, ns).await;
    let routes_failed = routes.is_err();
    note(routes, &mut cleaned.routes);
    if let Some(e) = failed {
        note(Err(e), &mut Vec::new());
    } else if !routes_failed {
        note(delete_ours::<Service>(client, ns).await, &mut cleaned.services);
    }
    if let Some(selector) = still_unserved {
        match served_live(client, ns, selector).await {
            Ok(false) => {}
            Ok(true) => return (cleaned, first_error),
            Err(e) => {
                note(Err(e), &mut Vec::new());
                return (cleaned, first_error);
            }
        }
    }
    note(
        delete_ours::<RoleBinding>(client, ns).await,
        &mut cleaned.role_bindings,
    );
    note(delete_ours::<Role>(client, ns).await, &mut cleaned.roles);
    (cleaned, first_error)
}

/// Deletes sidecert's HTTP-01 HTTPRoutes in `ns` (a namespace that lost its label, an
/// uninstall); the names deleted. Without the Gateway API CRDs there are none.
pub async fn delete_solver_routes(client: &kube::Client, ns: &str) -> Result<Vec<String>> {
    let api = Api::<kube::api::DynamicObject>::namespaced_with(
        client.clone(),
        ns,
        &crate::mutate::gateway::http_route_resource(),
    );
    let lp = kube::api::ListParams::default().labels(&format!(
        "{}={}",
        sidecert_contract::MANAGED_BY_LABEL,
        sidecert_contract::MANAGED_BY
    ));
    let list = match api.list(&lp).await {
        Ok(list) => list.items,
        Err(kube::Error::Api(s)) if s.is_not_found() => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut deleted = Vec::new();
    for route in list
        .iter()
        .filter(|r| crate::mutate::gateway::is_solver_route(&r.metadata))
    {
        let name = route.metadata.name.clone().unwrap_or_default();
        match delete_unchanged(&api, &route.metadata).await? {
            Deleted::Yes => deleted.push(name),
            Deleted::Gone => {}
            // Changed since listed: the next pass looks again.
            Deleted::Changed => {
                return Err(Error::Contended(format!(
                    "HTTPRoute {name} changed while it was removed"
                )));
            }
        }
    }
    Ok(deleted)
}

/// How often the cleanup reads an Ingress again when it changed under the patch.
const PATCH_ATTEMPTS: usize = 5;

/// Takes the HTTP-01 paths off every Ingress of `ns`, going on past one that fails; the
/// Ingresses done, and the first error.
async fn remove_paths(client: &Client, ns: &str) -> (Vec<String>, Option<Error>) {
    let api = Api::<Ingress>::namespaced(client.clone(), ns);
    let mut done = Vec::new();
    let ingresses = match api.list(&ListParams::default()).await {
        Ok(list) => list.items,
        Err(e) => return (done, Some(e.into())),
    };
    let mut first_error = None;
    for ingress in ingresses {
        let name = ingress.name_any();
        match remove_paths_of(&api, ingress).await {
            Ok(true) => done.push(name),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(namespace = ns, ingress = name, error = %e, "cannot take the HTTP-01 paths off");
                first_error.get_or_insert(e);
            }
        }
    }
    (done, first_error)
}

/// Takes the HTTP-01 paths off one Ingress; whether it had any. The patch is guarded by the
/// resourceVersion it was computed from. Others write the Ingress meanwhile: an ingress
/// controller its status (Traefik as soon as it serves a new Ingress), the reconciler its
/// paths. That fails the guard (the API server answers 422 for a failed test operation, 409
/// for a conflict), so the Ingress is read again and the patch recomputed, a few times.
async fn remove_paths_of(api: &Api<Ingress>, mut ingress: Ingress) -> Result<bool> {
    let name = ingress.name_any();
    let mut attempt = 1;
    loop {
        let patch = route_removal_patch(&ingress);
        if patch.is_empty() {
            return Ok(false);
        }
        let guarded_patch = guarded(ingress.resource_version().as_deref(), patch);
        match api
            .patch(&name, &PatchParams::default(), &Patch::Json::<()>(guarded_patch))
            .await
        {
            Ok(_) => return Ok(true),
            Err(kube::Error::Api(s)) if matches!(s.code, 409 | 422) && attempt < PATCH_ATTEMPTS => {
                tracing::debug!(
                    ingress = name,
                    attempt,
                    code = s.code,
                    message = s.message,
                    "Ingress changed under the path removal; reading it again"
                );
                attempt += 1;
                match api.get_opt(&name).await? {
                    Some(fresh) => ingress = fresh,
                    None => return Ok(false),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
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
        match delete_unchanged(&api, &object.metadata).await? {
            Deleted::Yes => deleted.push(name),
            Deleted::Gone => {}
            // Changed since listed: left for the next try, which looks at it again.
            Deleted::Changed => {
                return Err(Error::Contended(format!(
                    "{} {ns}/{name} changed while sidecert cleaned up",
                    K::kind(&())
                )));
            }
        }
    }
    Ok(deleted)
}

/// Before sidecert is uninstalled: deletes its MutatingWebhookConfiguration `webhook` (no
/// review mutates anything any more), scales its Deployment `deployment` in `own` to zero
/// and waits up to `timeout` for its Pods to go (no reconciler adds a path back), then cleans
/// every namespace it serves (`selector`) or served (it holds host claims in `own`), three
/// times at most for one that fails. Secrets and
/// host claims stay (a claim grants nothing, and keeps a host its owner's across a
/// reinstall). `Err` when anything is left (the hook fails and says what; it can be run again).
pub async fn uninstall(
    client: &Client,
    own: &str,
    webhook: &str,
    deployment: &str,
    selector: &str,
    timeout: Duration,
) -> Result<()> {
    match Api::<MutatingWebhookConfiguration>::all(client.clone())
        .delete(webhook, &DeleteParams::default())
        .await
    {
        Ok(_) => tracing::info!(webhook, "deleted the MutatingWebhookConfiguration"),
        Err(kube::Error::Api(s)) if s.is_not_found() => {}
        Err(e) => return Err(e.into()),
    }
    if !deployment.is_empty() {
        stop_webhook(client, own, deployment, timeout).await?;
    }
    // Only namespaces it serves or served, each looked at on its own: no list of Roles or
    // Secrets across the cluster (strict RBAC grants none).
    let mut namespaces = claim_holders(client, own).await?;
    let served = Api::<Namespace>::all(client.clone())
        .list_metadata(&ListParams::default().labels(selector))
        .await?;
    namespaces.extend(served.items.into_iter().filter_map(|n| n.metadata.name));
    namespaces.retain(|ns| may_serve(ns, own));
    // A namespace whose cleanup failed (an Ingress changed under it, say) is tried again.
    let mut left: Vec<String> = namespaces.iter().cloned().collect();
    let mut failed = Vec::new();
    // Where it may not act (a namespace strict RBAC no longer lists): nothing to retry.
    let mut forbidden = Vec::new();
    for round in 1..=3 {
        failed.clear();
        let mut again = Vec::new();
        for ns in &left {
            match may_clean(client, ns).await {
                Ok(true) => {}
                Ok(false) => {
                    forbidden.push(ns.clone());
                    continue;
                }
                Err(e) => {
                    failed.push(format!("{ns}: {e}"));
                    again.push(ns.clone());
                    continue;
                }
            }
            let (cleaned, error) = clean_namespace(client, ns, None).await;
            if !cleaned.is_empty() {
                cleaned.log(ns, "sidecert is being uninstalled");
            }
            if let Some(e) = error {
                failed.push(format!("{ns}: {e}"));
                again.push(ns.clone());
            }
        }
        if again.is_empty() {
            break;
        }
        if round < 3 {
            tracing::warn!(round, namespaces = ?again, "cleanup left objects behind; trying again");
        }
        left = again;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    if !forbidden.is_empty() {
        tracing::warn!(
            namespaces = ?forbidden,
            "sidecert may no longer act in these namespaces (dropped from rbac.namespaces?); what it left there \
             stays: its Roles and RoleBindings (labelled app.kubernetes.io/managed-by=sidecert, named sidecert-*), \
             *-sidecert-solver Services and HTTP-01 paths"
        );
    }
    tracing::info!(namespaces = namespaces.len(), "sidecert cleaned up");
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "cleanup left sidecert's objects behind: {}",
            failed.join("; ")
        )))
    }
}

/// Scales the webhook's Deployment to zero and waits for its Pods (selected by its selector)
/// to go.
async fn stop_webhook(client: &Client, own: &str, deployment: &str, timeout: Duration) -> Result<()> {
    let api = Api::<Deployment>::namespaced(client.clone(), own);
    let Some(found) = api.get_opt(deployment).await? else {
        return Ok(());
    };
    let scale = serde_json::json!({"spec": {"replicas": 0}});
    api.patch_scale(deployment, &PatchParams::default(), &Patch::Merge(&scale))
        .await?;
    // The chart's Deployment selects by matchLabels only.
    let selector = selector_string(
        &found
            .spec
            .and_then(|s| s.selector.match_labels)
            .unwrap_or_default(),
    );
    if selector.is_empty() {
        return Ok(());
    }
    let pods = Api::<Pod>::namespaced(client.clone(), own);
    let lp = ListParams::default().labels(&selector);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = pods.list_metadata(&lp).await?.items.len();
        if left == 0 {
            tracing::info!(deployment, "the webhook's Pods are gone");
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Timeout(timeout));
        }
        tracing::info!(deployment, left, "waiting for the webhook's Pods to go");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
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
