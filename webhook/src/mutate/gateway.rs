//! The Gateway API decision: what sidecert reads from an annotated `Gateway` or
//! `ListenerSet` and the HTTPRoutes attached to it, decided without any API call.
//!
//! - Every listener with protocol HTTPS, TLS mode Terminate, a hostname that is not a
//!   wildcard and a `certificateRefs` entry naming a Secret in the same namespace is a
//!   certificate ([`GatewayPlan::secrets`]).
//! - The HTTPRoutes of that namespace attached to such a listener say which Service serves
//!   the hostname ([`GatewayPlan::routes`]): its Pods get the sidecar, and the solver Service
//!   selects them.
//! - sidecert's own HTTPRoute per backend ([`solver_route`]) attaches with `sectionName` to
//!   an HTTP listener (of the ListenerSet, else of its parent Gateway; of the Gateway itself)
//!   whose `allowedRoutes` admit it, and routes `/.well-known/acme-challenge/` of exactly the
//!   hostnames of that backend to the solver Service.
//! - Every reason a listener cannot be served is a [`Finding`], an Event on the object.
//!
//! The plan is also expressed as an Ingress ([`as_ingress`]): the selection of Pods
//! ([`crate::mutate::select`]) and the claim sweeps read Gateways through it, so the Pod
//! decision is the one Ingresses get. Nothing here trusts the objects' shape: they arrive as
//! [`DynamicObject`]s, and what does not parse is a finding, never a panic.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::{
    api::networking::v1::{
        HTTPIngressPath, HTTPIngressRuleValue, Ingress, IngressBackend, IngressRule, IngressServiceBackend,
        IngressSpec, IngressTLS, ServiceBackendPort,
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde::Deserialize;
use serde_json::{Value, json};
use sidecert_contract::{
    ACME_CHALLENGE_PATH, MANAGED_BY, MANAGED_BY_LABEL, SOLVER_SERVICE_SUFFIX, annotations, bounded_name,
    validate_certificate_secret_name, validate_domain, validate_service_name,
};

use crate::mutate::objects::solver_service_name;

/// The Gateway API group.
pub const GROUP: &str = "gateway.networking.k8s.io";
/// The version sidecert reads and writes (standard channel, v1.5 and later for ListenerSet).
pub const VERSION: &str = "v1";
/// Listeners of one object that sidecert reads (the CRDs allow 64).
pub const MAX_LISTENERS: usize = 64;
/// HTTPRoutes that one plan reads, and parentRefs, hostnames, rules and backendRefs of one.
pub const MAX_ROUTES: usize = 1000;
const MAX_ITEMS: usize = 64;

/// The port of the solver Service (see [`crate::mutate::objects`]).
const SOLVER_PORT: u16 = 80;

/// The two kinds that carry listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ParentKind {
    Gateway,
    ListenerSet,
}

impl ParentKind {
    pub const ALL: [Self; 2] = [Self::Gateway, Self::ListenerSet];

    pub fn kind(self) -> &'static str {
        match self {
            Self::Gateway => "Gateway",
            Self::ListenerSet => "ListenerSet",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Self::Gateway => "gw",
            Self::ListenerSet => "ls",
        }
    }

    pub fn api_resource(self) -> ApiResource {
        api_resource(self.kind())
    }
}

/// The [`ApiResource`] of a Gateway API kind (`Gateway`, `ListenerSet`, `HTTPRoute`).
pub fn api_resource(kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(GROUP, VERSION, kind))
}

/// The HTTPRoute kind's [`ApiResource`].
pub fn http_route_resource() -> ApiResource {
    api_resource("HTTPRoute")
}

