//! The review itself, shared by the server, the offline commands and the tests: the pure
//! decision, then (when it has a cluster) the live re-check the Pod decision asks for and the
//! side effects (unless dry run), then the response.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::AdmissionRequest;
use sidecert_contract::foreign_secret_warning;

use crate::{
    admission::codec::{Request, operation_label, parse, respond},
    error::{Error, Result},
    kube::{
        executor::{Executor, SecretOwners},
        live::LiveCheck,
        namespaces::NamespaceGate,
    },
    metrics::Metrics,
    mutate::{
        context::{Context, SecretChecks},
        effect::Effect,
        ingress::mutate_ingress,
        namespace::not_served_warning,
        outcome::{Outcome, SkipReason},
        pod::{PodDecision, decide_pod, mutate_pod},
    },
};

/// Serves reviews: pure mutation, then (unless dry run, and when it has a cluster) the side
/// effects, then the response.
#[derive(Clone)]
pub struct Reviewer {
    pub ctx: Context,
    pub metrics: Metrics,
    pub executor: Option<Executor>,
    /// The live re-check of Pods the caches may have missed (paused after a failure).
    live: LiveCheck,
    /// Which namespaces opted in, asked of the API server (the server sets it; offline
    /// commands and tests without it trust the review's namespace).
    namespaces: Option<NamespaceGate>,
}

/// Time budget for the live check of one Pod.
pub const LIVE_LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// How many times a review asks the API server whose Secrets its decision names (each
/// decision made again may name new ones).
pub const MAX_OWNER_ROUNDS: usize = 3;

/// The namespace and the sorted names of the Secrets an outcome's effects would write or
/// grant rights on.
fn secret_names(outcome: &Outcome) -> Option<(String, Vec<String>)> {
    let mut names = outcome
        .effects
        .iter()
        .flat_map(|e| -> Vec<(&String, &String)> {
            match e {
                Effect::TemporarySecret { name, namespace, .. } => vec![(namespace, name)],
                Effect::Rbac {
                    namespace,
                    certificates,
                    account,
                    ..
                } => std::iter::once(account)
                    .chain(certificates)
                    .map(|n| (namespace, n))
                    .collect(),
                Effect::SolverService { .. } => Vec::new(),
            }
        })
        .peekable();
    let namespace = names.peek()?.0.clone();
    let mut names: Vec<String> = names.map(|(_, n)| n.clone()).collect();
    names.sort_unstable();
    names.dedup();
    Some((namespace, names))
}

impl Reviewer {
    pub fn new(ctx: Context, metrics: Metrics, executor: Option<Executor>) -> Self {
        Self {
            ctx,
            metrics,
            executor,
            live: LiveCheck::default(),
            namespaces: None,
        }
    }

    /// Applies the namespace rules to every review before anything else: a Pod or Ingress in
    /// a namespace that did not opt in (as the API server says), a system namespace or
    /// sidecert's own is left unchanged, with no side effect, whatever the review says.
    pub fn with_namespace_gate(mut self, gate: NamespaceGate) -> Self {
        self.namespaces = Some(gate);
        self
    }

    /// `Some(outcome)` when the namespace rules leave this review unchanged.
    async fn refused(&self, request: &Request, deadline: Option<Instant>) -> Option<Outcome> {
        let gate = self.namespaces.as_ref()?;
        if matches!(request, Request::Other { .. }) {
            return None;
        }
        let ns = request.namespace();
        let budget = deadline.map_or(LIVE_LOOKUP_TIMEOUT, |d| {
            d.saturating_duration_since(Instant::now())
        });
        let result = match gate.serves(ns, budget.min(LIVE_LOOKUP_TIMEOUT)).await {
            Ok(true) => return None,
            Ok(false) => "not_served",
            Err(e) => {
                tracing::warn!(uid = request.uid(), namespace = ns, error = %e, "cannot tell whether the namespace opted in");
                e.metric_label()
            }
        };
        tracing::info!(
            uid = request.uid(),
            namespace = ns,
            result,
            "review for a namespace sidecert does not serve: unchanged"
        );
        Some(Outcome::skip(SkipReason::NamespaceNotServed).warn(not_served_warning(ns)))
    }

