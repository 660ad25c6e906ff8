//! Which certificates a Pod's sidecar owns: from annotated Ingresses (through the Services
//! backing their TLS hosts) or from the Pod's own annotations. Also the one decision of
//! whether the answer of the watch caches must be checked against the API server
//! ([`recheck`]); the live check feeds fresh objects back into this same [`select`] as
//! another [`Lookup`].

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use k8s_openapi::api::{core::v1::Service, networking::v1::Ingress};
use sidecert_contract::{CertificateSpec, annotations};

use crate::mutate::{
    container::Overrides,
    context::{HostChecks, SecretChecks},
    ingress::{is_annotated, plan, solver_service_name, usable_secret_for},
    lookup::Lookup,
};

/// Whether a Service in `namespace` selects a Pod with these labels: only then can an
/// Ingress select the Pod (through that Service as its backend).
pub fn has_selecting_service(
    namespace: &str,
    labels: &BTreeMap<String, String>,
    lookup: &dyn Lookup,
) -> bool {
    !labels.is_empty() && lookup.services(namespace).iter().any(|s| selects(s, labels))
}

/// The annotated Ingresses of a namespace as (uid, resourceVersion), to tell whether a cache
/// is behind the API server.
pub fn annotated_versions(ingresses: &[Arc<Ingress>]) -> BTreeMap<String, String> {
    ingresses
        .iter()
        .filter(|i| is_annotated(i))
        .map(|i| {
            (
                i.metadata.uid.clone().unwrap_or_default(),
                i.metadata.resource_version.clone().unwrap_or_default(),
            )
        })
        .collect()
}

/// Certificates one Pod's sidecar may hold: far more than any real workload needs, and what
/// keeps a Pod review's writes (one Lease, one key per certificate) bounded however many
/// Ingresses select it. Applied after the Secrets that may not be used are left out.
pub const MAX_CERTIFICATES_PER_POD: usize = 64;

/// Certificates (and, apart, candidates) one selection returns: what keeps a Pod review's
/// owner look-ups bounded, with room for many left out before [`MAX_CERTIFICATES_PER_POD`].
pub const MAX_SELECTED: usize = 4 * MAX_CERTIFICATES_PER_POD;

/// The outcome of selection for one Pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// Sorted, deduplicated by Secret name; at most [`MAX_SELECTED`].
    pub certificates: Vec<CertificateSpec>,
    /// The Secrets of other TLS entries for the hosts selected, which a decision made
    /// without one of [`Selection::certificates`] may pick instead (see
    /// [`crate::mutate::outcome::Outcome::secret_candidates`]); at most [`MAX_SELECTED`].
    pub candidates: Vec<String>,
    /// ACME overrides: the Pod's own annotations, then the first selecting Ingress's.
    pub overrides: Overrides,
    pub warnings: Vec<String>,
    /// `true` when the Pod's annotations ask for injection but are invalid.
    pub invalid: bool,
    /// `true` when a certificate was left out for its hosts (see [`HostChecks`]).
    pub hosts_left_out: bool,
}