// The parts of the specs sidecert reads. Unknown fields are ignored; a field of the wrong
// type makes the whole object unreadable (a finding), never a panic.

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct ParentSpec {
    listeners: Vec<Listener>,
    allowed_listeners: Option<AllowedListeners>,
    parent_ref: Option<ObjectRefSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Listener {
    name: String,
    hostname: Option<String>,
    protocol: String,
    tls: Option<ListenerTls>,
    allowed_routes: Option<AllowedRoutes>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct ListenerTls {
    mode: Option<String>,
    certificate_refs: Vec<ObjectRefSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct AllowedRoutes {
    namespaces: Option<FromNamespaces>,
    kinds: Vec<ObjectRefSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct AllowedListeners {
    namespaces: Option<FromNamespaces>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct FromNamespaces {
    from: Option<String>,
    selector: Option<Selector>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Selector {
    match_labels: BTreeMap<String, String>,
    match_expressions: Vec<Value>,
}

/// A reference as the Gateway API writes them (certificateRefs, parentRef(s), backendRefs,
/// allowedRoutes kinds).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct ObjectRefSpec {
    group: Option<String>,
    kind: Option<String>,
    name: String,
    namespace: Option<String>,
    section_name: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct RouteSpec {
    parent_refs: Vec<ObjectRefSpec>,
    hostnames: Vec<String>,
    rules: Vec<RouteRule>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct RouteRule {
    backend_refs: Vec<ObjectRefSpec>,
}

/// An object with listeners, as sidecert reads it.
#[derive(Debug, Clone)]
pub struct Parent {
    pub kind: ParentKind,
    pub namespace: String,
    pub name: String,
    pub meta: ObjectMeta,
    spec: ParentSpec,
}

impl Parent {
    /// Reads a Gateway or ListenerSet; `Err` says why it cannot be read.
    pub fn read(kind: ParentKind, obj: &DynamicObject) -> Result<Self, String> {
        let name = obj.metadata.name.clone().unwrap_or_default();
        let spec = match obj.data.get("spec") {
            None => ParentSpec::default(),
            Some(v) => serde_json::from_value::<ParentSpec>(v.clone())
                .map_err(|e| format!("{} {name} cannot be read: {e}", kind.kind()))?,
        };
        Ok(Self {
            kind,
            namespace: obj.metadata.namespace.clone().unwrap_or_default(),
            name,
            meta: obj.metadata.clone(),
            spec,
        })
    }

    pub fn is_annotated(&self) -> bool {
        self.meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(annotations::ISSUE_TEMPORARY_CERTIFICATE))
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
    }

    /// `Gateway/web` or `ListenerSet/web`: how warnings and Events name it.
    pub fn display(&self) -> String {
        format!("{}/{}", self.kind.kind(), self.name)
    }

    /// The owner reference its solver routes and Services carry (none before it has a uid).
    pub fn owner_reference(&self) -> Option<OwnerReference> {
        Some(OwnerReference {
            api_version: format!("{GROUP}/{VERSION}"),
            kind: self.kind.kind().to_owned(),
            name: self.name.clone(),
            uid: self.meta.uid.clone().filter(|u| !u.is_empty())?,
            controller: Some(false),
            block_owner_deletion: Some(false),
        })
    }

    /// What its Events are about.
    pub fn object_reference(&self) -> ObjectReference {
        ObjectReference {
            api_version: Some(format!("{GROUP}/{VERSION}")),
            kind: Some(self.kind.kind().to_owned()),
            name: Some(self.name.clone()),
            namespace: Some(self.namespace.clone()),
            uid: self.meta.uid.clone(),
            resource_version: self.meta.resource_version.clone(),
            ..ObjectReference::default()
        }
    }

    /// The Gateway a ListenerSet attaches to, as (namespace, name).
    pub fn parent_gateway(&self) -> Option<(String, String)> {
        let r = self.spec.parent_ref.as_ref()?;
        let group_ok = r.group.as_deref().is_none_or(|g| g == GROUP);
        let kind_ok = r.kind.as_deref().is_none_or(|k| k == "Gateway");
        (self.kind == ParentKind::ListenerSet && group_ok && kind_ok && !r.name.is_empty()).then(|| {
            (
                r.namespace.clone().unwrap_or_else(|| self.namespace.clone()),
                r.name.clone(),
            )
        })
    }

    fn listeners(&self) -> &[Listener] {
        self.spec
            .listeners
            .get(..MAX_LISTENERS)
            .unwrap_or(&self.spec.listeners)
    }
}

/// An HTTPRoute, as sidecert reads it.
#[derive(Debug, Clone)]
pub struct Route {
    pub namespace: String,
    pub name: String,
    pub meta: ObjectMeta,
    spec: RouteSpec,
    /// `status.parents`, as sent.
    parents_status: Vec<Value>,
}

impl Route {
    pub fn read(obj: &DynamicObject) -> Result<Self, String> {
        let name = obj.metadata.name.clone().unwrap_or_default();
        let spec = match obj.data.get("spec") {
            None => RouteSpec::default(),
            Some(v) => serde_json::from_value::<RouteSpec>(v.clone())
                .map_err(|e| format!("HTTPRoute {name} cannot be read: {e}"))?,
        };
        let parents_status = obj
            .data
            .pointer("/status/parents")
            .and_then(Value::as_array)
            .map(|a| a.iter().take(MAX_ITEMS).cloned().collect())
            .unwrap_or_default();
        Ok(Self {
            namespace: obj.metadata.namespace.clone().unwrap_or_default(),
            name,
            meta: obj.metadata.clone(),
            spec,
            parents_status,
        })
    }

    /// Whether sidecert made it (its label and the solver suffix).
    pub fn is_sidecerts(&self) -> bool {
        is_solver_route(&self.meta)
    }

    /// The `sectionName`s (`None`: the whole object) of this route's parentRefs to `parent`.
    fn sections_of(&self, parent: &Parent) -> Vec<Option<&str>> {
        self.spec
            .parent_refs
            .iter()
            .take(MAX_ITEMS)
            .filter(|r| {
                r.group.as_deref().is_none_or(|g| g == GROUP)
                    && r.kind.as_deref().unwrap_or("Gateway") == parent.kind.kind()
                    && r.namespace.as_deref().unwrap_or(&self.namespace) == parent.namespace
                    && r.name == parent.name
            })
            .map(|r| r.section_name.as_deref())
            .collect()
    }

    /// Whether the route serves `host` (its hostnames intersect it; none: every host).
    fn serves(&self, host: &str) -> bool {
        let names = self
            .spec
            .hostnames
            .get(..MAX_ITEMS)
            .unwrap_or(&self.spec.hostnames);
        names.is_empty()
            || names
                .iter()
                .any(|h| hostname_matches(&h.to_ascii_lowercase(), host))
    }

    /// The first Service backend of its rules: (namespace, name).
    fn backend(&self) -> Option<(String, String)> {
        self.spec
            .rules
            .iter()
            .take(MAX_ITEMS)
            .flat_map(|r| r.backend_refs.iter().take(MAX_ITEMS))
            .find(|b| {
                b.group.as_deref().unwrap_or("").is_empty()
                    && b.kind.as_deref().unwrap_or("Service") == "Service"
            })
            .map(|b| {
                (
                    b.namespace.clone().unwrap_or_else(|| self.namespace.clone()),
                    b.name.clone(),
                )
            })
    }

    /// Why the route is not Accepted by a parent (`status.parents[].conditions`), if it is not.
    pub fn not_accepted(&self) -> Option<String> {
        for parent in &self.parents_status {
            let conditions = parent.get("conditions").and_then(Value::as_array);
            for c in conditions.into_iter().flatten().take(MAX_ITEMS) {
                if c.get("type").and_then(Value::as_str) == Some("Accepted")
                    && c.get("status").and_then(Value::as_str) == Some("False")
                {
                    let text = |k| {
                        c.get(k)
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .chars()
                            .take(200)
                            .collect::<String>()
                    };
                    let section = parent
                        .pointer("/parentRef/sectionName")
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    return Some(format!(
                        "listener {section:?}: {} ({})",
                        text("reason"),
                        text("message")
                    ));
                }
            }
        }
        None
    }
}

/// Whether an object is one of sidecert's solver HTTPRoutes.
pub fn is_solver_route(meta: &ObjectMeta) -> bool {
    meta.labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .is_some_and(|v| v == MANAGED_BY)
        && meta
            .name
            .as_deref()
            .is_some_and(|n| n.ends_with(SOLVER_SERVICE_SUFFIX))
}

/// Whether a listener or route hostname (`*.example.com` or exact) matches `host`.
fn hostname_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .strip_suffix(suffix)
            .and_then(|h| h.strip_suffix('.'))
            .is_some_and(|label| !label.is_empty()),
        None => pattern == host,
    }
}

/// A reason sidecert cannot serve (part of) a listener: a warning Event on the object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Finding {
    /// The Event reason (`NoHTTPListener`, `CrossNamespaceCertificate`, ...).
    pub reason: &'static str,
    pub message: String,
}

/// A certificate of the plan: a Secret and the hostnames of the listeners that name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    pub secret_name: String,
    /// Sorted, deduplicated.
    pub domains: Vec<String>,
}

/// A hostname and the Service that serves it on an HTTPS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub host: String,
    pub secret_name: String,
    pub backend: String,
    /// The HTTPRoute that says so.
    pub route: String,
}

/// Where sidecert's solver routes attach: one HTTP listener.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Attachment {
    pub kind: ParentKind,
    pub namespace: String,
    pub name: String,
    pub section: String,
    /// The listener's hostname (`None`: every host).
    pub hostname: Option<String>,
}

