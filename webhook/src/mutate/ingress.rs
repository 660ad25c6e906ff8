//! The Ingress decision (CREATE and UPDATE): HTTP-01 routes to solver Services, temporary
//! Secrets; and what sidecert reads from an Ingress ([`plan`]), which the selection of Pods
//! and the reconciler share.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::{
    api::networking::v1::{
        HTTPIngressPath, Ingress, IngressBackend, IngressServiceBackend, ServiceBackendPort,
    },
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use kube::{
    Resource,
    core::admission::{AdmissionRequest, Operation},
};
use sidecert_contract::{
    ACME_CHALLENGE_PATH, SOLVER_SERVICE_SUFFIX, annotations, max_names_per_order,
    validate_certificate_secret_name, validate_domain, validate_service_name,
};

use json_patch::{PatchOperation, RemoveOperation, TestOperation};
use jsonptr::PointerBuf;

pub use crate::mutate::objects::solver_service_name;
use crate::mutate::{
    context::{Context, HostChecks, SecretChecks, SecretStanding},
    effect::Effect,
    objects::SOLVER_PORT_NAME,
    outcome::{Outcome, SkipReason, add, to_json},
};

/// TLS entries and rules of one Ingress that sidecert reads: far more than any real Ingress
/// has, and what keeps a review's cost bounded whatever a 3 MiB object holds.
pub const MAX_TLS_ENTRIES: usize = 100;
pub const MAX_RULES: usize = 1000;

/// Whether an Ingress carries `sidecert.io/issue-temporary-certificate: "true"`.
pub fn is_annotated(ingress: &Ingress) -> bool {
    ingress
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(annotations::ISSUE_TEMPORARY_CERTIFICATE))
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// One TLS Secret of an Ingress and the HTTP-01-capable hosts it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSecret {
    pub secret_name: String,
    /// Sorted, deduplicated, non-wildcard.
    pub domains: Vec<String>,
}

/// A rule whose host is in a TLS entry: where its HTTP-01 challenges must go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub rule_index: usize,
    pub host: String,
    pub secret_name: String,
    /// The Service the rule's traffic goes to (its Pods get the sidecar).
    pub backend: String,
    /// The rule already routes the challenge path to the solver.
    pub routed: bool,
}

/// What sidecert reads from an Ingress.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub secrets: Vec<TlsSecret>,
    pub routes: Vec<Route>,
    pub warnings: Vec<String>,
}

impl Plan {
    /// The TLS Secret of `name`.
    pub fn secret(&self, name: &str) -> Option<&TlsSecret> {
        self.secrets.iter().find(|s| s.secret_name == name)
    }

    /// Leaves out the Secrets of `foreign` (someone else's, see
    /// [`sidecert_contract::is_sidecerts_secret`], or of an owner not known in time) and the
    /// routes of their hosts, with a warning each: no temporary Secret, no HTTP-01 path, no
    /// sidecar for them.
    pub fn leave_out(&mut self, namespace: &str, checks: &SecretChecks) {
        for secret in &self.secrets {
            if let Some(standing) = checks.standing(&secret.secret_name) {
                self.warnings
                    .push(standing.warning(namespace, &secret.secret_name));
            }
        }
        self.secrets.retain(|s| checks.standing(&s.secret_name).is_none());
        // A host that a later TLS entry also names keeps its route, for that entry's Secret.
        let (secrets, warnings) = (&self.secrets, &mut self.warnings);
        self.routes.retain_mut(|r| {
            if checks.standing(&r.secret_name).is_none() {
                return true;
            }
            match usable_secret_for(secrets, &r.host, checks) {
                Some(other) => {
                    warnings.push(format!(
                        "sidecert: {host}'s HTTP-01 challenges are routed for Secret {other} \
                         instead; an ingress controller may still serve {left} for {host}, as \
                         the first TLS entry naming it",
                        host = r.host,
                        other = other.secret_name,
                        left = r.secret_name,
                    ));
                    r.secret_name = other.secret_name.clone();
                    true
                }
                None => false,
            }
        });
    }

