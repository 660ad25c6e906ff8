//! Side effects of admission: temporary Secrets, solver Services, least-privilege RBAC.
//! All are create-if-absent and idempotent; an existing Secret is never touched.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_openapi::{
    ByteString,
    api::{
        core::v1::{Secret, Service, ServicePort, ServiceSpec},
        networking::v1::Ingress,
        rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject},
    },
    apimachinery::pkg::{apis::meta::v1::OwnerReference, util::intstr::IntOrString},
};
use kube::{
    Api, Client,
    api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256};
use sidecert_contract::{HTTP01_PORT_NAME, MANAGED_BY, MANAGED_BY_LABEL, annotations};

use crate::{
    Error, Lookup, Result,
    ingress::{SOLVER_PORT_NAME, is_annotated},
    selection::{Snapshot, annotated_versions},
};

/// Validity of a temporary certificate.
pub const TEMPORARY_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);

/// Something to create in the cluster after a review.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// A `kubernetes.io/tls` Secret with a self-signed certificate, unless one exists.
    TemporarySecret {
        namespace: String,
        name: String,
        domains: Vec<String>,
    },
    /// The solver Service for a backend Service, unless one exists.
    SolverService {
        namespace: String,
        name: String,
        backend: String,
        owner: Option<OwnerReference>,
    },
    /// Role + RoleBinding `sidecert-<serviceAccount>`, merged with an existing Role.
    Rbac {
        namespace: String,
        service_account: String,
        secrets: Vec<String>,
        leases: Vec<String>,
    },
}

impl Effect {
    /// Metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::TemporarySecret { .. } => "temporary_secret",
            Self::SolverService { .. } => "solver_service",
            Self::Rbac { .. } => "rbac",
        }
    }

    /// Human description for warnings.
    pub fn describe(&self) -> String {
        match self {
            Self::TemporarySecret { namespace, name, .. } => format!("temporary Secret {namespace}/{name}"),
            Self::SolverService { namespace, name, .. } => format!("solver Service {namespace}/{name}"),
            Self::Rbac {
                namespace,
                service_account,
                ..
            } => format!("Role/RoleBinding {namespace}/{}", rbac_name(service_account)),
        }
    }
}

fn managed_labels() -> BTreeMap<String, String> {
    BTreeMap::from([(MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned())])
}

/// A self-signed certificate for exactly `domains` (ECDSA P-256, PKCS#8 key) as a TLS Secret.
pub fn temporary_secret(namespace: &str, name: &str, domains: &[String]) -> Result<Secret> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(domains.to_vec())?;
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        domains.first().map_or("sidecert temporary", String::as_str),
    );
    dn.push(DnType::OrganizationName, "sidecert temporary certificate");
    params.distinguished_name = dn;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + TEMPORARY_VALIDITY;
    let cert = params.self_signed(&key)?;
    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(managed_labels()),
            annotations: Some(BTreeMap::from([
                (annotations::TEMPORARY.to_owned(), "true".to_owned()),
                (annotations::DOMAINS_ON_SECRET.to_owned(), domains.join(",")),
            ])),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(BTreeMap::from([
            ("tls.crt".to_owned(), ByteString(cert.pem().into_bytes())),
            ("tls.key".to_owned(), ByteString(key.serialize_pem().into_bytes())),
        ])),
        ..Default::default()
    })
}

/// The solver Service: the backend's selector, port `http` (80) → `sidecert-http`, and
/// `publishNotReadyAddresses`: challenges must not wait for the application container to be
/// ready (the sidecar answers them regardless), and the leader waits for these endpoints
/// before telling the CA to validate.
pub fn solver_service(
    namespace: &str,
    name: &str,
    selector: BTreeMap<String, String>,
    owner: Option<OwnerReference>,
) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(managed_labels()),
            owner_references: owner.map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            selector: Some(selector),
            ports: Some(vec![ServicePort {
                name: Some(SOLVER_PORT_NAME.to_owned()),
                port: 80,
                target_port: Some(IntOrString::String(HTTP01_PORT_NAME.to_owned())),
                protocol: Some("TCP".to_owned()),
                ..Default::default()
            }]),
            type_: Some("ClusterIP".to_owned()),
            publish_not_ready_addresses: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Whether sidecert made this object (`app.kubernetes.io/managed-by: sidecert`).
pub fn is_managed(meta: &ObjectMeta) -> bool {
    meta.labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .is_some_and(|v| v == MANAGED_BY)
}

