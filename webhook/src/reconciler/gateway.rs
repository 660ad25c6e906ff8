//! The Gateway API reconciler: keeps the world of every annotated Gateway and ListenerSet of
//! the served namespaces in line, as [`Reconciler::ensure`] does for an Ingress:
//!
//! - the temporary Secrets exist where no Secret does (an existing Secret is never touched),
//!   and so do the certificates' Leases;
//! - the solver Services exist, owned by the Gateway or ListenerSet, with their backend's
//!   selector;
//! - sidecert's HTTPRoute per backend ([`solver_route`]) exists as planned, and one that the
//!   Gateway did not accept is an Event;
//! - Pods behind the backends that lack the sidecar get their workload restarted once per
//!   generation, with an Event;
//! - every reason a listener cannot be served ([`Finding`]) is a warning Event on the object.
//!
//! For a Gateway or ListenerSet without the annotation: sidecert's HTTPRoutes and solver
//! Services go; Secrets stay. A deleted one takes them with it (owner references).
//!
//! The objects come from the admission caches ([`Lookup::gateway_objects`]): without the
//! CRDs there are none, and nothing runs. One pass a second looks at what changed; each
//! object is reconciled again at the reconciler's interval.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, hash_map::DefaultHasher},
    hash::{Hash, Hasher},
    sync::Arc,
    time::{Duration, Instant},
};

use kube::{
    Api,
    api::{DynamicObject, Patch, PatchParams, PostParams},
    runtime::events::EventType,
};
use sidecert_contract::lease_name;

use crate::{
    error::{Error, Result},
    kube::{
        delete::{Deleted, delete_unchanged},
        executor::already_exists,
    },
    mutate::{
        effect::Effect,
        gateway::{
            GatewayObjects, Parent, Route, http_route_resource, is_solver_route, owned_by, route_current,
            solver_route, solver_route_name,
        },
        ingress::{plan as ingress_plan, solver_service_name},
    },
    reconciler::{
        context::{Reconciler, owner_unknown, remove_solvers},
        controller::RETRY,
        plan::restart_key,
    },
};

/// How often the reconciler looks at the cached Gateway API objects.
pub const PASS: Duration = Duration::from_secs(1);

/// The field manager of sidecert's server-side applies of its HTTPRoutes.
const FIELD_MANAGER: &str = "sidecert";

#[derive(Default)]
struct Seen {
    fingerprint: u64,
    at: Option<Instant>,
    failures: u32,
    retry_at: Option<Instant>,
    annotated: bool,
}

/// The HTTPRoutes of each namespace, read, and a hash of their resourceVersions.
fn routes_by_namespace(objects: &GatewayObjects) -> BTreeMap<String, (Vec<Route>, u64)> {
    let mut by_ns: BTreeMap<String, Vec<Route>> = BTreeMap::new();
    for route in objects.routes() {
        by_ns.entry(route.namespace.clone()).or_default().push(route);
    }
    by_ns
        .into_iter()
        .map(|(ns, mut routes)| {
            routes.sort_by(|a, b| a.name.cmp(&b.name));
            let mut h = DefaultHasher::new();
            for r in &routes {
                (&r.name, &r.meta.resource_version).hash(&mut h);
            }
            (ns, (routes, h.finish()))
        })
        .collect()
}

/// What a parent's reconcile depends on: itself, its Gateway, and the HTTPRoutes of its
/// namespace and of its Gateway's.
fn fingerprint(
    parent: &Parent,
    objects: &GatewayObjects,
    routes: &BTreeMap<String, (Vec<Route>, u64)>,
) -> u64 {
    let mut h = DefaultHasher::new();
    parent.meta.resource_version.hash(&mut h);
    parent.is_annotated().hash(&mut h);
    routes.get(&parent.namespace).map(|(_, v)| *v).hash(&mut h);
    if let Some((ns, name)) = parent.parent_gateway() {
        objects
            .gateway(&ns, &name)
            .map(|g| g.meta.resource_version)
            .hash(&mut h);
        routes.get(&ns).map(|(_, v)| *v).hash(&mut h);
    }
    h.finish()
}