/// What sidecert reads from an annotated Gateway or ListenerSet and its routes.
#[derive(Debug, Clone, Default)]
pub struct GatewayPlan {
    pub secrets: Vec<Certificate>,
    pub served: Vec<Served>,
    /// HTTP listeners that admit a solver route from the object's namespace, in order.
    pub attachments: Vec<Attachment>,
    pub findings: Vec<Finding>,
}

/// What the caller knows around a parent: the Gateway a ListenerSet attaches to, and the
/// labels of the namespaces involved (for `Selector` rules).
pub struct Surroundings<'a> {
    pub gateway: Option<&'a Parent>,
    pub namespace_labels: &'a dyn Fn(&str) -> Option<BTreeMap<String, String>>,
}

/// Whether a `from`/`selector` rule admits `ns` for an object in `owner_ns`; `default` is
/// the rule's default (`Same` for routes, `None` for ListenerSets). `Err` for a rule sidecert
/// cannot evaluate (matchExpressions).
fn admits(
    rule: Option<&FromNamespaces>,
    default: &str,
    owner_ns: &str,
    ns: &str,
    labels: &dyn Fn(&str) -> Option<BTreeMap<String, String>>,
) -> Result<bool, String> {
    let from = rule.and_then(|r| r.from.as_deref()).unwrap_or(default);
    match from {
        "All" => Ok(true),
        "Same" => Ok(owner_ns == ns),
        "None" => Ok(false),
        "Selector" => {
            let Some(sel) = rule.and_then(|r| r.selector.as_ref()) else {
                return Ok(false);
            };
            if !sel.match_expressions.is_empty() {
                return Err("a namespace selector with matchExpressions".to_owned());
            }
            let have = labels(ns).unwrap_or_default();
            Ok(sel.match_labels.iter().all(|(k, v)| have.get(k) == Some(v)))
        }
        other => Err(format!("namespaces.from {other:?}")),
    }
}

fn admits_http_route(allowed: Option<&AllowedRoutes>) -> bool {
    let kinds = allowed.map(|a| a.kinds.as_slice()).unwrap_or_default();
    kinds.is_empty()
        || kinds.iter().any(|k| {
            k.group.as_deref().unwrap_or(GROUP) == GROUP
                && k.kind.as_deref().unwrap_or(&k.name) == "HTTPRoute"
        })
}

fn is_protocol(listener: &Listener, protocol: &str) -> bool {
    listener.protocol.eq_ignore_ascii_case(protocol)
}

