//! Carries out the [`Effect`]s of admission against the API server: temporary Secrets,
//! solver Services, least-privilege RBAC. All are create-if-absent and idempotent; an
//! existing Secret is never touched (one that is not sidecert's is reported).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::{
    api::{
        coordination::v1::Lease,
        core::v1::{Secret, Service},
        rbac::v1::{Role, RoleBinding},
    },
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use kube::{
    Api, Client, ResourceExt,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};
use sidecert_contract::{annotations, is_sidecerts_secret, lease_name};

use crate::{
    error::{Error, Result},
    mutate::{
        context::SecretStanding,
        effect::Effect,
        lookup::Lookup,
        objects::{
            account_secret, certificate_lease, is_managed, is_prune_candidate, merge_role, rbac_name, role,
            role_binding, solver_repair, solver_service, temporary_secret,
        },
    },
};

/// Whose Secrets a review's certificates name (absent ones are in neither set).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SecretOwners {
    /// Made by sidecert, or holding its temporary certificate.
    pub ours: BTreeSet<String>,
    /// Someone else's: never written.
    pub foreign: BTreeSet<String>,
    /// Not known in time (the API server failed or was slow): no right is granted on them.
    pub unknown: BTreeSet<String>,
}

impl SecretOwners {
    /// Adds what a later look-up found.
    pub fn extend(&mut self, other: Self) {
        self.ours.extend(other.ours);
        self.foreign.extend(other.foreign);
        self.unknown.extend(other.unknown);
    }

    /// Whether a certificate may use the Secret `name`: not found to be someone else's, nor
    /// of an owner not known in time. A name never asked about is allowed too; the caller
    /// asks about every name before it looks.
    pub fn allows(&self, name: &str) -> bool {
        !self.foreign.contains(name) && !self.unknown.contains(name)
    }

    /// The Secrets a certificate may not use, and why.
    pub fn left_out(&self) -> BTreeMap<String, SecretStanding> {
        let foreign = self.foreign.iter().map(|n| (n.clone(), SecretStanding::Foreign));
        let unknown = self.unknown.iter().map(|n| (n.clone(), SecretStanding::Unknown));
        foreign.chain(unknown).collect()
    }
}

/// How many Secrets [`Executor::secret_owners`] looks up at once.
const OWNER_LOOKS_AT_ONCE: usize = 16;

/// Carries out [`Effect`]s against the API server.
#[derive(Clone)]
pub struct Executor {
    client: Client,
    lookup: Arc<dyn Lookup>,
    timeout: Duration,
}

pub(crate) fn already_exists(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_already_exists())
}

pub(crate) fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_conflict())
}

impl Executor {
    pub fn new(client: Client, lookup: Arc<dyn Lookup>, timeout: Duration) -> Self {
        Self {
            client,
            lookup,
            timeout,
        }
    }

    /// The client the executor calls the API server with.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The time budget of one review's API calls.
    pub fn budget(&self) -> Duration {
        self.timeout
    }

    /// Carries out every effect within `budget`; returns the failures (the review still
    /// succeeds). The temporary Secrets come first: one that could not be made sidecert's
    /// (found to be someone else's, created by another between the review's look and now,
    /// or any failure) is then taken out of the Role, so that no right is granted on a
    /// Secret that may not be sidecert's; a Role left with no certificate is not written.
    pub async fn apply(&self, effects: &[Effect], budget: Duration) -> Vec<(Effect, Error)> {
        let deadline = Instant::now() + budget;
        let (secrets, rest): (Vec<&Effect>, Vec<&Effect>) = effects
            .iter()
            .partition(|e| matches!(e, Effect::TemporarySecret { .. }));
        let mut failures = self.apply_all(secrets.iter().copied(), budget).await;
        let refused: BTreeSet<(&str, &str)> = failures
            .iter()
            .filter_map(|(effect, _)| match effect {
                Effect::TemporarySecret { namespace, name, .. } => Some((namespace.as_str(), name.as_str())),
                _ => None,
            })
            .collect();
        let rest: Vec<Effect> = rest
            .into_iter()
            .map(|effect| without_secrets(effect, &refused))
            .filter(|effect| !matches!(effect, Effect::Rbac { leases, .. } if leases.is_empty()))
            .collect();
        let left = deadline.saturating_duration_since(Instant::now());
        let more = self.apply_all(rest.iter(), left).await;
        failures.extend(more);
        failures
    }