    /// Leaves out the hosts of `checks` (claimed by another namespace, not allowed, or not
    /// known in time), with a warning each: their routes go, a Secret keeps its other hosts,
    /// and one left with none goes too (no temporary Secret, no sidecar for it).
    pub fn leave_out_hosts(&mut self, namespace: &str, checks: &HostChecks) {
        for secret in &mut self.secrets {
            secret.domains = checks.keep(namespace, &secret.domains, &mut self.warnings);
        }
        self.secrets.retain(|s| !s.domains.is_empty());
        self.routes.retain(|r| checks.standing(&r.host).is_none());
    }

    /// Every host of the plan's Secrets.
    pub fn hosts(&self) -> BTreeSet<&str> {
        self.secrets
            .iter()
            .flat_map(|s| s.domains.iter().map(String::as_str))
            .collect()
    }

    /// The names of the Secrets the plan would create if absent.
    pub fn secret_names(&self) -> Vec<&str> {
        self.secrets.iter().map(|s| s.secret_name.as_str()).collect()
    }
}

/// The Secret a host's challenges are routed for when the one its first TLS entry names is
/// left out: the first of `secrets` (a plan's, in TLS entry order) that names the host and
/// that `checks` does not leave out. [`Plan::leave_out`] routes by it and
/// [`crate::mutate::select::select`] gives the Pods behind the route its certificate, so the
/// two always agree.
pub fn usable_secret_for<'a>(
    secrets: &'a [TlsSecret],
    host: &str,
    checks: &SecretChecks,
) -> Option<&'a TlsSecret> {
    secrets.iter().find(|s| {
        checks.standing(&s.secret_name).is_none()
            && s.domains.binary_search_by(|d| d.as_str().cmp(host)).is_ok()
    })
}

fn service_of(backend: &IngressBackend) -> Option<&IngressServiceBackend> {
    backend.service.as_ref()
}