/// Reads an annotated Gateway or ListenerSet and the HTTPRoutes of the cluster (those
/// attached to it count; the others are ignored).
pub fn plan(parent: &Parent, routes: &[Route], around: &Surroundings) -> GatewayPlan {
    let mut plan = GatewayPlan::default();
    let what = parent.display();
    let find = |plan: &mut GatewayPlan, reason: &'static str, message: String| {
        let f = Finding {
            reason,
            message: format!("sidecert: {what}: {message}"),
        };
        if !plan.findings.contains(&f) {
            plan.findings.push(f);
        }
    };
    if parent.spec.listeners.len() > MAX_LISTENERS {
        find(
            &mut plan,
            "TooManyListeners",
            format!("sidecert reads the first {MAX_LISTENERS} listeners"),
        );
    }

    // The certificates: HTTPS, Terminate, a hostname, a Secret of this namespace.
    // listener name -> (hostname, secret)
    let mut https: Vec<(&str, String, String)> = Vec::new();
    for l in parent.listeners() {
        if !is_protocol(l, "HTTPS") {
            continue;
        }
        let name = l.name.as_str();
        let mode = l
            .tls
            .as_ref()
            .and_then(|t| t.mode.as_deref())
            .unwrap_or("Terminate");
        if mode != "Terminate" {
            find(
                &mut plan,
                "ListenerNotTerminated",
                format!("listener {name:?} has TLS mode {mode}; only Terminate listeners get a certificate"),
            );
            continue;
        }
        let Some(host) = l.hostname.as_deref().map(|h| h.trim().to_ascii_lowercase()) else {
            find(
                &mut plan,
                "ListenerWithoutHostname",
                format!("listener {name:?} has no hostname; HTTP-01 needs one name per listener"),
            );
            continue;
        };
        if host.starts_with("*.") {
            find(
                &mut plan,
                "WildcardHostname",
                format!(
                    "listener {name:?}: wildcard hostname {host} cannot be validated with HTTP-01; left alone"
                ),
            );
            continue;
        }
        if let Err(e) = validate_domain(&host) {
            find(&mut plan, "InvalidHostname", format!("listener {name:?}: {e}"));
            continue;
        }
        let refs = l
            .tls
            .as_ref()
            .map(|t| t.certificate_refs.as_slice())
            .unwrap_or_default();
        let Some(cert) = refs.first() else {
            find(
                &mut plan,
                "NoCertificateRef",
                format!("listener {name:?} ({host}) has no certificateRefs; no certificate is issued for it"),
            );
            continue;
        };
        let core = cert.group.as_deref().unwrap_or("").is_empty();
        if !core || cert.kind.as_deref().unwrap_or("Secret") != "Secret" {
            find(
                &mut plan,
                "CertificateRefNotSecret",
                format!("listener {name:?} ({host}): certificateRefs[0] is not a core Secret; left alone"),
            );
            continue;
        }
        if let Some(other) = cert.namespace.as_deref().filter(|n| *n != parent.namespace) {
            find(
                &mut plan,
                "CrossNamespaceCertificate",
                format!(
                    "listener {name:?} ({host}) names Secret {other}/{}: sidecert writes certificates only in \
                     the listener's own namespace ({}); a cross-namespace certificateRef (with its \
                     ReferenceGrant) is not supported. Use a ListenerSet in the Secret's namespace",
                    cert.name, parent.namespace
                ),
            );
            continue;
        }
        if let Err(e) = validate_certificate_secret_name(&cert.name) {
            find(
                &mut plan,
                "InvalidSecretName",
                format!("listener {name:?} ({host}): {e}"),
            );
            continue;
        }
        https.push((name, host.clone(), cert.name.clone()));
        match plan.secrets.iter_mut().find(|s| s.secret_name == cert.name) {
            Some(s) => s.domains.push(host),
            None => plan.secrets.push(Certificate {
                secret_name: cert.name.clone(),
                domains: vec![host],
            }),
        }
    }
    for s in &mut plan.secrets {
        s.domains.sort();
        s.domains.dedup();
    }
    if https.is_empty() {
        return plan;
    }

    // A ListenerSet must be allowed on its Gateway.
    let gateway = match parent.parent_gateway() {
        Some((gw_ns, gw_name)) if parent.kind == ParentKind::ListenerSet => {
            match around
                .gateway
                .filter(|g| g.namespace == gw_ns && g.name == gw_name)
            {
                None => {
                    find(
                        &mut plan,
                        "ParentGatewayNotFound",
                        format!("its parent Gateway {gw_ns}/{gw_name} does not exist"),
                    );
                    None
                }
                Some(gw) => {
                    let rule = gw
                        .spec
                        .allowed_listeners
                        .as_ref()
                        .and_then(|a| a.namespaces.as_ref());
                    match admits(
                        rule,
                        "None",
                        &gw.namespace,
                        &parent.namespace,
                        around.namespace_labels,
                    ) {
                        Ok(true) => {}
                        Ok(false) => find(
                            &mut plan,
                            "ListenerSetNotAllowed",
                            format!(
                                "Gateway {gw_ns}/{gw_name}'s allowedListeners do not admit ListenerSets from \
                                 namespace {}; its listeners are not served",
                                parent.namespace
                            ),
                        ),
                        Err(e) => find(
                            &mut plan,
                            "ListenerSetNotAllowed",
                            format!(
                                "Gateway {gw_ns}/{gw_name}'s allowedListeners use {e}, which sidecert does not \
                                 evaluate; check that they admit namespace {}",
                                parent.namespace
                            ),
                        ),
                    }
                    Some(gw)
                }
            }
        }
        _ if parent.kind == ParentKind::ListenerSet => {
            find(
                &mut plan,
                "ParentGatewayNotFound",
                "its parentRef names no Gateway".to_owned(),
            );
            None
        }
        _ => None,
    };

    // Where the solver routes attach: HTTP listeners of the object, then of its Gateway.
    let mut http_seen = false;
    let mut refused = Vec::new();
    let owners = std::iter::once(parent).chain(gateway);
    for owner in owners {
        for l in owner.listeners().iter().filter(|l| is_protocol(l, "HTTP")) {
            http_seen = true;
            let rule = l.allowed_routes.as_ref().and_then(|a| a.namespaces.as_ref());
            let admitted = admits(
                rule,
                "Same",
                &owner.namespace,
                &parent.namespace,
                around.namespace_labels,
            );
            let ok = matches!(admitted, Ok(true)) && admits_http_route(l.allowed_routes.as_ref());
            if !ok {
                refused.push(format!("{}/{} {:?}", owner.display(), owner.namespace, l.name));
                continue;
            }
            plan.attachments.push(Attachment {
                kind: owner.kind,
                namespace: owner.namespace.clone(),
                name: owner.name.clone(),
                section: l.name.clone(),
                hostname: l.hostname.as_deref().map(|h| h.trim().to_ascii_lowercase()),
            });
        }
    }
    if !http_seen {
        find(
            &mut plan,
            "NoHTTPListener",
            "it has no HTTP listener (nor has its Gateway) for the HTTP-01 challenges; add one on the port \
             the ACME CA reaches (80)"
                .to_owned(),
        );
    } else if plan.attachments.is_empty() {
        find(
            &mut plan,
            "SolverRouteNotAllowed",
            format!(
                "no HTTP listener admits an HTTPRoute from namespace {} (allowedRoutes of {}); the HTTP-01 \
                 challenges cannot be routed",
                parent.namespace,
                refused.join(", ")
            ),
        );
    }
    for (_, host, _) in &https {
        let reachable = plan
            .attachments
            .iter()
            .any(|a| a.hostname.as_deref().is_none_or(|h| hostname_matches(h, host)));
        if !plan.attachments.is_empty() && !reachable {
            find(
                &mut plan,
                "SolverRouteNotAllowed",
                format!(
                    "no admitting HTTP listener's hostname matches {host}; its HTTP-01 challenge cannot be routed"
                ),
            );
        }
    }

    // Which Service serves each hostname: the HTTPRoutes attached to its listener.
    // Those attached to this object, in a fixed order, then capped (whatever else the
    // namespace holds).
    let mut routes: Vec<&Route> = routes
        .iter()
        .filter(|r| !r.is_sidecerts() && !r.sections_of(parent).is_empty())
        .collect();
    routes.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    if routes.len() > MAX_ROUTES {
        find(
            &mut plan,
            "TooManyRoutes",
            format!(
                "{} HTTPRoutes attach to it; sidecert reads the first {MAX_ROUTES} by name",
                routes.len()
            ),
        );
        routes.truncate(MAX_ROUTES);
    }
    for (listener, host, secret) in &https {
        for route in &routes {
            let sections = route.sections_of(parent);
            let attached = sections.iter().any(|s| s.is_none_or(|s| s == *listener));
            if !attached || !route.serves(host) {
                continue;
            }
            let Some((backend_ns, backend)) = route.backend() else {
                continue;
            };
            if route.namespace != parent.namespace || backend_ns != parent.namespace {
                find(
                    &mut plan,
                    "BackendInOtherNamespace",
                    format!(
                        "HTTPRoute {}/{} sends {host} to Service {backend_ns}/{backend}: the sidecar writes \
                         the certificate only in its own namespace, so its Pods must be in {}",
                        route.namespace, route.name, parent.namespace
                    ),
                );
                continue;
            }
            if validate_service_name(&backend).is_err() {
                find(
                    &mut plan,
                    "InvalidBackend",
                    format!(
                        "HTTPRoute {}: backend {backend:?} is not a valid Service name",
                        route.name
                    ),
                );
                continue;
            }
            plan.served.push(Served {
                host: host.clone(),
                secret_name: secret.clone(),
                backend,
                route: route.name.clone(),
            });
            break;
        }
    }
    plan
}