fn selector_matches(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Whether `service` selects a Pod with these labels.
fn selects(service: &Service, labels: &BTreeMap<String, String>) -> bool {
    service
        .spec
        .as_ref()
        .and_then(|s| s.selector.as_ref())
        .is_some_and(|s| selector_matches(s, labels))
}

/// Selects the certificates for a Pod with these labels and annotations in `namespace`.
/// The caller has already honoured `sidecert.io/inject: "false"`. A certificate whose Secret
/// `checks` leaves out is still selected (the caller leaves it out, with a warning), and so is
/// the Ingress's first other Secret for the same host that is not left out, since
/// [`Plan::leave_out`](crate::mutate::ingress::Plan::leave_out) routes that host's challenges
/// to it.
pub fn select(
    namespace: &str,
    labels: &BTreeMap<String, String>,
    pod_annotations: &BTreeMap<String, String>,
    lookup: &dyn Lookup,
    default_profile: Option<&str>,
    checks: &SecretChecks,
    hosts: &HostChecks,
) -> Selection {
    let mut sel = Selection::default();
    let mut certs: BTreeMap<String, CertificateSpec> = BTreeMap::new();
    let mut candidates: BTreeSet<String> = BTreeSet::new();

    // Direct request on the Pod.
    let wants = pod_annotations
        .get(annotations::INJECT)
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    if wants {
        let domains = pod_annotations.get(annotations::DOMAINS);
        let secret = pod_annotations.get(annotations::SECRET_NAME);
        match (domains, secret) {
            (Some(d), Some(s)) => match CertificateSpec::new(s.trim(), d.split(',')) {
                Ok(mut spec) => {
                    spec.domains = hosts.keep(namespace, &spec.domains, &mut sel.warnings);
                    if spec.domains.is_empty() {
                        sel.hosts_left_out = true;
                    } else {
                        certs.insert(spec.secret_name.clone(), spec);
                    }
                }
                Err(e) => {
                    sel.invalid = true;
                    sel.warnings.push(format!("sidecert: not injected: {e}"));
                }
            },
            _ => {
                sel.invalid = true;
                sel.warnings.push(format!(
                    "sidecert: not injected: {} needs {} and {}",
                    annotations::INJECT,
                    annotations::DOMAINS,
                    annotations::SECRET_NAME
                ));
            }
        }
    }

    // Annotated Ingresses whose TLS hosts are served by a Service selecting this Pod.
    let mut ingress_overrides: Option<(String, Overrides)> = None;
    let mut ingresses = lookup.ingresses(namespace);
    ingresses.extend(lookup.gateway_ingresses(namespace));
    ingresses.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    for ing in ingresses.iter().filter(|i| is_annotated(i)) {
        let mut plan = plan(ing, default_profile);
        // The hosts this namespace may not have: said for the routes to this Pod, then left
        // out as the Ingress's own review leaves them out.
        for route in &plan.routes {
            let Some(standing) = hosts.standing(&route.host) else {
                continue;
            };
            if lookup
                .service(namespace, &route.backend)
                .is_some_and(|svc| selects(&svc, labels))
            {
                sel.hosts_left_out = true;
                let warning = standing.warning(namespace, &route.host);
                if !sel.warnings.contains(&warning) {
                    sel.warnings.push(warning);
                }
            }
        }
        plan.leave_out_hosts(namespace, hosts);
        let mut selected = false;
        for route in &plan.routes {
            let Some(svc) = lookup.service(namespace, &route.backend) else {
                continue;
            };
            if !selects(&svc, labels) {
                continue;
            }
            let Some(tls) = plan.secret(&route.secret_name) else {
                continue;
            };
            // A host whose Secret is left out (someone else's) has its challenges routed for
            // another of the Ingress's Secrets (`Plan::leave_out`): that certificate is this
            // Pod's too. The others naming the host are candidates, asked about up front.
            let others = plan
                .secrets
                .iter()
                .filter(|s| s.secret_name != tls.secret_name && s.domains.binary_search(&route.host).is_ok());
            for other in others {
                if candidates.len() < MAX_SELECTED {
                    candidates.insert(other.secret_name.clone());
                }
            }
            let next = checks
                .standing(&tls.secret_name)
                .and_then(|_| usable_secret_for(&plan.secrets, &route.host, checks));
            for tls in std::iter::once(tls).chain(next) {
                // The leader waits for this solver Service's endpoints before telling the CA
                // to validate. If the certificate's hosts go to several backends that select
                // this Pod, the first route (in rule order) wins: its solver is the one this
                // Pod is surely an endpoint of, and the other solvers select Pods through
                // their own backends' selectors.
                let spec = CertificateSpec::new(tls.secret_name.clone(), &tls.domains)
                    .and_then(|spec| spec.with_solver_service(solver_service_name(&route.backend)));
                match spec {
                    Ok(spec) => {
                        selected = true;
                        certs.entry(spec.secret_name.clone()).or_insert(spec);
                    }
                    Err(e) => sel.warnings.push(format!("sidecert: {e}")),
                }
            }
        }
        if selected {
            let name = ing.metadata.name.clone().unwrap_or_default();
            let o = Overrides::from_annotations(ing.metadata.annotations.as_ref());
            match &ingress_overrides {
                None => ingress_overrides = Some((name, o)),
                Some((first, chosen)) if *chosen != o => sel.warnings.push(format!(
                    "sidecert: Ingresses {first} and {name} select this Pod with different ACME settings; \
                     using {first}'s"
                )),
                Some(_) => {}
            }
        }
    }
    let pod_overrides = if wants {
        Overrides::from_annotations(Some(pod_annotations))
    } else {
        Overrides::default()
    };
    sel.overrides = match ingress_overrides {
        Some((_, o)) => pod_overrides.or(&o),
        None => pod_overrides,
    };
    if certs.len() > MAX_SELECTED {
        sel.warnings.push(format!(
            "sidecert: {} certificates select this Pod; sidecert reads the first {MAX_SELECTED} \
             by Secret name",
            certs.len()
        ));
    }
    sel.certificates = certs.into_values().take(MAX_SELECTED).collect();
    sel.candidates = candidates.into_iter().collect();
    if !sel.certificates.is_empty() {
        sel.invalid = false;
    }
    sel
}

/// The caches' answer for a Pod may be stale: the watch caches lag the API server by a
/// moment, so a Pod created right after its Ingress (one `kubectl apply`, a Deployment's
/// first Pods) may be missed. A live re-check lists the namespace's Ingresses and, only when
/// its annotated ones differ from [`Recheck::known`], its Services; the Pod decision is then
/// made again over those fresh objects, and that answer (at least as fresh) wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recheck {
    pub namespace: String,
    /// The cached annotated Ingresses of the namespace (uid → resourceVersion).
    pub known: BTreeMap<String, String>,
}

/// Whether a Pod that the caches did not select must be re-checked live: a cached Service
/// selects it (so an Ingress, or a Gateway's HTTPRoute, could, through that Service), though
/// no cached Ingress or Gateway does.
pub fn recheck(namespace: &str, labels: &BTreeMap<String, String>, lookup: &dyn Lookup) -> Option<Recheck> {
    has_selecting_service(namespace, labels, lookup).then(|| {
        let mut ingresses = lookup.ingresses(namespace);
        ingresses.extend(lookup.gateway_ingresses(namespace));
        Recheck {
            namespace: namespace.to_owned(),
            known: annotated_versions(&ingresses),
        }
    })
}