    /// The pure part of a review.
    pub fn mutate(&self, request: &Request) -> Outcome {
        match request {
            Request::Pod(r) => mutate_pod(r, &self.ctx),
            Request::Ingress(r) => mutate_ingress(r, &self.ctx),
            Request::Other { warning, .. } => Outcome::skip(SkipReason::UnknownKind).warn(warning.clone()),
        }
    }

    /// A Pod's decision from the caches, and again over live objects when the caches may
    /// have missed an Ingress.
    async fn decide_pod(
        &self,
        pod: &AdmissionRequest<Pod>,
        exec: &Executor,
        ctx: &Context,
        deadline: Option<Instant>,
    ) -> Outcome {
        let PodDecision { outcome, recheck } = decide_pod(pod, ctx);
        let Some(recheck) = recheck else {
            return outcome;
        };
        // At most half of what is left: the ownership look-up and the side effects follow.
        let left = deadline.map_or(exec.budget(), |d| d.saturating_duration_since(Instant::now()));
        let budget = (left / 2).min(LIVE_LOOKUP_TIMEOUT);
        self.live
            .recheck(pod, ctx, exec.client(), &self.metrics, recheck, budget, outcome)
            .await
    }

    /// Asks the API server whose Secrets the review's certificates and the sidecar's ACME
    /// account name. A certificate whose Secret is someone else's is left unconfigured
    /// (decided again without it: no sidecar, no right, no HTTP-01 path for it), and so is a
    /// Pod whose account Secret is. The effects look at every Secret again before the Role
    /// names it (one found to be sidecert's here may have been replaced since).
    ///
    /// A decision made again may name Secrets the first did not (a host's next TLS entry, or
    /// an Ingress a fresh look found): those are asked about in turn, for at most
    /// [`MAX_OWNER_ROUNDS`] look-ups; the last decision may use only names asked about, so no
    /// unchecked name ever reaches a Role.
    async fn leave_foreign_secrets(
        &self,
        request: &Request,
        exec: &Executor,
        mut outcome: Outcome,
        deadline: Option<Instant>,
    ) -> Outcome {
        // At most half of what is left, however many rounds: the side effects follow, and
        // with no time left they would all fail (no Secret, no Lease, no Role).
        let decide_by = deadline.map(|d| {
            let now = Instant::now();
            now + d.saturating_duration_since(now) / 2
        });
        let mut owners = SecretOwners::default();
        let mut asked: BTreeSet<String> = BTreeSet::new();
        for round in 1..=MAX_OWNER_ROUNDS {
            let Some((namespace, names)) = secret_names(&outcome) else {
                break;
            };
            // The candidates too: a Pod then picks the same Secret for a host as its Ingress.
            let mut new: Vec<&str> = names
                .iter()
                .chain(&outcome.secret_candidates)
                .map(String::as_str)
                .filter(|n| !asked.contains(*n))
                .collect();
            new.sort_unstable();
            new.dedup();
            if !new.is_empty() {
                let budget = decide_by
                    .map_or(exec.budget(), |d| d.saturating_duration_since(Instant::now()))
                    .min(LIVE_LOOKUP_TIMEOUT);
                owners.extend(exec.secret_owners(&namespace, &new, budget).await);
                asked.extend(new.iter().map(|n| (*n).to_owned()));
            }
            if names.iter().all(|n| owners.allows(n)) {
                break;
            }
            let left_out = owners.left_out();
            tracing::info!(uid = request.uid(), secrets = ?left_out, round, "certificates naming Secrets that are not (or not known to be) sidecert's are left out");
            // Decided again without them; in the last round, with only the names asked about.
            let checks = SecretChecks {
                left_out,
                checked: (round == MAX_OWNER_ROUNDS).then(|| asked.clone()),
            };
            outcome = self
                .decide_again(
                    request,
                    exec,
                    &self.ctx.with_secret_checks(checks),
                    decide_by,
                    outcome,
                )
                .await;
        }
        outcome
    }