/// The merge patch that brings a solver Service back in line: the backend's selector,
/// `publishNotReadyAddresses: true` (solvers made before it was set), and `owner` among its
/// owners. `None` when nothing is off, or when sidecert did not make it.
/// Guarded by the Service's resourceVersion (a concurrent change answers 409; retried).
pub fn solver_repair(
    existing: &Service,
    selector: &BTreeMap<String, String>,
    owner: Option<&OwnerReference>,
) -> Option<serde_json::Value> {
    if !is_managed(&existing.metadata) {
        return None;
    }
    let mut patch = serde_json::Map::new();
    let mut spec = serde_json::Map::new();
    let current = existing.spec.as_ref().and_then(|s| s.selector.as_ref());
    if current != Some(selector) {
        // A merge patch merges maps: keys to drop are set to null.
        let mut sel: serde_json::Map<String, serde_json::Value> = current
            .into_iter()
            .flatten()
            .filter(|(k, _)| !selector.contains_key(*k))
            .map(|(k, _)| (k.clone(), serde_json::Value::Null))
            .collect();
        sel.extend(selector.iter().map(|(k, v)| (k.clone(), v.clone().into())));
        spec.insert("selector".into(), sel.into());
    }
    if existing.spec.as_ref().and_then(|s| s.publish_not_ready_addresses) != Some(true) {
        spec.insert("publishNotReadyAddresses".into(), true.into());
    }
    if !spec.is_empty() {
        patch.insert("spec".into(), spec.into());
    }
    let mut meta = serde_json::Map::new();
    if let Some(owner) = owner {
        let mut owners = existing.metadata.owner_references.clone().unwrap_or_default();
        if !owners.iter().any(|o| o.uid == owner.uid) {
            owners.push(owner.clone());
            meta.insert("ownerReferences".into(), serde_json::to_value(owners).ok()?);
        }
    }
    if patch.is_empty() && meta.is_empty() {
        return None;
    }
    meta.insert(
        "resourceVersion".into(),
        existing.metadata.resource_version.clone().into(),
    );
    patch.insert("metadata".into(), meta.into());
    Some(patch.into())
}

/// Name of the Role and RoleBinding for a ServiceAccount.
pub fn rbac_name(service_account: &str) -> String {
    let mut name = format!("sidecert-{service_account}");
    name.truncate(253);
    name
}

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str], names: Option<&[String]>) -> PolicyRule {
    let strings = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    PolicyRule {
        api_groups: Some(strings(groups)),
        resources: Some(strings(resources)),
        verbs: strings(verbs),
        resource_names: names.map(<[String]>::to_vec),
        non_resource_urls: None,
    }
}

/// The sidecar's Role: what it needs and nothing more.
pub fn role(namespace: &str, service_account: &str, secrets: &[String], leases: &[String]) -> Role {
    Role {
        metadata: ObjectMeta {
            name: Some(rbac_name(service_account)),
            namespace: Some(namespace.to_owned()),
            labels: Some(managed_labels()),
            ..Default::default()
        },
        rules: Some(vec![
            // Its certificate Secrets, the namespace's ACME account Secret and the EAB Secret,
            // by name. `list`/`watch` serve the sidecar's watch on its own Secrets (a
            // metadata.name field selector, which RBAC matches against resourceNames).
            rule(
                &[""],
                &["secrets"],
                &["get", "list", "watch", "update", "patch"],
                Some(secrets),
            ),
            // Kubernetes cannot restrict `create` by name. The sidecar creates the ACME account
            // Secret (and a certificate Secret someone deleted); `create` alone reads nothing.
            rule(&[""], &["secrets"], &["create"], None),
            // Leader election on its certificates' Leases, by name; `create` as above.
            // Replicas watch the Lease for the key authorizations the leader publishes on it.
            rule(
                &["coordination.k8s.io"],
                &["leases"],
                &["get", "list", "watch", "update", "patch"],
                Some(leases),
            ),
            rule(&["coordination.k8s.io"], &["leases"], &["create"], None),
            // Events about its work (kube's recorder patches a repeated Event's series).
            rule(&["", "events.k8s.io"], &["events"], &["create", "patch"], None),
            // The leader waits until its solver Service has endpoints (the Ingress routes
            // challenges only then). EndpointSlices are selected by label
            // (`kubernetes.io/service-name`), so resourceNames cannot narrow this.
            rule(
                &["discovery.k8s.io"],
                &["endpointslices"],
                &["list", "watch"],
                None,
            ),
        ]),
    }
}

/// `existing` with the resource names of `wanted` merged in; `None` when nothing is missing.
pub fn merge_role(existing: &Role, wanted: &Role) -> Option<Role> {
    let mut merged = existing.clone();
    let rules = merged.rules.get_or_insert_with(Vec::new);
    let mut changed = false;
    for want in wanted.rules.iter().flatten() {
        let same_shape = |r: &&mut PolicyRule| {
            r.api_groups == want.api_groups
                && r.resources == want.resources
                && r.verbs == want.verbs
                && r.resource_names.is_some() == want.resource_names.is_some()
        };
        match rules.iter_mut().find(same_shape) {
            Some(have) => {
                if let (Some(have_names), Some(want_names)) =
                    (have.resource_names.as_mut(), &want.resource_names)
                {
                    for n in want_names {
                        if !have_names.contains(n) {
                            have_names.push(n.clone());
                            changed = true;
                        }
                    }
                    have_names.sort();
                }
            }
            None => {
                rules.push(want.clone());
                changed = true;
            }
        }
    }
    changed.then_some(merged)
}