/// While this replica leads, reconciles the Gateways and ListenerSets.
pub async fn reconcile_gateways(ctx: Arc<Reconciler>) {
    let mut tick = tokio::time::interval(PASS);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen: HashMap<String, Seen> = HashMap::new();
    loop {
        tick.tick().await;
        let objects = ctx.lookup.gateway_objects();
        if objects.is_empty() && seen.is_empty() {
            continue;
        }
        let by_ns = routes_by_namespace(&objects);
        let (parents, unreadable) = objects.parents(None);
        let mut alive = BTreeSet::new();
        for parent in &parents {
            let Some(uid) = parent.meta.uid.clone() else {
                continue;
            };
            alive.insert(uid.clone());
            if !ctx.namespace_enabled(&parent.namespace) {
                continue;
            }
            let fp = fingerprint(parent, &objects, &by_ns);
            // Only the routes of its own namespace: the Pods behind routes elsewhere could not
            // get the certificate, and another namespace's routes are not its owner's to add.
            let routes = by_ns
                .get(&parent.namespace)
                .map(|(r, _)| r.as_slice())
                .unwrap_or_default();
            let now = Instant::now();
            let entry = seen.entry(uid.clone()).or_default();
            // A change is reconciled at once; else a failed one when its backoff is over, and
            // a settled one every interval.
            let changed = entry.fingerprint != fp;
            let due = match entry.retry_at {
                Some(at) => changed || now >= at,
                None => {
                    changed
                        || entry
                            .at
                            .is_none_or(|at| now.duration_since(at) >= ctx.settings.interval)
                }
            };
            if !due {
                continue;
            }
            let annotated = parent.is_annotated();
            // One that never was annotated has nothing of sidecert's, unless the cache holds
            // a solver route it owns (annotated while this replica did not lead).
            let owns_routes = routes.iter().any(|r| r.is_sidecerts() && owned_by(&r.meta, &uid));
            let result = if annotated {
                ctx.ensure_parent(parent, &objects, routes).await
            } else if entry.annotated || owns_routes {
                ctx.remove_parent(parent, routes).await
            } else {
                Ok(())
            };
            let label = match &result {
                Ok(()) => {
                    *entry = Seen {
                        fingerprint: fp,
                        at: Some(now),
                        annotated,
                        ..Seen::default()
                    };
                    "ok"
                }
                Err(e) => {
                    entry.failures = entry.failures.saturating_add(1);
                    let wait = RETRY.delay(entry.failures);
                    entry.fingerprint = fp;
                    entry.at = Some(now);
                    entry.retry_at = Some(now + wait);
                    entry.annotated |= annotated;
                    tracing::warn!(
                        object = %parent.display(),
                        namespace = parent.namespace,
                        error = %e,
                        retry_in = ?wait,
                        "reconcile failed"
                    );
                    e.metric_label()
                }
            };
            ctx.metrics.reconciles.with_label_values(&[label]).inc();
        }
        for (kind, meta, why) in unreadable {
            let ns = meta.namespace.clone().unwrap_or_default();
            if ctx.namespace_enabled(&ns) {
                tracing::debug!(kind = kind.kind(), namespace = ns, why, "unreadable");
            }
        }
        seen.retain(|uid, _| alive.contains(uid));
    }
}

