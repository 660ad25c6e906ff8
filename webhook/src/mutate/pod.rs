//! The Pod decision (CREATE only): the sidecar container, the status annotations, the
//! temporary Secrets and RBAC it needs, and when the caches' answer must be re-checked live.
//!
//! [`decide_pod`] is the whole decision as the server makes it: [`mutate_pod`] over the
//! watch caches, plus a [`Recheck`] when a cached Service selects the Pod but no cached
//! Ingress does. The server then lists the namespace ([`crate::kube::live`]) and calls
//! [`mutate_pod`] again over those fresh objects; the live answer wins.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::{AdmissionRequest, Operation};
use serde_json::{Value, json};
use sidecert_contract::{
    CertificateSpec, SIDECAR_CONTAINER_NAME, STATUS_INJECTED, account_secret_name, annotations,
    encode_certificates, lease_name, max_names_per_order, validate_secret_name,
};

use crate::mutate::{
    container::{container, sidecar_config},
    context::{Context, SecretStanding},
    effect::Effect,
    outcome::{Outcome, SkipReason, add, to_json},
    select::{MAX_CERTIFICATES_PER_POD, Recheck, recheck, select},
};

/// Whether `url` is an `http://` or `https://` URL on the Pod's own loopback: the sidecar
/// calls it after each new certificate, so anything else would let a Pod's author make the
/// sidecar send requests elsewhere in the cluster.
pub fn is_loopback_url(url: &str) -> bool {
    let Some(rest) = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
    else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return false;
    }
    let host = match authority.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((h, port)) if port.is_empty() || port.starts_with(':') => h,
            _ => return false,
        },
        None => authority.split(':').next().unwrap_or_default(),
    };
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Whether a Pod already carries the sidecar (status annotation or a `sidecert` container).
pub fn is_injected(pod: &Pod) -> bool {
    let status = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(annotations::STATUS))
        .is_some_and(|s| s == STATUS_INJECTED);
    let has_container = pod.spec.as_ref().is_some_and(|s| {
        s.containers
            .iter()
            .chain(s.init_containers.iter().flatten())
            .any(|c| c.name == SIDECAR_CONTAINER_NAME)
    });
    status || has_container
}

/// Mutates a Pod on CREATE: adds the sidecar when the Pod is selected (see
/// [`crate::mutate::select::select`]); asks for its temporary Secrets and RBAC.
pub fn mutate_pod(req: &AdmissionRequest<Pod>, ctx: &Context) -> Outcome {
    if req.operation != Operation::Create {
        return Outcome::skip(SkipReason::Operation);
    }
    let Some(pod) = req.object.as_ref() else {
        return Outcome::skip(SkipReason::NoObject);
    };
    mutate_pod_in(pod, pod_namespace(req), ctx)
}

/// A Pod decision made over the watch caches.
#[derive(Debug, Clone)]
pub struct PodDecision {
    /// The answer of the caches.
    pub outcome: Outcome,
    /// `Some` when the caches may have missed an Ingress that selects this Pod: decide again
    /// over live objects.
    pub recheck: Option<Recheck>,
}

/// The Pod decision: [`mutate_pod`], and whether a live look must confirm a "not selected"
/// (see [`crate::mutate::select::recheck`]).
pub fn decide_pod(req: &AdmissionRequest<Pod>, ctx: &Context) -> PodDecision {
    let outcome = mutate_pod(req, ctx);
    let unselected = matches!(
        outcome.skipped,
        Some(SkipReason::NotSelected | SkipReason::InvalidAnnotations)
    );
    let recheck = match req.object.as_ref() {
        Some(pod) if unselected => {
            let no_labels = BTreeMap::new();
            let labels = pod.metadata.labels.as_ref().unwrap_or(&no_labels);
            recheck(pod_namespace(req), labels, ctx.lookup.as_ref())
        }
        _ => None,
    };
    PodDecision { outcome, recheck }
}