/// Reads the TLS entries and rules of an Ingress. `default_profile` is the chart's ACME
/// profile, which the Ingress's `sidecert.io/acme-profile` overrides: it decides how many
/// names one certificate may hold.
pub fn plan(ingress: &Ingress, default_profile: Option<&str>) -> Plan {
    let mut plan = Plan::default();
    let name = ingress.metadata.name.as_deref().unwrap_or("");
    let profile = ingress
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(annotations::ACME_PROFILE))
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
        .or(default_profile);
    let limit = max_names_per_order(profile);
    let profile = profile.unwrap_or("(the CA's default)");
    let Some(spec) = ingress.spec.as_ref() else {
        plan.warnings
            .push(format!("sidecert: Ingress {name} has no spec; nothing to do"));
        return plan;
    };
    let mut rules = spec.rules.as_deref().unwrap_or_default();
    if rules.len() > MAX_RULES {
        plan.warnings.push(format!(
            "sidecert: Ingress {name} has {} rules; sidecert reads the first {MAX_RULES}",
            rules.len()
        ));
        rules = rules.get(..MAX_RULES).unwrap_or_default();
    }
    let rule_hosts: BTreeSet<String> = rules
        .iter()
        .filter_map(|r| r.host.as_deref())
        .map(str::to_ascii_lowercase)
        .collect();
    let mut tls_entries = spec.tls.as_deref().unwrap_or_default();
    if tls_entries.len() > MAX_TLS_ENTRIES {
        plan.warnings.push(format!(
            "sidecert: Ingress {name} has {} TLS entries; sidecert reads the first {MAX_TLS_ENTRIES}",
            tls_entries.len()
        ));
        tls_entries = tls_entries.get(..MAX_TLS_ENTRIES).unwrap_or_default();
    }

    // host -> its Secrets in TLS entry order: the first one left after the name limits wins.
    let mut host_secrets: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (i, tls) in tls_entries.iter().enumerate() {
        let hosts = tls.hosts.as_deref().unwrap_or_default();
        if hosts.len() > limit {
            plan.warnings.push(format!(
                "sidecert: spec.tls[{i}] has {} hosts, more than an ACME CA accepts in one order \
                 ({limit} with the profile {profile}); no certificate is issued for it",
                hosts.len()
            ));
            continue;
        }
        let Some(secret) = tls.secret_name.as_deref().filter(|s| !s.is_empty()) else {
            plan.warnings.push(format!(
                "sidecert: spec.tls[{i}] ({}) has no secretName; no certificate is issued for it",
                hosts.join(", ")
            ));
            continue;
        };
        if let Err(e) = validate_certificate_secret_name(secret) {
            plan.warnings.push(format!(
                "sidecert: spec.tls[{i}] ({}): {e}; no certificate is issued for it",
                hosts.join(", ")
            ));
            continue;
        }
        let mut domains = Vec::new();
        for host in hosts {
            let host = host.trim().to_ascii_lowercase();
            if host.starts_with("*.") {
                plan.warnings.push(format!(
                    "sidecert: wildcard host {host} cannot be validated with HTTP-01; left alone"
                ));
                continue;
            }
            if let Err(e) = validate_domain(&host) {
                plan.warnings.push(format!("sidecert: spec.tls[{i}]: {e}"));
                continue;
            }
            if !rule_hosts.contains(&host) {
                plan.warnings.push(format!(
                    "sidecert: TLS host {host} has no rule; its HTTP-01 challenge cannot be routed"
                ));
            }
            let secrets = host_secrets.entry(host.clone()).or_default();
            if !secrets.iter().any(|s| s == secret) {
                secrets.push(secret.to_owned());
            }
            domains.push(host);
        }
        match plan.secrets.iter_mut().find(|s| s.secret_name == secret) {
            Some(existing) => existing.domains.extend(domains),
            None => plan.secrets.push(TlsSecret {
                secret_name: secret.to_owned(),
                domains,
            }),
        }
    }
    for s in &mut plan.secrets {
        s.domains.sort();
        s.domains.dedup();
    }
    plan.secrets.retain(|s| {
        if s.domains.len() > limit {
            plan.warnings.push(format!(
                "sidecert: Secret {} would hold {} names, more than an ACME CA accepts in one order \
                 ({limit} with the profile {profile}); no certificate is issued for it",
                s.secret_name,
                s.domains.len()
            ));
            return false;
        }
        !s.domains.is_empty()
    });

    let default_backend = spec.default_backend.as_ref().and_then(service_of);
    for (i, rule) in rules.iter().enumerate() {
        let Some(host) = rule.host.as_deref().map(str::to_ascii_lowercase) else {
            continue;
        };
        // A Secret left out above (too many names) takes no route: the host's next one does.
        let Some(secret) = host_secrets
            .get(&host)
            .into_iter()
            .flatten()
            .find(|s| plan.secret(s).is_some())
        else {
            continue;
        };
        let Some(http) = rule.http.as_ref() else {
            plan.warnings.push(format!(
                "sidecert: rule for {host} has no http paths; its HTTP-01 challenge cannot be routed"
            ));
            continue;
        };
        let backend = http
            .paths
            .iter()
            .filter_map(|p| service_of(&p.backend))
            .map(|s| s.name.as_str())
            .find(|n| !n.ends_with(SOLVER_SERVICE_SUFFIX))
            .or(default_backend.map(|s| s.name.as_str()));
        let Some(backend) = backend else {
            plan.warnings.push(format!(
                "sidecert: rule for {host} has no Service backend; its HTTP-01 challenge cannot be routed"
            ));
            continue;
        };
        if validate_service_name(backend).is_err() {
            plan.warnings.push(format!(
                "sidecert: rule for {host}: backend Service {backend:?} is not a valid Service name \
                 (DNS-1035 label); its HTTP-01 challenge cannot be routed"
            ));
            continue;
        }
        let solver = solver_service_name(backend);
        let routed = http.paths.iter().any(|p| {
            p.path.as_deref() == Some(ACME_CHALLENGE_PATH)
                && service_of(&p.backend).is_some_and(|s| s.name == solver)
        });
        plan.routes.push(Route {
            rule_index: i,
            host,
            secret_name: secret.clone(),
            backend: backend.to_owned(),
            routed,
        });
    }
    plan
}

/// The HTTP-01 path to a solver Service.
pub fn challenge_path(solver: &str) -> HTTPIngressPath {
    HTTPIngressPath {
        path: Some(ACME_CHALLENGE_PATH.to_owned()),
        path_type: "ImplementationSpecific".to_owned(),
        backend: IngressBackend {
            service: Some(IngressServiceBackend {
                name: solver.to_owned(),
                port: Some(ServiceBackendPort {
                    name: Some(SOLVER_PORT_NAME.to_owned()),
                    number: None,
                }),
            }),
            resource: None,
        },
    }
}