impl GatewayPlan {
    /// The plan as an Ingress: one TLS entry per certificate, one rule per served host to its
    /// Service, the parent's annotations and uid. [`crate::mutate::ingress::plan`] reads the
    /// same certificates and routes from it.
    pub fn as_ingress(&self, parent: &Parent) -> Ingress {
        let tls = self
            .secrets
            .iter()
            .map(|s| IngressTLS {
                hosts: Some(s.domains.clone()),
                secret_name: Some(s.secret_name.clone()),
            })
            .collect();
        let rules = self
            .served
            .iter()
            .map(|s| IngressRule {
                host: Some(s.host.clone()),
                http: Some(HTTPIngressRuleValue {
                    paths: vec![HTTPIngressPath {
                        path: Some("/".to_owned()),
                        path_type: "Prefix".to_owned(),
                        backend: IngressBackend {
                            service: Some(IngressServiceBackend {
                                name: s.backend.clone(),
                                port: Some(ServiceBackendPort {
                                    number: Some(80),
                                    name: None,
                                }),
                            }),
                            resource: None,
                        },
                    }],
                }),
            })
            .collect();
        Ingress {
            metadata: ObjectMeta {
                name: Some(parent.display()),
                namespace: Some(parent.namespace.clone()),
                uid: parent.meta.uid.clone(),
                generation: parent.meta.generation,
                resource_version: parent.meta.resource_version.clone(),
                creation_timestamp: parent.meta.creation_timestamp.clone(),
                annotations: parent.meta.annotations.clone(),
                ..ObjectMeta::default()
            },
            spec: Some(IngressSpec {
                tls: Some(tls),
                rules: Some(rules),
                ..IngressSpec::default()
            }),
            status: None,
        }
    }

    /// The backends of the served hosts and their hosts, for the solver routes.
    pub fn backends(&self) -> BTreeMap<&str, BTreeSet<&str>> {
        let mut out: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for s in &self.served {
            out.entry(s.backend.as_str()).or_default().insert(s.host.as_str());
        }
        out
    }
}

/// The name of sidecert's HTTPRoute for one backend of one Gateway or ListenerSet:
/// `gw.<gateway>.<backend>-sidecert-solver` (`ls.` for a ListenerSet), at most 63 characters
/// (a long one ends in a hash of the whole). Distinct parents or backends never share one: a
/// backend (a Service, a DNS label) has no dot, so the last dot ends the parent's name.
pub fn solver_route_name(parent: &Parent, backend: &str) -> String {
    let keep = 63 - SOLVER_SERVICE_SUFFIX.len();
    let base = format!("{}.{}.{backend}", parent.kind.short(), parent.name);
    format!("{}{SOLVER_SERVICE_SUFFIX}", bounded_name(&base, keep))
}

/// sidecert's HTTPRoute for `backend`'s `hosts`: attached by `sectionName` to every HTTP
/// listener of `attachments` whose hostname matches one of them, routing
/// `/.well-known/acme-challenge/` to the backend's solver Service. `None` when no listener
/// fits.
pub fn solver_route(
    parent: &Parent,
    plan: &GatewayPlan,
    backend: &str,
    hosts: &BTreeSet<&str>,
) -> Option<Value> {
    let mut parent_refs: Vec<Value> = Vec::new();
    for a in &plan.attachments {
        let fits = hosts
            .iter()
            .any(|h| a.hostname.as_deref().is_none_or(|p| hostname_matches(p, h)));
        if !fits {
            continue;
        }
        let mut r = serde_json::Map::new();
        r.insert("group".into(), json!(GROUP));
        r.insert("kind".into(), json!(a.kind.kind()));
        r.insert("name".into(), json!(a.name));
        if a.namespace != parent.namespace {
            r.insert("namespace".into(), json!(a.namespace));
        }
        r.insert("sectionName".into(), json!(a.section));
        let r = Value::Object(r);
        if !parent_refs.contains(&r) {
            parent_refs.push(r);
        }
    }
    // The Gateway API allows 32 parentRefs.
    parent_refs.truncate(32);
    if parent_refs.is_empty() {
        return None;
    }
    let mut metadata = json!({
        "name": solver_route_name(parent, backend),
        "namespace": parent.namespace,
        "labels": { MANAGED_BY_LABEL: MANAGED_BY },
    });
    if let (Some(owner), Some(m)) = (parent.owner_reference(), metadata.as_object_mut()) {
        m.insert("ownerReferences".into(), json!([owner]));
    }
    Some(json!({
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "kind": "HTTPRoute",
        "metadata": metadata,
        "spec": {
            "parentRefs": parent_refs,
            "hostnames": hosts.iter().take(16).collect::<Vec<_>>(),
            "rules": [{
                "matches": [{ "path": { "type": "PathPrefix", "value": ACME_CHALLENGE_PATH } }],
                "backendRefs": [{ "name": solver_service_name(backend), "port": SOLVER_PORT }],
            }],
        },
    }))
}