/// The namespace a Pod is created in: the review's, else the object's, else `default`.
pub fn pod_namespace(req: &AdmissionRequest<Pod>) -> &str {
    req.namespace
        .as_deref()
        .or(req.object.as_ref().and_then(|p| p.metadata.namespace.as_deref()))
        .unwrap_or("default")
}

/// The mutation of a Pod (or a pod template) in `namespace`; shared with `inject`.
pub fn mutate_pod_in(pod: &Pod, namespace: &str, ctx: &Context) -> Outcome {
    let empty = BTreeMap::new();
    let pod_annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    match pod_annotations.get(annotations::INJECT).map(|v| v.trim()) {
        Some(v) if v.eq_ignore_ascii_case("false") => return Outcome::skip(SkipReason::OptedOut),
        Some(v) if !v.eq_ignore_ascii_case("true") => {
            return Outcome::skip(SkipReason::InvalidAnnotations).warn(format!(
                "sidecert: not injected: {} must be \"true\" or \"false\", not {v:?}",
                annotations::INJECT
            ));
        }
        _ => {}
    }
    let marked = pod_annotations
        .get(annotations::STATUS)
        .is_some_and(|s| s == STATUS_INJECTED);
    if marked {
        return Outcome::skip(SkipReason::AlreadyInjected);
    }
    // A container of the sidecar's name without the status annotation: the author's own
    // (or a look-alike); said below if the Pod is selected.
    let named = is_injected(pod);
    let Some(spec) = pod.spec.as_ref() else {
        return Outcome::skip(SkipReason::NoObject);
    };
    let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
    let selection = select(
        namespace,
        labels,
        pod_annotations,
        ctx.lookup.as_ref(),
        ctx.acme.profile.as_deref(),
        &ctx.secrets,
        &ctx.hosts,
    );
    if selection.certificates.is_empty() {
        let reason = if selection.invalid {
            SkipReason::InvalidAnnotations
        } else if selection.hosts_left_out {
            SkipReason::HostNotOwned
        } else {
            SkipReason::NotSelected
        };
        return Outcome::skip_with(reason, selection.warnings);
    }

    if named {
        return Outcome::skip_with(SkipReason::AlreadyInjected, selection.warnings).warn(format!(
            "sidecert: not injected: a container is already named {SIDECAR_CONTAINER_NAME:?}; \
             rename it for sidecert to add its sidecar"
        ));
    }
    let reload_url = pod_annotations
        .get(annotations::RELOAD_URL)
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty());
    if let Some(url) = reload_url.as_deref().filter(|u| !is_loopback_url(u)) {
        return Outcome::skip_with(SkipReason::InvalidAnnotations, selection.warnings).warn(format!(
            "sidecert: not injected: {} must be an http:// or https:// URL on the Pod itself \
             (127.0.0.1, [::1] or localhost), not {url:?}",
            annotations::RELOAD_URL
        ));
    }
    if let Some(server) = selection
        .overrides
        .acme_server
        .as_deref()
        .filter(|s| !ctx.acme.allows_server(s))
    {
        return Outcome::skip_with(SkipReason::InvalidAnnotations, selection.warnings).warn(format!(
            "sidecert: not injected: {} {server:?} is not an ACME server this cluster allows \
             (Let's Encrypt, {}, or the webhook's --allowed-acme-servers)",
            annotations::ACME_SERVER,
            ctx.acme.server
        ));
    }
    let mut out = Outcome {
        warnings: selection.warnings,
        secret_candidates: selection.candidates,
        ..Outcome::default()
    };
    // The profile decides how many names one order may hold (25 for tlsserver and
    // shortlived): a certificate over it is left unconfigured, the others go on.
    let profile = selection
        .overrides
        .acme_profile
        .as_deref()
        .or(ctx.acme.profile.as_deref());
    let limit = max_names_per_order(profile);
    let (certificates, foreign): (Vec<_>, Vec<_>) = selection
        .certificates
        .into_iter()
        .partition(|c| ctx.secrets.standing(&c.secret_name).is_none());
    for cert in &foreign {
        if let Some(standing) = ctx.secrets.standing(&cert.secret_name) {
            out.warnings.push(standing.warning(namespace, &cert.secret_name));
        }
    }
    let (mut certificates, too_many): (Vec<_>, Vec<_>) =
        certificates.into_iter().partition(|c| c.domains.len() <= limit);
    if certificates.len() > MAX_CERTIFICATES_PER_POD {
        out.warnings.push(format!(
            "sidecert: {} certificates select this Pod, more than one sidecar holds \
             ({MAX_CERTIFICATES_PER_POD}); the first {MAX_CERTIFICATES_PER_POD} by Secret name \
             are configured",
            certificates.len()
        ));
        // Asked about with the others: a decision made again without one that is left out
        // takes the next.
        let cut = certificates.split_off(MAX_CERTIFICATES_PER_POD);
        out.secret_candidates
            .extend(cut.into_iter().map(|c| c.secret_name));
    }
    for cert in &too_many {
        out.warnings.push(format!(
            "sidecert: Secret {} would hold {} names, more than the ACME profile {} accepts in \
             one order ({limit}); no certificate is issued for it",
            cert.secret_name,
            cert.domains.len(),
            profile.unwrap_or("(the CA's default)"),
        ));
    }
    if certificates.is_empty() {
        let standing = |c: &CertificateSpec| ctx.secrets.standing(&c.secret_name);
        out.skipped = Some(
            if foreign
                .iter()
                .any(|c| standing(c) == Some(SecretStanding::Foreign))
            {
                SkipReason::ForeignSecret
            } else if !foreign.is_empty() {
                SkipReason::SecretOwnerUnknown
            } else {
                SkipReason::TooManyNames
            },
        );
        return out;
    }
    let config = sidecar_config(
        certificates.clone(),
        &ctx.acme,
        &selection.overrides,
        reload_url,
        &mut out.warnings,
    );
    // Every sidecar of the namespace with this server and e-mail shares the account Secret,
    // and its Role may write it: never one that is someone else's, or may be.
    let account = account_secret_name(&config.acme_server, config.acme_email.as_deref());
    if let Some(standing) = ctx.secrets.standing(&account) {
        let reason = match standing {
            SecretStanding::Foreign => SkipReason::ForeignSecret,
            SecretStanding::Unknown => SkipReason::SecretOwnerUnknown,
        };
        return Outcome::skip_with(reason, out.warnings).warn(account_warning(standing, namespace, &account));
    }
    let sidecar = to_json(&container(&ctx.sidecar, &config));

    // The sidecar first among the init containers, so that it runs alongside the others.
    out.patch.push(match &spec.init_containers {
        Some(_) => add(["spec", "initContainers", "0"], sidecar),
        None => add(["spec", "initContainers"], Value::Array(vec![sidecar])),
    });
    let encoded = encode_certificates(&certificates);
    if pod.metadata.annotations.is_none() {
        out.patch.push(add(
            ["metadata", "annotations"],
            json!({ annotations::STATUS: STATUS_INJECTED, annotations::CERTIFICATES: encoded }),
        ));
    } else {
        out.patch.push(add(
            ["metadata", "annotations", annotations::STATUS],
            Value::String(STATUS_INJECTED.to_owned()),
        ));
        out.patch.push(add(
            ["metadata", "annotations", annotations::CERTIFICATES],
            Value::String(encoded),
        ));
    }
    if spec.automount_service_account_token == Some(false) {
        out.warnings.push(
            "sidecert: automountServiceAccountToken is false; the sidecar cannot reach the API server \
             to store its certificate"
                .to_owned(),
        );
    }

    for cert in &certificates {
        out.effects.push(Effect::TemporarySecret {
            namespace: namespace.to_owned(),
            name: cert.secret_name.clone(),
            domains: cert.domains.clone(),
        });
    }
    let service_account = spec
        .service_account_name
        .as_deref()
        .or(spec.service_account.as_deref())
        .filter(|s| !s.is_empty())
        .unwrap_or("default");
    // The API server refuses such a Pod later; its name must not reach a Role or a URL.
    if validate_secret_name(service_account).is_err() {
        return Outcome::skip(SkipReason::InvalidAnnotations).warn(format!(
            "sidecert: not injected: serviceAccountName {service_account:?} is not a valid name"
        ));
    }
    out.effects.push(Effect::Rbac {
        namespace: namespace.to_owned(),
        service_account: service_account.to_owned(),
        certificates: certificates.iter().map(|c| c.secret_name.clone()).collect(),
        account,
        // The sidecar reads the external-account-binding Secret when one is configured.
        eab: config.eab_secret.clone(),
        leases: certificates.iter().map(|c| lease_name(&c.secret_name)).collect(),
    });
    out
}