/// Mutates an Ingress (CREATE and UPDATE): routes `/.well-known/acme-challenge/` of every TLS
/// host to its solver Service, and asks for the temporary Secrets and solver Services.
pub fn mutate_ingress(req: &AdmissionRequest<Ingress>, ctx: &Context) -> Outcome {
    if !matches!(req.operation, Operation::Create | Operation::Update) {
        return Outcome::skip(SkipReason::Operation);
    }
    let Some(ingress) = req.object.as_ref() else {
        return Outcome::skip(SkipReason::NoObject);
    };
    if !is_annotated(ingress) {
        return Outcome::skip(SkipReason::NotAnnotated);
    }
    let namespace = req
        .namespace
        .clone()
        .or_else(|| ingress.metadata.namespace.clone())
        .unwrap_or_else(|| "default".to_owned());
    let mut plan = plan(ingress, ctx.acme.profile.as_deref());
    let before = plan.secrets.len();
    plan.leave_out_hosts(&namespace, &ctx.hosts);
    let hosts_left_out = plan.secrets.len() < before;
    let foreign = plan
        .secrets
        .iter()
        .any(|s| ctx.secrets.standing(&s.secret_name) == Some(SecretStanding::Foreign));
    plan.leave_out(&namespace, &ctx.secrets);
    let mut out = Outcome {
        warnings: plan.warnings.clone(),
        patch: route_patch(&plan),
        effects: effects(ingress, &namespace, &plan),
        ..Outcome::default()
    };
    if out.patch.is_empty() {
        out.skipped = Some(if plan.secrets.is_empty() && before > 0 {
            if hosts_left_out && !foreign {
                SkipReason::HostNotOwned
            } else if foreign {
                SkipReason::ForeignSecret
            } else {
                SkipReason::SecretOwnerUnknown
            }
        } else {
            SkipReason::Unchanged
        });
    }
    out
}

/// The `add` operations that route `/.well-known/acme-challenge/` of every TLS host that lacks
/// it to its solver Service (at the head of the rule's paths, so it wins over `/`).
pub fn route_patch(plan: &Plan) -> Vec<PatchOperation> {
    let mut patch = Vec::new();
    let mut inserted = Vec::new();
    for route in plan.routes.iter().filter(|r| !r.routed) {
        if inserted.contains(&route.rule_index) {
            continue;
        }
        inserted.push(route.rule_index);
        patch.push(add(
            [
                "spec",
                "rules",
                &route.rule_index.to_string(),
                "http",
                "paths",
                "0",
            ],
            to_json(&challenge_path(&solver_service_name(&route.backend))),
        ));
    }
    patch
}

/// What must exist for an annotated Ingress: its temporary Secrets (unless a Secret exists)
/// and a solver Service per backend, owned by the Ingress once it has a uid.
pub fn effects(ingress: &Ingress, namespace: &str, plan: &Plan) -> Vec<Effect> {
    let mut effects: Vec<Effect> = plan
        .secrets
        .iter()
        .map(|secret| Effect::TemporarySecret {
            namespace: namespace.to_owned(),
            name: secret.secret_name.clone(),
            domains: secret.domains.clone(),
        })
        .collect();
    let owner = owner_reference(ingress);
    for route in &plan.routes {
        let effect = Effect::SolverService {
            namespace: namespace.to_owned(),
            name: solver_service_name(&route.backend),
            backend: route.backend.clone(),
            owner: owner.clone(),
        };
        if !effects.contains(&effect) {
            effects.push(effect);
        }
    }
    effects
}

/// Whether a path is one sidecert adds: the challenge path to a `*-sidecert-solver` Service.
pub fn is_challenge_path(path: &HTTPIngressPath) -> bool {
    path.path.as_deref() == Some(ACME_CHALLENGE_PATH)
        && service_of(&path.backend).is_some_and(|s| s.name.ends_with(SOLVER_SERVICE_SUFFIX))
}