/// Whether `have` holds everything `want` holds: objects may have more keys (the API
/// server's defaults: a backendRef's `group`, `kind` and `weight`), arrays hold as many
/// items, each holding its counterpart.
fn holds(have: &Value, want: &Value) -> bool {
    match (have, want) {
        (Value::Object(h), Value::Object(w)) => {
            w.iter().all(|(k, v)| h.get(k).is_some_and(|hv| holds(hv, v)))
        }
        (Value::Array(h), Value::Array(w)) => h.len() == w.len() && h.iter().zip(w).all(|(a, b)| holds(a, b)),
        (h, w) => h == w,
    }
}

/// Whether an existing solver route already holds what `want` holds (spec, labels, owner).
pub fn route_current(existing: &DynamicObject, want: &Value) -> bool {
    existing
        .data
        .get("spec")
        .zip(want.get("spec"))
        .is_some_and(|(have, want)| holds(have, want))
        && existing
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(MANAGED_BY_LABEL))
            .is_some_and(|v| v == MANAGED_BY)
        && want
            .pointer("/metadata/ownerReferences/0/uid")
            .and_then(Value::as_str)
            .is_none_or(|uid| {
                existing
                    .metadata
                    .owner_references
                    .iter()
                    .flatten()
                    .any(|o| o.uid == uid)
            })
}

/// Whether a solver route belongs to the object of `uid` (its owner).
pub fn owned_by(meta: &ObjectMeta, uid: &str) -> bool {
    meta.owner_references.iter().flatten().any(|o| o.uid == uid)
}

/// The kind of a parent from an object's `kind`, if it is one.
pub fn parent_kind_of(obj: &DynamicObject) -> Option<ParentKind> {
    let kind = obj.types.as_ref().map(|t| t.kind.as_str())?;
    ParentKind::ALL.into_iter().find(|k| k.kind() == kind)
}

/// The Gateway API objects of the cluster as the caches hold them (empty without the CRDs).
#[derive(Debug, Clone, Default)]
pub struct GatewayObjects {
    pub gateways: Vec<std::sync::Arc<DynamicObject>>,
    pub listener_sets: Vec<std::sync::Arc<DynamicObject>>,
    pub routes: Vec<std::sync::Arc<DynamicObject>>,
}

impl GatewayObjects {
    pub fn is_empty(&self) -> bool {
        self.gateways.is_empty() && self.listener_sets.is_empty()
    }

    /// The readable Gateways and ListenerSets of `ns` (`None`: every namespace), and why the
    /// others cannot be read.
    pub fn parents(&self, ns: Option<&str>) -> (Vec<Parent>, Vec<(ParentKind, ObjectMeta, String)>) {
        let mut read = Vec::new();
        let mut unreadable = Vec::new();
        let all = [
            (ParentKind::Gateway, &self.gateways),
            (ParentKind::ListenerSet, &self.listener_sets),
        ];
        for (kind, objects) in all {
            for obj in objects.iter() {
                if ns.is_some_and(|ns| obj.metadata.namespace.as_deref() != Some(ns)) {
                    continue;
                }
                match Parent::read(kind, obj) {
                    Ok(p) => read.push(p),
                    Err(e) => unreadable.push((kind, obj.metadata.clone(), e)),
                }
            }
        }
        (read, unreadable)
    }

    /// One Gateway.
    pub fn gateway(&self, ns: &str, name: &str) -> Option<Parent> {
        self.gateways
            .iter()
            .find(|g| g.metadata.namespace.as_deref() == Some(ns) && g.metadata.name.as_deref() == Some(name))
            .and_then(|g| Parent::read(ParentKind::Gateway, g).ok())
    }

    /// The readable HTTPRoutes.
    pub fn routes(&self) -> Vec<Route> {
        self.routes.iter().filter_map(|r| Route::read(r).ok()).collect()
    }

    /// The plan of one parent.
    pub fn plan_of(
        &self,
        parent: &Parent,
        routes: &[Route],
        namespace_labels: &dyn Fn(&str) -> Option<BTreeMap<String, String>>,
    ) -> GatewayPlan {
        let gateway = parent
            .parent_gateway()
            .and_then(|(ns, name)| self.gateway(&ns, &name));
        plan(
            parent,
            routes,
            &Surroundings {
                gateway: gateway.as_ref(),
                namespace_labels,
            },
        )
    }

    /// The annotated Gateways and ListenerSets of `ns` as Ingresses ([`GatewayPlan::as_ingress`]).
    pub fn ingresses(&self, ns: &str) -> Vec<Ingress> {
        let (parents, _) = self.parents(Some(ns));
        let annotated: Vec<&Parent> = parents.iter().filter(|p| p.is_annotated()).collect();
        if annotated.is_empty() {
            return Vec::new();
        }
        let routes: Vec<Route> = self
            .routes
            .iter()
            .filter(|r| r.metadata.namespace.as_deref() == Some(ns))
            .filter_map(|r| Route::read(r).ok())
            .collect();
        // The resourceVersion tells a stale cache from the API server (see
        // `crate::mutate::select::Recheck`): the parent's, and a hash of its namespace's routes.
        let mut names: Vec<(&str, &str)> = routes
            .iter()
            .map(|r| {
                (
                    r.name.as_str(),
                    r.meta.resource_version.as_deref().unwrap_or_default(),
                )
            })
            .collect();
        names.sort_unstable();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(&names, &mut h);
        let routes_version = std::hash::Hasher::finish(&h);
        let no_labels = |_: &str| None;
        annotated
            .into_iter()
            .map(|p| {
                let mut ing = self.plan_of(p, &routes, &no_labels).as_ingress(p);
                ing.metadata.resource_version = Some(format!(
                    "{}/{routes_version:016x}",
                    p.meta.resource_version.as_deref().unwrap_or_default()
                ));
                ing
            })
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn obj(kind: &str, ns: &str, name: &str, spec: Value) -> DynamicObject {
        let mut o = DynamicObject::new(name, &api_resource(kind)).within(ns);
        o.metadata.uid = Some(format!("uid-{name}"));
        o.metadata.annotations = Some(BTreeMap::from([(
            annotations::ISSUE_TEMPORARY_CERTIFICATE.to_owned(),
            "true".to_owned(),
        )]));
        o.data = json!({ "spec": spec });
        o
    }

    fn https(name: &str, host: &str, secret: Value) -> Value {
        json!({"name": name, "protocol": "HTTPS", "port": 443, "hostname": host,
               "tls": {"mode": "Terminate", "certificateRefs": [secret]}})
    }

    fn http(name: &str, allowed: Value) -> Value {
        json!({"name": name, "protocol": "HTTP", "port": 80, "allowedRoutes": allowed})
    }

    fn route(ns: &str, name: &str, parent: Value, hosts: Value, backend: Value) -> Route {
        Route::read(&obj(
            "HTTPRoute",
            ns,
            name,
            json!({"parentRefs": [parent], "hostnames": hosts, "rules": [{"backendRefs": [backend]}]}),
        ))
        .unwrap()
    }

    fn no_labels(_: &str) -> Option<BTreeMap<String, String>> {
        None
    }

    fn plan_of(parent: &Parent, routes: &[Route], gateway: Option<&Parent>) -> GatewayPlan {
        plan(
            parent,
            routes,
            &Surroundings {
                gateway,
                namespace_labels: &no_labels,
            },
        )
    }

    fn reasons(plan: &GatewayPlan) -> Vec<&'static str> {
        plan.findings.iter().map(|f| f.reason).collect()
    }