/// Why a Pod is not injected when its ACME account Secret may not be used.
fn account_warning(standing: SecretStanding, namespace: &str, name: &str) -> String {
    match standing {
        SecretStanding::Foreign => format!(
            "sidecert: not injected: Secret {namespace}/{name}, where sidecert keeps this \
             namespace's ACME account for this server and e-mail, exists and is not sidecert's; \
             delete or rename it, or use another {} for this workload",
            annotations::ACME_EMAIL
        ),
        SecretStanding::Unknown => format!(
            "sidecert: not injected: cannot tell in time whose Secret {namespace}/{name} (this \
             namespace's ACME account) is; the next admission decides again"
        ),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::Arc;

    use k8s_openapi::api::core::v1::Service;
    use kube::core::admission::AdmissionReview;
    use serde_json::json;

    use super::*;
    use crate::mutate::{
        container::{AcmeDefaults, SidecarSettings},
        lookup::Snapshot,
    };

    fn request(annotations: serde_json::Value) -> AdmissionRequest<Pod> {
        let review: AdmissionReview<Pod> = serde_json::from_value(json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "u-1", "operation": "CREATE", "namespace": "shop", "userInfo": {},
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "object": {"apiVersion": "v1", "kind": "Pod",
                           "metadata": {"labels": {"app": "web"}, "annotations": annotations},
                           "spec": {"containers": [{"name": "app", "image": "example/app"}]}}
            }
        }))
        .unwrap();
        review.try_into().unwrap()
    }

    fn context(services: Vec<Service>) -> Context {
        Context {
            sidecar: SidecarSettings::default(),
            acme: AcmeDefaults::default(),
            lookup: Arc::new(Snapshot {
                ingresses: Vec::new(),
                services: services.into_iter().map(Arc::new).collect(),
                ..Snapshot::default()
            }),
            secrets: Default::default(),
            hosts: Default::default(),
        }
    }

    #[test]
    fn a_cached_service_without_a_cached_ingress_asks_for_a_live_recheck() {
        let web: Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"selector": {"app": "web"}}
        }))
        .unwrap();
        let d = decide_pod(&request(json!({})), &context(vec![web.clone()]));
        assert_eq!(d.outcome.skipped, Some(SkipReason::NotSelected));
        assert_eq!(
            d.recheck,
            Some(Recheck {
                namespace: "shop".into(),
                known: BTreeMap::new()
            })
        );
        // No Service selects the Pod: no Ingress can, nothing to re-check.
        assert!(
            decide_pod(&request(json!({})), &context(Vec::new()))
                .recheck
                .is_none()
        );
        // Opted out, or selected by its own annotations: the caches' answer stands.
        let out = decide_pod(
            &request(json!({"sidecert.io/inject": "false"})),
            &context(vec![web.clone()]),
        );
        assert_eq!(out.outcome.skipped, Some(SkipReason::OptedOut));
        assert!(out.recheck.is_none());
        let own = decide_pod(
            &request(
                json!({"sidecert.io/inject": "true", "sidecert.io/domains": "web.shop.example",
                            "sidecert.io/secret-name": "web-tls"}),
            ),
            &context(vec![web]),
        );
        assert!(!own.outcome.patch.is_empty());
        assert!(own.recheck.is_none());
    }

    #[test]
    fn one_sidecar_holds_a_bounded_number_of_certificates() {
        // 80 annotated Ingresses route to the Service web: each would add a certificate,
        // an owner look-up, a Lease and a key to one Pod's review, without end.
        let web: Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"selector": {"app": "web"}}
        }))
        .unwrap();
        let ingresses = (0..80)
            .map(|i| {
                let host = format!("h{i:02}.shop.example");
                serde_json::from_value(json!({
                    "metadata": {"name": format!("i{i:02}"), "namespace": "shop",
                        "annotations": {"sidecert.io/issue-temporary-certificate": "true"}},
                    "spec": {"tls": [{"hosts": [host], "secretName": format!("s{i:02}")}],
                        "rules": [{"host": host, "http": {"paths": [{"path": "/", "pathType": "Prefix",
                            "backend": {"service": {"name": "web", "port": {"number": 80}}}}]}}]}
                }))
                .map(Arc::new)
                .unwrap()
            })
            .collect();
        // The first ten by name are other teams': the cap counts only what may be used
        // (it came first, and Secrets sorting first could push every usable one out).
        let ctx = Context {
            lookup: Arc::new(Snapshot {
                ingresses,
                services: vec![Arc::new(web)],
                ..Snapshot::default()
            }),
            secrets: crate::mutate::context::SecretChecks {
                left_out: (0..10)
                    .map(|i| (format!("s{i:02}"), SecretStanding::Foreign))
                    .collect(),
                checked: None,
            },
            ..context(Vec::new())
        };
        let out = mutate_pod(&request(json!({})), &ctx);
        let rbac = out.effects.iter().find_map(|e| match e {
            Effect::Rbac { certificates, .. } => Some(certificates.clone()),
            _ => None,
        });
        let certificates = rbac.expect("injected");
        assert_eq!(certificates.len(), MAX_CERTIFICATES_PER_POD);
        assert_eq!(certificates.first().map(String::as_str), Some("s10"));
        assert!(
            out.warnings
                .iter()
                .any(|w| w.contains("70 certificates select this Pod")),
            "{:?}",
            out.warnings
        );
    }

    #[test]
    fn a_secret_the_api_server_was_not_asked_about_gets_no_right() {
        use crate::mutate::context::SecretChecks;
        let annotated = request(json!({"sidecert.io/inject": "true",
            "sidecert.io/domains": "web.shop.example", "sidecert.io/secret-name": "web-tls"}));
        // The reviewer asked about another name (a second decision found this one): left out.
        let ctx = context(vec![]).with_secret_checks(SecretChecks {
            left_out: BTreeMap::new(),
            checked: Some(["api-tls".to_owned()].into()),
        });
        let out = mutate_pod(&annotated, &ctx);
        assert!(out.patch.is_empty() && out.effects.is_empty(), "{out:?}");
        assert_eq!(out.skipped, Some(SkipReason::SecretOwnerUnknown));
        assert!(
            out.warnings
                .iter()
                .any(|w| w.contains("cannot tell in time whose Secret shop/web-tls is")),
            "{:?}",
            out.warnings
        );
        // Asked about and absent, with the account Secret: configured.
        let account = account_secret_name(sidecert_contract::LETSENCRYPT, None);
        let ctx = context(vec![]).with_secret_checks(SecretChecks {
            left_out: BTreeMap::new(),
            checked: Some(["web-tls".to_owned(), account].into()),
        });
        assert!(!mutate_pod(&annotated, &ctx).patch.is_empty());
    }

    #[test]
    fn an_account_secret_that_is_not_sidecerts_stops_the_injection() {
        use crate::mutate::context::SecretChecks;
        let annotated = request(json!({"sidecert.io/inject": "true",
            "sidecert.io/domains": "web.shop.example", "sidecert.io/secret-name": "web-tls",
            "sidecert.io/acme-email": "ops@shop.example"}));
        let account = account_secret_name(sidecert_contract::LETSENCRYPT, Some("ops@shop.example"));
        for (standing, reason, says) in [
            (
                SecretStanding::Foreign,
                SkipReason::ForeignSecret,
                "exists and is not sidecert's",
            ),
            (
                SecretStanding::Unknown,
                SkipReason::SecretOwnerUnknown,
                "cannot tell in time",
            ),
        ] {
            let ctx = context(vec![]).with_secret_checks(SecretChecks {
                left_out: BTreeMap::from([(account.clone(), standing)]),
                checked: Some(["web-tls".to_owned(), account.clone()].into()),
            });
            let out = mutate_pod(&annotated, &ctx);
            assert!(out.patch.is_empty() && out.effects.is_empty(), "{out:?}");
            assert_eq!(out.skipped, Some(reason));
            assert!(
                out.warnings
                    .iter()
                    .any(|w| w.contains(&format!("shop/{account}")) && w.contains(says)),
                "{:?}",
                out.warnings
            );
        }
        // Not asked about (a second decision found another e-mail): unknown, left out.
        let ctx = context(vec![]).with_secret_checks(SecretChecks {
            left_out: BTreeMap::new(),
            checked: Some(["web-tls".to_owned()].into()),
        });
        assert_eq!(
            mutate_pod(&annotated, &ctx).skipped,
            Some(SkipReason::SecretOwnerUnknown)
        );
        // The Role names it with the certificate; the EAB Secret, when configured, apart.
        let out = mutate_pod(&annotated, &context(vec![]));
        assert!(out.effects.iter().any(|e| matches!(e,
            Effect::Rbac { certificates, account: a, eab: None, .. }
                if certificates == &["web-tls"] && a == &account)));
    }

    #[test]
    fn a_certificate_may_not_name_an_account_secret() {
        let out = mutate_pod(
            &request(json!({"sidecert.io/inject": "true",
                "sidecert.io/domains": "web.shop.example",
                "sidecert.io/secret-name": account_secret_name(sidecert_contract::LETSENCRYPT, None)})),
            &context(vec![]),
        );
        assert!(out.patch.is_empty() && out.effects.is_empty(), "{out:?}");
        assert_eq!(out.skipped, Some(SkipReason::InvalidAnnotations));
        assert!(
            out.warnings.iter().any(|w| w.contains("is reserved")),
            "{:?}",
            out.warnings
        );
    }

    #[test]
    fn reload_urls_must_stay_on_the_pod() {
        for ok in [
            "http://127.0.0.1:8080/reload",
            "https://localhost/-/reload",
            "http://[::1]:9000/",
            "http://127.0.0.2",
        ] {
            assert!(is_loopback_url(ok), "{ok}");
        }
        for bad in [
            "http://10.0.0.1/reload",
            "http://kubernetes.default.svc/api",
            "http://127.0.0.1@evil.example/",
            "http://localhost.evil.example/",
            "ftp://127.0.0.1/",
            "127.0.0.1:8080",
            "http://[::1",
            "http://[::1]evil/",
            "",
        ] {
            assert!(!is_loopback_url(bad), "{bad}");
        }
    }

    fn warned(out: &Outcome, text: &str) -> bool {
        out.patch.is_empty() && out.warnings.iter().any(|w| w.contains(text))
    }

    #[test]
    fn bad_annotations_get_a_warning_and_no_sidecar() {
        let ctx = context(vec![]);
        let direct = |extra: serde_json::Value| {
            let mut a = json!({"sidecert.io/inject": "true", "sidecert.io/domains": "a.shop.example",
                               "sidecert.io/secret-name": "a-tls"});
            a.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            a
        };
        // An inject value that is neither true nor false (it was silently ignored).
        let out = mutate_pod(&request(direct(json!({"sidecert.io/inject": "yes"}))), &ctx);
        assert!(warned(&out, "must be \"true\" or \"false\""), "{out:?}");
        assert_eq!(out.skipped, Some(SkipReason::InvalidAnnotations));
        // A reload URL off the Pod (the sidecar would call it).
        let out = mutate_pod(
            &request(direct(json!({"sidecert.io/reload-url": "http://10.0.0.9/hook"}))),
            &ctx,
        );
        assert!(warned(&out, "on the Pod itself"), "{out:?}");
        // More names than a CA takes in one order.
        let many: Vec<String> = (0..101).map(|i| format!("h{i}.shop.example")).collect();
        let out = mutate_pod(
            &request(direct(json!({"sidecert.io/domains": many.join(",")}))),
            &ctx,
        );
        assert!(warned(&out, "more than an ACME CA accepts"), "{out:?}");
        // tlsserver and shortlived take 25 names in one order (classic takes 100).
        let some: Vec<String> = (0..26).map(|i| format!("h{i}.shop.example")).collect();
        for profile in ["shortlived", "tlsserver"] {
            let out = mutate_pod(
                &request(direct(json!({"sidecert.io/domains": some.join(","),
                                       "sidecert.io/acme-profile": profile}))),
                &ctx,
            );
            assert!(warned(&out, "more than the ACME profile"), "{profile}: {out:?}");
            assert!(out.effects.is_empty(), "{profile}: {out:?}");
        }
        let mut short_default = context(vec![]);
        short_default.acme.profile = Some("shortlived".into());
        let out = mutate_pod(
            &request(direct(json!({"sidecert.io/domains": some.join(",")}))),
            &short_default,
        );
        assert!(warned(&out, "more than the ACME profile"), "{out:?}");
        let out = mutate_pod(
            &request(direct(json!({"sidecert.io/domains": some.join(","),
                                   "sidecert.io/acme-profile": "classic"}))),
            &ctx,
        );
        assert!(!out.patch.is_empty(), "classic takes 26 names: {out:?}");
        // A container of the sidecar's name that sidecert did not add (it was silently
        // taken for an injected Pod).
        let mut req = request(direct(json!({})));
        let pod = req.object.as_mut().unwrap();
        pod.spec.as_mut().unwrap().containers[0].name = SIDECAR_CONTAINER_NAME.to_owned();
        let out = mutate_pod(&req, &ctx);
        assert!(warned(&out, "already named"), "{out:?}");
        // An ACME server outside the allowed list (a tenant's own CA).
        let out = mutate_pod(
            &request(direct(
                json!({"sidecert.io/acme-server": "https://ca.evil.example/dir"}),
            )),
            &ctx,
        );
        assert!(
            warned(&out, "is not an ACME server this cluster allows"),
            "{out:?}"
        );
        let mut allowing = context(vec![]);
        allowing.acme.allowed_servers = vec!["https://ca.evil.example/dir".into()];
        let out = mutate_pod(
            &request(direct(
                json!({"sidecert.io/acme-server": "https://ca.evil.example/dir"}),
            )),
            &allowing,
        );
        assert!(
            !out.patch.is_empty(),
            "allowed by --allowed-acme-servers: {out:?}"
        );
        for name in ["letsencrypt-staging", "letsencrypt"] {
            let out = mutate_pod(&request(direct(json!({"sidecert.io/acme-server": name}))), &ctx);
            assert!(!out.patch.is_empty(), "{name}: {out:?}");
        }
        // A ServiceAccount name that is no name (it would reach a Role and a URL path).
        let mut req = request(direct(json!({})));
        req.object
            .as_mut()
            .unwrap()
            .spec
            .as_mut()
            .unwrap()
            .service_account_name = Some("default/../../x".into());
        let out = mutate_pod(&req, &ctx);
        assert!(warned(&out, "serviceAccountName"), "{out:?}");
        assert!(out.effects.is_empty(), "{out:?}");
        // The same Pod, well formed, is injected; a loopback reload URL is fine.
        let out = mutate_pod(
            &request(direct(
                json!({"sidecert.io/reload-url": "http://127.0.0.1:8080/-/reload"}),
            )),
            &ctx,
        );
        assert!(!out.patch.is_empty() && out.warnings.is_empty(), "{out:?}");
    }
}