/// The solver Services the Ingress's challenge paths point at.
pub fn routed_solvers(ingress: &Ingress) -> Vec<String> {
    let mut names: Vec<String> = ingress
        .spec
        .iter()
        .flat_map(|s| s.rules.iter().flatten())
        .flat_map(|r| r.http.iter().flat_map(|h| h.paths.iter()))
        .filter(|p| is_challenge_path(p))
        .filter_map(|p| service_of(&p.backend).map(|s| s.name.clone()))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The operations that take sidecert's challenge paths out of an Ingress (the reverse of
/// [`route_patch`]), each guarded by a `test` of the path it removes, from the last index
/// down so earlier removals do not shift later ones.
pub fn route_removal_patch(ingress: &Ingress) -> Vec<PatchOperation> {
    route_removal_patch_for(ingress, |_| true)
}

/// [`route_removal_patch`] for the rules whose host (lower case; `""` for none) `remove`
/// picks: the HTTP-01 paths of hosts the namespace may not have any more (claimed by
/// another namespace, or outside its allowed domains).
pub fn route_removal_patch_for(ingress: &Ingress, remove: impl Fn(&str) -> bool) -> Vec<PatchOperation> {
    let mut patch = Vec::new();
    let rules = ingress.spec.iter().flat_map(|s| s.rules.iter().flatten());
    for (i, rule) in rules.enumerate() {
        let host = rule.host.as_deref().unwrap_or_default().to_ascii_lowercase();
        if !remove(&host) {
            continue;
        }
        let Some(http) = rule.http.as_ref() else {
            continue;
        };
        let found: Vec<(usize, &HTTPIngressPath)> = http
            .paths
            .iter()
            .enumerate()
            .filter(|(_, p)| is_challenge_path(p))
            .collect();
        // A rule left with no path at all would be refused (`paths` is required): its `http`
        // goes instead, tested whole so that a path added meanwhile fails the patch.
        if !found.is_empty() && found.len() == http.paths.len() {
            let pointer = PointerBuf::from_tokens(["spec", "rules", &i.to_string(), "http"]);
            patch.push(PatchOperation::Test(TestOperation {
                path: pointer.clone(),
                value: to_json(http),
            }));
            patch.push(PatchOperation::Remove(RemoveOperation { path: pointer }));
            continue;
        }
        for (j, path) in found.into_iter().rev() {
            let pointer =
                PointerBuf::from_tokens(["spec", "rules", &i.to_string(), "http", "paths", &j.to_string()]);
            patch.push(PatchOperation::Test(TestOperation {
                path: pointer.clone(),
                value: to_json(path),
            }));
            patch.push(PatchOperation::Remove(RemoveOperation { path: pointer }));
        }
    }
    patch
}

/// Whether the Ingress sends traffic to the Service `name`, or routes challenges to it.
pub fn references_service(ingress: &Ingress, name: &str) -> bool {
    let Some(spec) = ingress.spec.as_ref() else {
        return false;
    };
    let backends = spec.default_backend.iter().chain(
        spec.rules
            .iter()
            .flatten()
            .flat_map(|r| r.http.iter().flat_map(|h| h.paths.iter().map(|p| &p.backend))),
    );
    backends
        .filter_map(service_of)
        .any(|s| s.name == name || solver_service_name(&s.name) == name)
}

/// The owner reference to an Ingress, when it has a uid (not yet on CREATE).
pub fn owner_reference(ingress: &Ingress) -> Option<OwnerReference> {
    let uid = ingress.metadata.uid.clone().filter(|u| !u.is_empty())?;
    Some(OwnerReference {
        api_version: Ingress::api_version(&()).into_owned(),
        kind: Ingress::kind(&()).into_owned(),
        name: ingress.metadata.name.clone()?,
        uid,
        controller: Some(false),
        block_owner_deletion: Some(false),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::{
        mutate::{context::HostStanding, objects::rbac_name},
        testing::ingress,
    };

    #[test]
    fn generated_names_fit_whatever_the_input() {
        assert_eq!(solver_service_name("web"), "web-sidecert-solver");
        // Mutating admission runs before the API server validates the Ingress: a backend
        // whose name puts a multi-byte character across byte 63 (or the hash's cut) made
        // String::truncate panic, which aborted the webhook.
        for backend in [
            format!("{}é", "a".repeat(62)),
            format!("{}é", "a".repeat(53)),
            format!("{}é", "a".repeat(47)),
            "é".repeat(100),
            "x".repeat(300),
        ] {
            let name = solver_service_name(&backend);
            assert!(name.len() <= 63, "{name}");
        }
        let (one, two) = (
            solver_service_name(&format!("{}-one", "b".repeat(60))),
            solver_service_name(&format!("{}-two", "b".repeat(60))),
        );
        assert_ne!(one, two, "two long backends never share a solver Service");
        assert!(validate_service_name(&one).is_ok(), "{one}");
        assert!(one.ends_with(SOLVER_SERVICE_SUFFIX), "{one}");
        for sa in [format!("{}é", "s".repeat(243)), "é".repeat(200)] {
            assert!(rbac_name(&sa).len() <= 253);
        }
        assert_eq!(rbac_name("default"), "sidecert-default");
    }

    #[test]
    fn a_long_backend_gets_one_solver_route_and_then_nothing_more() {
        // The solver's name must stay recognisable: a hashed name without the suffix was
        // taken for the backend on the next review, which added another route and another
        // solver Service, without end.
        for len in [40, 47, 48, 63] {
            let backend = "b".repeat(len);
            let mut ing = ingress(true, false);
            let spec = ing.spec.as_mut().unwrap();
            let path = &mut spec.rules.as_mut().unwrap()[0].http.as_mut().unwrap().paths[0];
            path.backend.service.as_mut().unwrap().name = backend.clone();
            let first = plan(&ing, None);
            assert_eq!(first.routes.len(), 1);
            assert_eq!(first.routes[0].backend, backend);
            assert!(!first.routes[0].routed);
            // Apply what admission adds: the challenge path first.
            let solver = solver_service_name(&backend);
            let paths = &mut ing.spec.as_mut().unwrap().rules.as_mut().unwrap()[0]
                .http
                .as_mut()
                .unwrap()
                .paths;
            paths.insert(0, challenge_path(&solver));
            let again = plan(&ing, None);
            assert_eq!(again.routes.len(), 1, "{len}: {again:?}");
            assert_eq!(
                again.routes[0].backend, backend,
                "{len}: the backend, not the solver"
            );
            assert!(again.routes[0].routed, "{len}: already routed, nothing to add");
        }
    }

    #[test]
    fn invalid_backend_or_secret_names_are_warned_about_and_get_no_route() {
        let mut bad_backend = ingress(true, false);
        let spec = bad_backend.spec.as_mut().unwrap();
        let path = &mut spec.rules.as_mut().unwrap()[0].http.as_mut().unwrap().paths[0];
        path.backend.service.as_mut().unwrap().name = format!("Wéb{}", "a".repeat(70));
        let p = plan(&bad_backend, None);
        assert!(p.routes.is_empty(), "{p:?}");
        assert!(
            p.warnings.iter().any(|w| w.contains("not a valid Service name")),
            "{:?}",
            p.warnings
        );

        let mut bad_secret = ingress(true, false);
        bad_secret.spec.as_mut().unwrap().tls.as_mut().unwrap()[0].secret_name = Some("Web_TLS".into());
        let p = plan(&bad_secret, None);
        assert!(p.secrets.is_empty() && p.routes.is_empty(), "{p:?}");
        assert!(
            p.warnings.iter().any(|w| w.contains("invalid Secret name")),
            "{:?}",
            p.warnings
        );

        let good = plan(&ingress(true, false), None);
        assert_eq!(good.routes.len(), 1);
        assert!(good.warnings.is_empty(), "{:?}", good.warnings);
    }

    #[test]
    fn the_profile_decides_how_many_names_a_certificate_may_hold() {
        // 26 hosts: classic takes them (100), tlsserver and shortlived do not (25), whether
        // the Ingress names the profile or the chart's default does.
        let mut ing = ingress(true, false);
        let hosts: Vec<String> = (0..26).map(|i| format!("h{i}.shop.example")).collect();
        ing.spec.as_mut().unwrap().tls.as_mut().unwrap()[0].hosts = Some(hosts);
        let names = |p: &Plan| p.secrets.iter().map(|s| s.domains.len()).sum::<usize>();
        assert!(names(&plan(&ing, None)) >= 26);
        assert!(names(&plan(&ing, Some("classic"))) >= 26);
        let short = plan(&ing, Some("shortlived"));
        assert!(short.secrets.is_empty() && short.routes.is_empty(), "{short:?}");
        assert!(
            short
                .warnings
                .iter()
                .any(|w| w.contains("(25 with the profile shortlived)")),
            "{:?}",
            short.warnings
        );
        ing.metadata
            .annotations
            .get_or_insert_default()
            .insert(annotations::ACME_PROFILE.into(), " tlsserver ".into());
        assert!(plan(&ing, None).secrets.is_empty());
        ing.metadata
            .annotations
            .get_or_insert_default()
            .insert(annotations::ACME_PROFILE.into(), "classic".into());
        assert!(
            names(&plan(&ing, Some("shortlived"))) >= 26,
            "the Ingress's own profile wins"
        );
    }

    #[test]
    fn a_host_the_namespace_does_not_own_loses_its_route_and_leaves_its_secret() {
        // One TLS entry with two hosts, a second entry with only the foreign one: the first
        // Secret keeps its other host, the second goes, and the foreign host's path (added
        // before the claim) is what the reconciler takes off.
        let mut ing = ingress(true, true);
        let spec = ing.spec.as_mut().unwrap();
        spec.tls = Some(
            serde_json::from_value(serde_json::json!([
                {"hosts": ["web.shop.example", "api.shop.example"], "secretName": "web-tls"},
                {"hosts": ["web.shop.example"], "secretName": "only-tls"}]))
            .unwrap(),
        );
        let mut api_rule = spec.rules.as_ref().unwrap()[0].clone();
        api_rule.host = Some("API.shop.example".to_owned());
        spec.rules.as_mut().unwrap().push(api_rule);
        let mut p = plan(&ing, None);
        assert_eq!(p.routes.len(), 2);
        let checks = HostChecks {
            left_out: BTreeMap::from([("web.shop.example".to_owned(), HostStanding::Claimed)]),
            claimed: None,
        };
        p.leave_out_hosts("shop", &checks);
        assert_eq!(p.secret_names(), ["web-tls"]);
        assert_eq!(p.secrets[0].domains, ["api.shop.example"]);
        assert_eq!(p.routes.len(), 1);
        assert_eq!(p.routes[0].host, "api.shop.example");
        assert_eq!(p.warnings.len(), 1, "one warning per host: {:?}", p.warnings);
        assert!(
            p.warnings[0].contains("claimed by another namespace"),
            "{:?}",
            p.warnings
        );
        let removal = route_removal_patch_for(&ing, |h| checks.standing(h).is_some());
        // A test and a remove, of rule 0 only.
        assert_eq!(removal.len(), 2, "{removal:?}");
        assert!(
            serde_json::to_string(&removal)
                .unwrap()
                .contains("/spec/rules/0/http/paths/0")
        );
        // With only the hosts claimed allowed, one never claimed is left out too.
        let mut p = plan(&ing, None);
        p.leave_out_hosts(
            "shop",
            &HostChecks {
                left_out: BTreeMap::new(),
                claimed: Some(BTreeSet::from(["api.shop.example".to_owned()])),
            },
        );
        assert_eq!(p.hosts(), BTreeSet::from(["api.shop.example"]));
    }

    #[test]
    fn a_host_keeps_its_route_for_the_entry_left_when_the_first_is_someone_elses() {
        // web.shop.example is in a TLS entry naming another team's Secret first, then in one
        // of its own: the route was the first entry's, and went with it.
        let mut ing = ingress(true, false);
        let spec = ing.spec.as_mut().unwrap();
        spec.tls.as_mut().unwrap().push(
            serde_json::from_value(
                serde_json::json!({"hosts": ["web.shop.example"], "secretName": "own-tls"}),
            )
            .unwrap(),
        );
        let mut p = plan(&ing, None);
        assert_eq!(p.routes.len(), 1);
        assert_eq!(p.routes[0].secret_name, "web-tls");
        p.leave_out(
            "shop",
            &SecretChecks {
                left_out: BTreeMap::from([("web-tls".to_owned(), SecretStanding::Foreign)]),
                checked: None,
            },
        );
        assert_eq!(p.secret_names(), ["own-tls"]);
        assert_eq!(p.routes.len(), 1, "{p:?}");
        assert_eq!(p.routes[0].secret_name, "own-tls");
        assert!(!route_patch(&p).is_empty());
    }

    #[test]
    fn a_host_keeps_its_route_when_its_first_secret_is_over_the_name_limit() {
        // big-tls gathers 30 names from two entries (over shortlived's 25) and is left out;
        // web.shop.example is also in own-tls. Its route pointed at big-tls, a Secret the plan
        // no longer has: a solver route and Service for no certificate, and no Pod selected.
        let mut ing = ingress(true, false);
        let many = |from: usize, to: usize| -> Vec<String> {
            (from..to).map(|i| format!("h{i}.shop.example")).collect()
        };
        let mut first = many(0, 19);
        first.push("web.shop.example".into());
        let tls = ing.spec.as_mut().unwrap().tls.as_mut().unwrap();
        *tls = vec![
            serde_json::from_value(serde_json::json!({"hosts": first, "secretName": "big-tls"})).unwrap(),
            serde_json::from_value(serde_json::json!({"hosts": many(19, 29), "secretName": "big-tls"}))
                .unwrap(),
            serde_json::from_value(
                serde_json::json!({"hosts": ["web.shop.example"], "secretName": "own-tls"}),
            )
            .unwrap(),
        ];
        let p = plan(&ing, Some("shortlived"));
        assert_eq!(p.secret_names(), ["own-tls"], "{p:?}");
        assert_eq!(p.routes.len(), 1, "{p:?}");
        assert_eq!(p.routes[0].secret_name, "own-tls");
        // With the default profile both fit, and the first entry keeps the route.
        let p = plan(&ing, None);
        assert_eq!(p.routes[0].secret_name, "big-tls");
    }

    #[test]
    fn a_foreign_secret_gets_no_route_no_temporary_secret_and_a_warning() {
        let mut ing = ingress(true, false);
        let spec = ing.spec.as_mut().unwrap();
        spec.tls.as_mut().unwrap().push(
            serde_json::from_value(
                serde_json::json!({"hosts": ["api.shop.example"], "secretName": "api-tls"}),
            )
            .unwrap(),
        );
        spec.rules.as_mut().unwrap().push(
            serde_json::from_value(serde_json::json!({"host": "api.shop.example", "http": {"paths": [
                {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "api", "port": {"number": 80}}}}
            ]}}))
            .unwrap(),
        );
        let mut p = plan(&ing, None);
        assert_eq!((p.secrets.len(), p.routes.len()), (2, 2));
        p.leave_out(
            "shop",
            &SecretChecks {
                left_out: BTreeMap::from([
                    ("web-tls".to_owned(), SecretStanding::Foreign),
                    ("other-tls".to_owned(), SecretStanding::Unknown),
                ]),
                checked: None,
            },
        );
        assert_eq!(p.secret_names(), ["api-tls"]);
        assert_eq!(p.routes.len(), 1);
        assert_eq!(p.routes[0].host, "api.shop.example");
        assert!(
            p.warnings
                .iter()
                .any(|w| w.contains("Secret shop/web-tls exists and is not sidecert's")),
            "{:?}",
            p.warnings
        );
        let effects = effects(&ing, "shop", &p);
        assert!(
            !effects
                .iter()
                .any(|e| matches!(e, Effect::TemporarySecret { name, .. } if name == "web-tls")),
            "{effects:?}"
        );
        // An owner not known in time: left out too (it may be someone else's), said so.
        p.leave_out(
            "shop",
            &SecretChecks {
                left_out: BTreeMap::from([("api-tls".to_owned(), SecretStanding::Unknown)]),
                checked: None,
            },
        );
        assert!(p.secrets.is_empty() && p.routes.is_empty(), "{p:?}");
        assert!(
            p.warnings
                .iter()
                .any(|w| w.contains("cannot tell in time whose Secret shop/api-tls is")),
            "{:?}",
            p.warnings
        );
    }
}