impl Reconciler {
    /// Brings an annotated Gateway's or ListenerSet's world in line.
    pub(super) async fn ensure_parent(
        &self,
        parent: &Parent,
        objects: &GatewayObjects,
        routes: &[Route],
    ) -> Result<()> {
        let ns = parent.namespace.as_str();
        let target = parent.object_reference();
        let labels = |name: &str| {
            self.namespaces
                .get(&kube::runtime::reflector::ObjectRef::new(name))
                .and_then(|n| n.metadata.labels.clone())
        };
        let gplan = objects.plan_of(parent, routes, &labels);
        // One Event per reason: its findings, sorted, in one note of at most 1 kB.
        let mut by_reason: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for f in &gplan.findings {
            by_reason.entry(f.reason).or_default().insert(f.message.as_str());
        }
        for (reason, messages) in by_reason {
            self.warn_once(&target, reason, note_of(&messages)).await;
        }
        let ingress = gplan.as_ingress(parent);
        let mut plan = ingress_plan(&ingress, self.settings.default_profile.as_deref());
        for warning in plan.warnings.drain(..) {
            tracing::debug!(object = %parent.display(), namespace = ns, warning, "plan");
        }

        // One owner per host; a Secret of someone else's is never written.
        let hosts_unknown = self
            .claim_plan_hosts(&target, ns, &mut plan)
            .await
            .is_some_and(|checks| owner_unknown(&checks.left_out));
        let owners_unknown = self.leave_out_foreign_secrets(&target, ns, &mut plan).await;
        let mut first_error =
            (owners_unknown || hosts_unknown).then(|| Error::Timeout(self.executor.budget()));

        for secret in &plan.secrets {
            let effect = Effect::TemporarySecret {
                namespace: ns.to_owned(),
                name: secret.secret_name.clone(),
                domains: secret.domains.clone(),
            };
            if let Err(e) = self.executor.apply_one(&effect).await {
                tracing::warn!(namespace = ns, object = %parent.display(), effect = effect.describe(), error = %e, "reconcile");
                first_error.get_or_insert(e);
            }
            let lease = lease_name(&secret.secret_name);
            if let Err(e) = self.executor.ensure_lease(ns, &lease).await {
                first_error.get_or_insert(e);
            }
        }

        // Solver Services and routes, per backend, for the hosts left.
        let owner = parent.owner_reference();
        let mut by_backend: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for route in &plan.routes {
            by_backend
                .entry(route.backend.as_str())
                .or_default()
                .insert(route.host.as_str());
        }
        let api = Api::<DynamicObject>::namespaced_with(self.client.clone(), ns, &http_route_resource());
        let mut wanted_routes = BTreeSet::new();
        let mut selectors = Vec::new();
        for (backend, hosts) in &by_backend {
            match self
                .executor
                .sync_solver(ns, &solver_service_name(backend), backend, owner.as_ref())
                .await
            {
                Ok(Some(action)) => self.action(action),
                Ok(None) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                    continue;
                }
            }
            match self.executor.backend_selector(ns, backend).await {
                Ok(s) => selectors.push(s),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
            let Some(want) = solver_route(parent, &gplan, backend, hosts) else {
                continue;
            };
            let name = solver_route_name(parent, backend);
            wanted_routes.insert(name.clone());
            let existing = objects.routes.iter().find(|r| {
                r.metadata.namespace.as_deref() == Some(ns) && r.metadata.name.as_deref() == Some(&name)
            });
            let uid = parent.meta.uid.as_deref().unwrap_or_default();
            match existing {
                Some(r) if !is_solver_route(&r.metadata) || !owned_by(&r.metadata, uid) => {
                    self.warn_once(
                        &target,
                        "SolverRouteNameTaken",
                        format!(
                            "sidecert: {}: HTTPRoute {name} exists and is not this {}'s; the HTTP-01 \
                             challenges of {} are not routed",
                            parent.display(),
                            parent.kind.kind(),
                            hosts.iter().copied().collect::<Vec<_>>().join(", ")
                        ),
                    )
                    .await;
                }
                Some(r) => {
                    if let Some(why) = Route::read(r).ok().and_then(|r| r.not_accepted()) {
                        self.warn_once(
                            &target,
                            "SolverRouteNotAccepted",
                            format!(
                                "sidecert: {}: the Gateway did not accept sidecert's HTTPRoute {name}, so \
                                 the HTTP-01 challenges of {} cannot reach the solver: {why}",
                                parent.display(),
                                hosts.iter().copied().collect::<Vec<_>>().join(", ")
                            ),
                        )
                        .await;
                    }
                    if !route_current(r, &want) {
                        // sidecert's own, drifted: put back what it holds.
                        match api
                            .patch(
                                &name,
                                &PatchParams::apply(FIELD_MANAGER).force(),
                                &Patch::Apply(&want),
                            )
                            .await
                        {
                            Ok(_) => {
                                self.action("route_repaired");
                                tracing::info!(namespace = ns, object = %parent.display(), route = name, "repaired the HTTP-01 HTTPRoute");
                            }
                            Err(e) => {
                                first_error.get_or_insert(e.into());
                            }
                        }
                    }
                }
                None => {
                    // Created, never applied over: a route of that name the cache has not seen
                    // yet is someone else's, and stays theirs.
                    if let Err(e) = self.create_route(&api, &target, &name, &want, hosts).await {
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
        // Its routes for backends it no longer has.
        if let Some(uid) = parent.meta.uid.as_deref() {
            for r in routes.iter().filter(|r| {
                r.namespace == ns
                    && r.is_sidecerts()
                    && owned_by(&r.meta, uid)
                    && !wanted_routes.contains(&r.name)
            }) {
                if let Err(e) = self.delete_route(&api, r).await {
                    first_error.get_or_insert(e);
                }
            }
        }

        self.roll(
            &target,
            parent.kind.kind(),
            ns,
            &selectors,
            &restart_key(&ingress),
        )
        .await?;
        first_error.map_or(Ok(()), Err)
    }

    /// Takes sidecert's HTTPRoutes and solver Services off a Gateway or ListenerSet that lost
    /// the annotation. Secrets stay.
    pub(super) async fn remove_parent(&self, parent: &Parent, routes: &[Route]) -> Result<()> {
        let ns = parent.namespace.as_str();
        let Some(uid) = parent.meta.uid.as_deref() else {
            return Ok(());
        };
        let api = Api::<DynamicObject>::namespaced_with(self.client.clone(), ns, &http_route_resource());
        let mut removed = Vec::new();
        for r in routes
            .iter()
            .filter(|r| r.namespace == ns && r.is_sidecerts() && owned_by(&r.meta, uid))
        {
            self.delete_route(&api, r).await?;
            removed.push(r.name.clone());
        }
        let solvers = remove_solvers(&self.client, ns, Some(uid), &[]).await?;
        for svc in &solvers {
            self.action("solver_deleted");
            tracing::info!(namespace = ns, object = %parent.display(), service = svc, "deleted solver Service");
        }
        if !removed.is_empty() || !solvers.is_empty() {
            self.event(
                &parent.object_reference(),
                EventType::Normal,
                "ChallengeRouteRemoved",
                "Reconcile",
                format!(
                    "removed sidecert's HTTPRoutes ({}) and solver Services ({}): the {} is no longer \
                     annotated {}; its Secrets are left alone",
                    removed.join(", "),
                    solvers.join(", "),
                    parent.kind.kind(),
                    sidecert_contract::annotations::ISSUE_TEMPORARY_CERTIFICATE
                ),
                None,
            )
            .await;
        }
        Ok(())
    }

    async fn create_route(
        &self,
        api: &Api<DynamicObject>,
        target: &k8s_openapi::api::core::v1::ObjectReference,
        name: &str,
        want: &serde_json::Value,
        hosts: &BTreeSet<&str>,
    ) -> Result<()> {
        let route: DynamicObject = serde_json::from_value(want.clone())
            .map_err(|e| Error::Contended(format!("cannot build HTTPRoute {name}: {e}")))?;
        match api.create(&PostParams::default(), &route).await {
            Ok(_) => {
                self.action("route_added");
                tracing::info!(route = name, "created the HTTP-01 HTTPRoute");
                self.event(
                    target,
                    EventType::Normal,
                    "ChallengeRouteAdded",
                    "Reconcile",
                    format!(
                        "created HTTPRoute {name} for the HTTP-01 challenges of {}",
                        hosts.iter().copied().collect::<Vec<_>>().join(", ")
                    ),
                    None,
                )
                .await;
                Ok(())
            }
            // Made meanwhile, by a pass before or by someone else: the next pass, from the
            // cache, tells which.
            Err(e) if already_exists(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes one of sidecert's routes as read ([`delete_unchanged`]); one that changed
    /// since is an error, and the next pass looks again.
    async fn delete_route(&self, api: &Api<DynamicObject>, route: &Route) -> Result<()> {
        match delete_unchanged(api, &route.meta).await? {
            Deleted::Yes => {
                self.action("route_removed");
                tracing::info!(
                    namespace = route.namespace,
                    route = route.name,
                    "deleted sidecert's HTTPRoute"
                );
                Ok(())
            }
            Deleted::Gone => Ok(()),
            Deleted::Changed => Err(Error::Contended(format!(
                "HTTPRoute {} changed while it was removed",
                route.name
            ))),
        }
    }
}

/// The most an Event's note holds (1 kB), with room for "and N more".
const NOTE_BYTES: usize = 900;

/// Messages joined into one Event note of at most [`NOTE_BYTES`] and a count of the rest, cut
/// at whole messages (a first one longer than that, at a character boundary).
fn note_of(messages: &BTreeSet<&str>) -> String {
    let mut note = String::new();
    let mut shown = 0;
    for m in messages {
        let sep = if note.is_empty() { "" } else { "; " };
        if note.len() + sep.len() + m.len() > NOTE_BYTES {
            if note.is_empty() {
                let mut end = NOTE_BYTES.min(m.len());
                while !m.is_char_boundary(end) {
                    end -= 1;
                }
                note = m.get(..end).unwrap_or_default().to_owned();
                shown = 1;
            }
            break;
        }
        note.push_str(sep);
        note.push_str(m);
        shown += 1;
    }
    if messages.len() > shown {
        note.push_str(&format!("; and {} more", messages.len() - shown));
    }
    note
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_fit_an_event() {
        let long = "é".repeat(2000);
        let many: Vec<String> = (0..100)
            .map(|i| format!("listener l{i} is wrong in some way"))
            .collect();
        let set: BTreeSet<&str> = many.iter().map(String::as_str).collect();
        let note = note_of(&set);
        assert!(note.len() < 1024 && note.ends_with("more"), "{note}");
        let note = note_of(&BTreeSet::from([long.as_str(), "b"]));
        assert!(note.len() < 1024, "{}", note.len());
        assert_eq!(note_of(&BTreeSet::from(["a", "b"])), "a; b");
    }
}