/// The RoleBinding of the sidecar's Role to the ServiceAccount.
pub fn role_binding(namespace: &str, service_account: &str) -> RoleBinding {
    RoleBinding {
        metadata: ObjectMeta {
            name: Some(rbac_name(service_account)),
            namespace: Some(namespace.to_owned()),
            labels: Some(managed_labels()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".to_owned(),
            kind: "Role".to_owned(),
            name: rbac_name(service_account),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".to_owned(),
            name: service_account.to_owned(),
            namespace: Some(namespace.to_owned()),
            api_group: None,
        }]),
    }
}

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

    /// The namespace read from the API server rather than the watch caches: its annotated
    /// Ingresses and its Services. `None` when the annotated Ingresses are exactly the ones
    /// the cache holds (`cached`: uid → resourceVersion, see
    /// [`crate::selection::annotated_versions`]); then no Service list is made.
    pub async fn live_snapshot(
        &self,
        namespace: &str,
        cached: &BTreeMap<String, String>,
        budget: Duration,
    ) -> Result<Option<Snapshot>> {
        let read = async {
            let ingresses: Vec<Arc<Ingress>> = Api::<Ingress>::namespaced(self.client.clone(), namespace)
                .list(&ListParams::default())
                .await?
                .items
                .into_iter()
                .filter(is_annotated)
                .map(Arc::new)
                .collect();
            if annotated_versions(&ingresses) == *cached {
                return Ok(None);
            }
            let services = Api::<Service>::namespaced(self.client.clone(), namespace)
                .list(&ListParams::default())
                .await?
                .items
                .into_iter()
                .map(Arc::new)
                .collect();
            Ok(Some(Snapshot { ingresses, services }))
        };
        tokio::time::timeout(budget, read)
            .await
            .unwrap_or(Err(Error::Timeout(budget)))
    }

    /// The time budget of one review's API calls.
    pub fn budget(&self) -> Duration {
        self.timeout
    }

    /// Carries out every effect within `budget`; returns the failures (the review still
    /// succeeds).
    pub async fn apply(&self, effects: &[Effect], budget: Duration) -> Vec<(Effect, Error)> {
        let runs = effects.iter().map(|effect| async move {
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
                secrets,
                leases,
            } => {
                self.ensure_rbac(namespace, service_account, secrets, leases)
                    .await
            }
        }
    }

    async fn ensure_secret(&self, namespace: &str, name: &str, domains: &[String]) -> Result<()> {
        let api = Api::<Secret>::namespaced(self.client.clone(), namespace);
        // Look first (cheap, and most reviews find it); a create that races another answers
        // 409 and leaves the existing Secret untouched.
        if api.get_metadata_opt(name).await?.is_some() {
            return Ok(());
        }
        let secret = temporary_secret(namespace, name, domains)?;
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => {
                tracing::info!(%namespace, %name, "created temporary Secret");
                Ok(())
            }
            Err(e) if already_exists(&e) => Ok(()),
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

    async fn ensure_rbac(
        &self,
        namespace: &str,
        service_account: &str,
        secrets: &[String],
        leases: &[String],
    ) -> Result<()> {
        let roles = Api::<Role>::namespaced(self.client.clone(), namespace);
        let wanted = role(namespace, service_account, secrets, leases);
        let name = rbac_name(service_account);
        let mut attempts = 0;
        loop {
            attempts += 1;
            let result = match roles.get_opt(&name).await? {
                None => roles.create(&PostParams::default(), &wanted).await.map(drop),
                Some(existing) => match merge_role(&existing, &wanted) {
                    None => Ok(()),
                    Some(merged) => roles
                        .replace(&name, &PostParams::default(), &merged)
                        .await
                        .map(drop),
                },
            };
            match result {
                Ok(()) => break,
                Err(e) if (already_exists(&e) || conflict(&e)) && attempts < 5 => continue,
                Err(e) => return Err(e.into()),
            }
        }
        let bindings = Api::<RoleBinding>::namespaced(self.client.clone(), namespace);
        if bindings.get_metadata_opt(&name).await?.is_none() {
            match bindings
                .create(&PostParams::default(), &role_binding(namespace, service_account))
                .await
            {
                Ok(_) => {}
                Err(e) if already_exists(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}