    fn gateway(listeners: Value) -> Parent {
        Parent::read(
            ParentKind::Gateway,
            &obj(
                "Gateway",
                "shop",
                "web",
                json!({"gatewayClassName": "traefik", "listeners": listeners}),
            ),
        )
        .unwrap()
    }

    #[test]
    fn a_gateway_with_http_and_https_listeners_is_served() {
        let gw = gateway(json!([
            http("http", json!({})),
            https("https", "Shop.Example", json!({"name": "shop-tls"}))
        ]));
        let routes = [route(
            "shop",
            "app",
            json!({"name": "web", "sectionName": "https"}),
            json!(["shop.example"]),
            json!({"name": "app", "port": 8080}),
        )];
        let plan = plan_of(&gw, &routes, None);
        assert!(plan.findings.is_empty(), "{:?}", plan.findings);
        assert_eq!(
            plan.secrets,
            [Certificate {
                secret_name: "shop-tls".into(),
                domains: vec!["shop.example".into()]
            }]
        );
        assert_eq!(plan.served.len(), 1);
        assert_eq!(plan.served[0].backend, "app");
        let hosts = BTreeSet::from(["shop.example"]);
        let r = solver_route(&gw, &plan, "app", &hosts).unwrap();
        assert_eq!(r["metadata"]["name"], "gw.web.app-sidecert-solver");
        assert_eq!(
            r["spec"]["parentRefs"],
            json!([{"group": GROUP, "kind": "Gateway", "name": "web", "sectionName": "http"}])
        );
        assert_eq!(r["spec"]["hostnames"], json!(["shop.example"]));
        assert_eq!(
            r["spec"]["rules"][0]["backendRefs"],
            json!([{"name": "app-sidecert-solver", "port": 80}])
        );
        assert_eq!(r["metadata"]["ownerReferences"][0]["kind"], "Gateway");
        assert_eq!(r["metadata"]["labels"][MANAGED_BY_LABEL], MANAGED_BY);

        // The same, as an Ingress: the Ingress plan reads the same certificate and route.
        let ing = crate::mutate::ingress::plan(&plan.as_ingress(&gw), None);
        assert_eq!(ing.secrets[0].secret_name, "shop-tls");
        assert_eq!(ing.routes[0].backend, "app");
        assert_eq!(ing.routes[0].host, "shop.example");
    }

    #[test]
    fn every_listener_sidecert_cannot_serve_is_a_finding() {
        let gw = gateway(json!([
            https("other-ns", "a.example", json!({"name": "tls", "namespace": "certs"})),
            https("wild", "*.example", json!({"name": "w"})),
            {"name": "nohost", "protocol": "HTTPS", "tls": {"certificateRefs": [{"name": "x"}]}},
            {"name": "pass", "protocol": "HTTPS", "hostname": "p.example", "tls": {"mode": "Passthrough"}},
            {"name": "noref", "protocol": "HTTPS", "hostname": "n.example"},
            https("cm", "c.example", json!({"kind": "ConfigMap", "name": "c"})),
            https("ok", "ok.example", json!({"name": "ok-tls"})),
        ]));
        let plan = plan_of(&gw, &[], None);
        assert_eq!(
            reasons(&plan),
            [
                "CrossNamespaceCertificate",
                "WildcardHostname",
                "ListenerWithoutHostname",
                "ListenerNotTerminated",
                "NoCertificateRef",
                "CertificateRefNotSecret",
                "NoHTTPListener"
            ]
        );
        assert_eq!(plan.secrets.len(), 1);
    }

    #[test]
    fn solver_routes_attach_only_where_allowed() {
        let none = gateway(json!([
            http("http", json!({"namespaces": {"from": "None"}})),
            https("https", "a.example", json!({"name": "a"}))
        ]));
        assert_eq!(reasons(&plan_of(&none, &[], None)), ["SolverRouteNotAllowed"]);
        let kinds = gateway(json!([
            http("http", json!({"kinds": [{"kind": "GRPCRoute"}]})),
            https("https", "a.example", json!({"name": "a"}))
        ]));
        assert_eq!(reasons(&plan_of(&kinds, &[], None)), ["SolverRouteNotAllowed"]);
        let host = gateway(json!([
            {"name": "http", "protocol": "HTTP", "hostname": "b.example"},
            https("https", "a.example", json!({"name": "a"}))
        ]));
        assert_eq!(reasons(&plan_of(&host, &[], None)), ["SolverRouteNotAllowed"]);
    }