    /// The review decided again with `ctx` (which knows whose Secrets are whose).
    async fn decide_again(
        &self,
        request: &Request,
        exec: &Executor,
        ctx: &Context,
        deadline: Option<Instant>,
        outcome: Outcome,
    ) -> Outcome {
        match request {
            Request::Pod(pod) => self.decide_pod(pod, exec, ctx, deadline).await,
            Request::Ingress(ingress) => mutate_ingress(ingress, ctx),
            Request::Other { .. } => outcome,
        }
    }

    /// Reviews a body and returns the serialised AdmissionReview response. `Err` means the
    /// body is not an AdmissionReview ([`crate::Error::InvalidReview`], [`crate::Error::UndecodableReview`],
    /// [`crate::Error::TooLarge`]).
    pub async fn review(&self, body: &[u8]) -> Result<Vec<u8>> {
        let mut timer = self.metrics.timer();
        let request = parse(body)?;
        timer.kind = request.kind_label();
        timer.operation = operation_label(request.operation());
        // One budget for the review's API calls: the live check, then the side effects.
        let deadline = self.executor.as_ref().map(|e| Instant::now() + e.budget());
        let refused = self.refused(&request, deadline).await;
        let mut outcome = match (&request, &self.executor, refused) {
            (_, _, Some(refused)) => refused,
            (Request::Pod(pod), Some(exec), None) => {
                let outcome = self.decide_pod(pod, exec, &self.ctx, deadline).await;
                self.leave_foreign_secrets(&request, exec, outcome, deadline)
                    .await
            }
            (Request::Ingress(_), Some(exec), None) => {
                let outcome = self.mutate(&request);
                self.leave_foreign_secrets(&request, exec, outcome, deadline)
                    .await
            }
            _ => self.mutate(&request),
        };
        let run_effects = !request.dry_run() && !outcome.effects.is_empty();
        if let Some(exec) = self.executor.as_ref().filter(|_| run_effects) {
            let left = deadline.map_or(exec.budget(), |d| d.saturating_duration_since(Instant::now()));
            for (effect, err) in exec.apply(&outcome.effects, left).await {
                tracing::warn!(uid = request.uid(), effect = effect.label(), error = %err, "side effect failed");
                self.metrics
                    .side_effect_failures
                    .with_label_values(&[effect.label(), err.metric_label()])
                    .inc();
                outcome.warnings.push(match &err {
                    Error::Foreign {
                        kind: "Secret",
                        namespace,
                        name,
                    } => foreign_secret_warning(namespace, name),
                    Error::Foreign { .. } => format!("sidecert: {err}"),
                    _ => format!(
                        "sidecert: could not create {} ({err}); admitted anyway, the next admission retries",
                        effect.describe()
                    ),
                });
            }
        }
        self.count(&request, &outcome);
        timer.result = if outcome.patch.is_empty() {
            "unchanged"
        } else {
            "mutated"
        };
        let body = match &request {
            Request::Pod(r) => respond(r.as_ref(), outcome),
            Request::Ingress(r) => respond(r.as_ref(), outcome),
            Request::Other { request, .. } => respond(request.as_ref(), outcome),
        };
        if body.is_err() {
            timer.result = "error";
        }
        body
    }

    fn count(&self, request: &Request, outcome: &Outcome) {
        let kind = request.kind_label();
        if !outcome.patch.is_empty() {
            self.metrics.injections.with_label_values(&[kind]).inc();
        }
        if let Some(reason) = outcome.skipped {
            self.metrics.skips.with_label_values(&[reason.as_str()]).inc();
        }
        if !outcome.warnings.is_empty() {
            self.metrics
                .warnings
                .with_label_values(&[kind])
                .inc_by(outcome.warnings.len() as u64);
        }
    }
}