    /// Carries out `effects` concurrently within `budget`; returns the failures.
    async fn apply_all<'a>(
        &self,
        effects: impl Iterator<Item = &'a Effect>,
        budget: Duration,
    ) -> Vec<(Effect, Error)> {
        let runs = effects.map(|effect| async move {
            match tokio::time::timeout(budget, self.apply_one(effect)).await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some((effect.clone(), e)),
                Err(_) => Some((effect.clone(), Error::Timeout(budget))),
            }
        });
        futures::future::join_all(runs)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// Carries out one effect.
    pub async fn apply_one(&self, effect: &Effect) -> Result<()> {
        match effect {
            Effect::TemporarySecret {
                namespace,
                name,
                domains,
            } => self.ensure_secret(namespace, name, domains).await,
            Effect::SolverService {
                namespace,
                name,
                backend,
                owner,
            } => self.ensure_solver(namespace, name, backend, owner.as_ref()).await,
            Effect::Rbac {
                namespace,
                service_account,
                certificates,
                account,
                eab,
                leases,
            } => {
                // What the Role names must exist first: the sidecar may not create them.
                self.ensure_owned_secret(namespace, account, || Ok(account_secret(namespace, account)))
                    .await?;
                for lease in leases {
                    self.ensure_lease(namespace, lease).await?;
                }
                let mut secrets = certificates.clone();
                secrets.push(account.clone());
                let wanted = role(namespace, service_account, &secrets, eab.as_slice(), leases);
                self.ensure_rbac(namespace, service_account, &wanted).await
            }
        }
    }

    /// Which of `names` (Secrets of `namespace`) exist, and which of those are someone
    /// else's ([`is_sidecerts_secret`]), asked of the API server within `budget`. A Secret
    /// that cannot be read in time is `unknown`: it may be someone else's, so it is treated
    /// like one (no right on it) until a later review can tell.
    pub async fn secret_owners(&self, namespace: &str, names: &[&str], budget: Duration) -> SecretOwners {
        let api = Api::<Secret>::namespaced(self.client.clone(), namespace);
        // One deadline for all, and a few looks at a time: a review names at most some
        // hundred Secrets, and they must not crowd out the API server's other requests.
        let deadline = tokio::time::Instant::now() + budget;
        let looks: Vec<_> = names
            .iter()
            .map(|name| {
                let (api, name) = (api.clone(), (*name).to_owned());
                async move {
                    let found = tokio::time::timeout_at(deadline, api.get_metadata_opt(&name)).await;
                    (name, found)
                }
            })
            .collect();
        let found: Vec<_> = futures::stream::iter(looks)
            .buffer_unordered(OWNER_LOOKS_AT_ONCE)
            .collect()
            .await;
        let mut owners = SecretOwners::default();
        for (name, found) in found {
            match found {
                Ok(Ok(Some(meta))) if is_sidecerts_secret(&meta.metadata) => {
                    owners.ours.insert(name);
                }
                Ok(Ok(Some(_))) => {
                    owners.foreign.insert(name);
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(%namespace, secret = %name, error = %e, "cannot tell whose Secret this is");
                    owners.unknown.insert(name);
                }
                Err(_) => {
                    tracing::warn!(%namespace, secret = %name, "cannot tell whose Secret this is in time");
                    owners.unknown.insert(name);
                }
            }
        }
        owners
    }

    async fn ensure_secret(&self, namespace: &str, name: &str, domains: &[String]) -> Result<()> {
        self.ensure_owned_secret(namespace, name, || temporary_secret(namespace, name, domains))
            .await
    }

    /// Creates the Secret `build` makes unless one of that name exists; an existing one
    /// must be sidecert's ([`Error::Foreign`] otherwise), and is never touched.
    async fn ensure_owned_secret(
        &self,
        namespace: &str,
        name: &str,
        build: impl FnOnce() -> Result<Secret>,
    ) -> Result<()> {
        let api = Api::<Secret>::namespaced(self.client.clone(), namespace);
        // Look first (cheap, and most reviews find it); a create that races another answers
        // 409 and leaves the existing Secret untouched.
        if let Some(existing) = api.get_metadata_opt(name).await? {
            if is_sidecerts_secret(&existing.metadata) {
                return Ok(());
            }
            return Err(Error::Foreign {
                kind: "Secret",
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            });
        }
        let secret = build()?;
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => {
                tracing::info!(%namespace, %name, "created Secret");
                Ok(())
            }
            // Someone created it between the look and the create: sidecert's (another
            // replica, the sidecar) or not, as its metadata says.
            Err(e) if already_exists(&e) => match api.get_metadata_opt(name).await? {
                Some(existing) if is_sidecerts_secret(&existing.metadata) => Ok(()),
                Some(_) => Err(Error::Foreign {
                    kind: "Secret",
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                }),
                // Gone again: whose it was is unknown.
                None => Err(e.into()),
            },
            Err(e) => Err(e.into()),
        }
    }

    async fn ensure_solver(
        &self,
        namespace: &str,
        name: &str,
        backend: &str,
        owner: Option<&OwnerReference>,
    ) -> Result<()> {
        let api = Api::<Service>::namespaced(self.client.clone(), namespace);
        if let Some(existing) = api.get_metadata_opt(name).await? {
            return self.adopt(&api, &existing.metadata, owner).await;
        }
        let selector = self.backend_selector(namespace, backend).await?;
        let svc = solver_service(namespace, name, selector, owner.cloned());
        match api.create(&PostParams::default(), &svc).await {
            Ok(_) => {
                tracing::info!(%namespace, %name, "created solver Service");
                Ok(())
            }
            Err(e) if already_exists(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The backend Service's selector, from the cache or the API server.
    pub(crate) async fn backend_selector(
        &self,
        namespace: &str,
        backend: &str,
    ) -> Result<BTreeMap<String, String>> {
        let backend_svc = match self.lookup.service(namespace, backend) {
            Some(s) => Some((*s).clone()),
            None => {
                Api::<Service>::namespaced(self.client.clone(), namespace)
                    .get_opt(backend)
                    .await?
            }
        };
        backend_svc
            .and_then(|s| s.spec)
            .and_then(|s| s.selector)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| Error::MissingBackend {
                namespace: namespace.to_owned(),
                name: backend.to_owned(),
            })
    }

    /// The reconciler's version of [`Effect::SolverService`]: creates the solver Service if
    /// absent; on one sidecert made, adds the owner if missing and puts the backend's selector
    /// back if it drifted. Returns what it changed (`None`: nothing). A Service of that name
    /// that sidecert did not make is left alone.
    pub async fn sync_solver(
        &self,
        namespace: &str,
        name: &str,
        backend: &str,
        owner: Option<&OwnerReference>,
    ) -> Result<Option<&'static str>> {
        let api = Api::<Service>::namespaced(self.client.clone(), namespace);
        let selector = self.backend_selector(namespace, backend).await?;
        let Some(existing) = api.get_opt(name).await? else {
            let svc = solver_service(namespace, name, selector, owner.cloned());
            return match api.create(&PostParams::default(), &svc).await {
                Ok(_) => {
                    tracing::info!(%namespace, %name, "created solver Service");
                    Ok(Some("solver_created"))
                }
                Err(e) if already_exists(&e) => Ok(None),
                Err(e) => Err(e.into()),
            };
        };
        let Some(patch) = solver_repair(&existing, &selector, owner) else {
            return Ok(None);
        };
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        tracing::info!(%namespace, %name, "repaired solver Service (selector, publishNotReadyAddresses or owner)");
        Ok(Some("solver_repaired"))
    }

    /// Adds the Ingress as owner of a solver Service sidecert created without one.
    async fn adopt(
        &self,
        api: &Api<Service>,
        meta: &ObjectMeta,
        owner: Option<&OwnerReference>,
    ) -> Result<()> {
        let Some(owner) = owner else { return Ok(()) };
        let ours = is_managed(meta);
        let mut owners = meta.owner_references.clone().unwrap_or_default();
        if !ours || owners.iter().any(|o| o.uid == owner.uid) {
            return Ok(());
        }
        owners.push(owner.clone());
        let patch = serde_json::json!({
            "metadata": { "ownerReferences": owners, "resourceVersion": meta.resource_version }
        });
        let name = meta.name.as_deref().unwrap_or_default();
        match api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if conflict(&e) => Ok(()), // someone else changed it; the next review heals
            Err(e) => Err(e.into()),
        }
    }

    /// Creates a certificate's Lease unless it exists. A Lease of that name is taken as the
    /// certificate's whoever made it (sidecars before this made theirs without a label).
    pub(crate) async fn ensure_lease(&self, namespace: &str, name: &str) -> Result<()> {
        let api = Api::<Lease>::namespaced(self.client.clone(), namespace);
        if api.get_metadata_opt(name).await?.is_some() {
            return Ok(());
        }
        match api
            .create(&PostParams::default(), &certificate_lease(namespace, name))
            .await
        {
            Ok(_) => {
                tracing::info!(%namespace, %name, "created Lease");
                Ok(())
            }
            Err(e) if already_exists(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn ensure_rbac(&self, namespace: &str, service_account: &str, wanted: &Role) -> Result<()> {
        let roles = Api::<Role>::namespaced(self.client.clone(), namespace);
        let name = rbac_name(service_account);
        let mut attempts = 0;
        loop {
            attempts += 1;
            let result = match roles.get_opt(&name).await? {
                None => roles.create(&PostParams::default(), wanted).await.map(drop),
                // A Role of that name someone else made is never adopted: merging names into
                // it would grant its other rules' holders nothing new, but would make
                // sidecert maintain rights it did not choose.
                Some(existing) if !is_managed(&existing.metadata) => {
                    return Err(Error::Foreign {
                        kind: "Role",
                        namespace: namespace.to_owned(),
                        name,
                    });
                }
                // The Role pruning's mark comes off with any admission that needs the Role,
                // so the pruning never acts on what a Pod admitted since it looked needs.
                Some(existing) => match (merge_role(&existing, wanted), is_prune_candidate(&existing)) {
                    (None, false) => Ok(()),
                    (merged, _) => {
                        let mut merged = merged.unwrap_or(existing);
                        merged.annotations_mut().remove(annotations::PRUNE_CANDIDATE);
                        roles
                            .replace(&name, &PostParams::default(), &merged)
                            .await
                            .map(drop)
                    }
                },
            };
            match result {
                Ok(()) => break,
                Err(e) if (already_exists(&e) || conflict(&e)) && attempts < 5 => continue,
                Err(e) => return Err(e.into()),
            }
        }
        let bindings = Api::<RoleBinding>::namespaced(self.client.clone(), namespace);
        match bindings.get_metadata_opt(&name).await? {
            // Never adopted: it may bind another Role, or other subjects.
            Some(existing) if !is_managed(&existing.metadata) => {
                return Err(Error::Foreign {
                    kind: "RoleBinding",
                    namespace: namespace.to_owned(),
                    name,
                });
            }
            Some(_) => {}
            None => match bindings
                .create(&PostParams::default(), &role_binding(namespace, service_account))
                .await
            {
                Ok(_) => {}
                Err(e) if already_exists(&e) => {}
                Err(e) => return Err(e.into()),
            },
        }
        Ok(())
    }
}

/// `effect` with the Secrets of `refused` (namespace, name) taken out of its Role.
fn without_secrets(effect: &Effect, refused: &BTreeSet<(&str, &str)>) -> Effect {
    match effect {
        Effect::Rbac {
            namespace,
            service_account,
            certificates,
            account,
            eab,
            leases,
        } if !refused.is_empty() => Effect::Rbac {
            namespace: namespace.clone(),
            service_account: service_account.clone(),
            account: account.clone(),
            eab: eab.clone(),
            certificates: certificates
                .iter()
                .filter(|s| !refused.contains(&(namespace.as_str(), s.as_str())))
                .cloned()
                .collect(),
            leases: leases
                .iter()
                .filter(|l| {
                    !refused
                        .iter()
                        .any(|(ns, s)| *ns == namespace.as_str() && lease_name(s) == **l)
                })
                .cloned()
                .collect(),
        },
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_secret_and_its_lease_leave_the_role() {
        let rbac = Effect::Rbac {
            namespace: "shop".into(),
            service_account: "web".into(),
            certificates: vec!["web-tls".into(), "team-db".into()],
            account: "sidecert-acme-account-x".into(),
            eab: None,
            leases: vec![lease_name("web-tls"), lease_name("team-db")],
        };
        let refused = BTreeSet::from([("shop", "team-db"), ("other", "web-tls")]);
        assert_eq!(
            without_secrets(&rbac, &refused),
            Effect::Rbac {
                namespace: "shop".into(),
                service_account: "web".into(),
                certificates: vec!["web-tls".into()],
                account: "sidecert-acme-account-x".into(),
                eab: None,
                leases: vec![lease_name("web-tls")],
            }
        );
        let solver = Effect::SolverService {
            namespace: "shop".into(),
            name: "web-sidecert-solver".into(),
            backend: "web".into(),
            owner: None,
        };
        assert_eq!(without_secrets(&solver, &refused), solver);
    }
}