    #[test]
    fn a_listener_set_attaches_through_its_gateway() {
        let shared = Parent::read(
            ParentKind::Gateway,
            &obj(
                "Gateway",
                "infra",
                "shared",
                json!({"listeners": [http("http", json!({"namespaces": {"from": "All"}}))],
                       "allowedListeners": {"namespaces": {"from": "All"}}}),
            ),
        )
        .unwrap();
        let ls = Parent::read(
            ParentKind::ListenerSet,
            &obj(
                "ListenerSet",
                "shop",
                "web",
                json!({"parentRef": {"name": "shared", "namespace": "infra"},
                       "listeners": [https("https", "shop.example", json!({"name": "shop-tls"}))]}),
            ),
        )
        .unwrap();
        let routes = [
            route(
                "shop",
                "app",
                json!({"kind": "ListenerSet", "name": "web"}),
                json!([]),
                json!({"name": "app", "port": 80}),
            ),
            // Attached to the Gateway, not the ListenerSet: not this plan's.
            route(
                "shop",
                "x",
                json!({"name": "web"}),
                json!([]),
                json!({"name": "x"}),
            ),
        ];
        let plan = plan_of(&ls, &routes, Some(&shared));
        assert!(plan.findings.is_empty(), "{:?}", plan.findings);
        assert_eq!(plan.served.len(), 1);
        let r = solver_route(&ls, &plan, "app", &BTreeSet::from(["shop.example"])).unwrap();
        assert_eq!(
            r["spec"]["parentRefs"],
            json!([{"group": GROUP, "kind": "Gateway", "name": "shared", "namespace": "infra", "sectionName": "http"}])
        );
        assert_eq!(r["metadata"]["name"], "ls.web.app-sidecert-solver");

        // The Gateway admits no ListenerSets (the default), or is not there.
        let strict = Parent::read(
            ParentKind::Gateway,
            &obj(
                "Gateway",
                "infra",
                "shared",
                json!({"listeners": [http("http", json!({}))]}),
            ),
        )
        .unwrap();
        let plan = plan_of(&ls, &routes, Some(&strict));
        assert_eq!(reasons(&plan), ["ListenerSetNotAllowed", "SolverRouteNotAllowed"]);
        assert_eq!(
            reasons(&plan_of(&ls, &routes, None)),
            ["ParentGatewayNotFound", "NoHTTPListener"]
        );
    }

    #[test]
    fn backends_in_another_namespace_are_refused() {
        let gw = gateway(json!([
            http("http", json!({})),
            https("https", "a.example", json!({"name": "a"}))
        ]));
        let routes = [
            route(
                "shop",
                "r",
                json!({"name": "web"}),
                json!([]),
                json!({"name": "app", "namespace": "other"}),
            ),
            route(
                "other",
                "s",
                json!({"name": "web", "namespace": "shop"}),
                json!([]),
                json!({"name": "app"}),
            ),
        ];
        let plan = plan_of(&gw, &routes, None);
        assert_eq!(
            reasons(&plan),
            ["BackendInOtherNamespace", "BackendInOtherNamespace"]
        );
        assert!(plan.served.is_empty());
    }

    #[test]
    fn hostile_objects_are_findings_or_ignored_never_a_panic() {
        // Wrong types: unreadable, with a reason.
        for spec in [
            json!({"listeners": "x"}),
            json!({"listeners": [{"name": 1}]}),
            json!([1, 2]),
        ] {
            assert!(Parent::read(ParentKind::Gateway, &obj("Gateway", "shop", "g", spec)).is_err());
        }
        assert!(Route::read(&obj("HTTPRoute", "shop", "r", json!({"rules": {"a": 1}}))).is_err());
        // Far too many listeners: the first 64 are read.
        let many: Vec<Value> = (0..500)
            .map(|i| {
                https(
                    &format!("l{i}"),
                    &format!("h{i}.example"),
                    json!({"name": format!("s{i}")}),
                )
            })
            .collect();
        let plan = plan_of(&gateway(json!(many)), &[], None);
        assert_eq!(plan.secrets.len(), MAX_LISTENERS);
        assert!(reasons(&plan).contains(&"TooManyListeners"));
        // Hostnames and names that are not names.
        let gw = gateway(json!([
            https("a", "bad host", json!({"name": "x"})),
            https("b", "b.example", json!({"name": "Bad/Name"})),
            https("c", &"é".repeat(300), json!({"name": "x"})),
        ]));
        let r = reasons(&plan_of(&gw, &[], None));
        assert_eq!(r, ["InvalidHostname", "InvalidSecretName", "InvalidHostname"]);
        // A status that is not what the API says.
        let mut o = obj("HTTPRoute", "shop", "r", json!({}));
        o.data["status"] =
            json!({"parents": [{"conditions": [{"type": "Accepted", "status": "False", "reason": 7}]}, 3]});
        assert!(Route::read(&o).unwrap().not_accepted().is_some());
    }

    #[test]
    fn a_route_with_the_api_servers_defaults_is_current() {
        let gw = gateway(json!([
            http("http", json!({})),
            https("https", "a.example", json!({"name": "a"}))
        ]));
        let routes = [route(
            "shop",
            "r",
            json!({"name": "web"}),
            json!([]),
            json!({"name": "app"}),
        )];
        let plan = plan_of(&gw, &routes, None);
        let want = solver_route(&gw, &plan, "app", &BTreeSet::from(["a.example"])).unwrap();
        let mut stored: DynamicObject = serde_json::from_value(want.clone()).unwrap();
        stored.data["spec"]["rules"][0]["backendRefs"][0]["group"] = json!("");
        stored.data["spec"]["rules"][0]["backendRefs"][0]["kind"] = json!("Service");
        stored.data["spec"]["rules"][0]["backendRefs"][0]["weight"] = json!(1);
        assert!(route_current(&stored, &want));
        stored.data["spec"]["hostnames"] = json!(["b.example"]);
        assert!(!route_current(&stored, &want));
        stored.data["spec"]["hostnames"] = json!(["a.example", "b.example"]);
        assert!(!route_current(&stored, &want));
    }

    #[test]
    fn long_names_stay_names() {
        let long = "a".repeat(253);
        let gw = Parent::read(ParentKind::Gateway, &obj("Gateway", "shop", &long, json!({}))).unwrap();
        let name = solver_route_name(&gw, &"b".repeat(63));
        assert!(
            name.len() <= 63 && name.ends_with(SOLVER_SERVICE_SUFFIX),
            "{name}"
        );
        assert!(hostname_matches("*.example.com", "a.example.com"));
        assert!(!hostname_matches("*.example.com", "example.com"));
        assert!(!hostname_matches("*.example.com", ".example.com"));
    }
}
