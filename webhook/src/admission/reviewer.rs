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
        claims::{Ask, Claimed, HostClaims},
        executor::{Executor, SecretOwners},
        live::LiveCheck,
        namespaces::{NamespaceGate, Served},
    },
    metrics::Metrics,
    mutate::{
        context::{Context, HostStanding, MAX_HOSTS_PER_REVIEW, SecretChecks},
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
    /// Who owns which host (the server sets it; without it, every host is the namespace's).
    claims: Option<HostClaims>,
}

/// Time budget for the live check of one Pod.
pub const LIVE_LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// How many times a review asks the API server whose Secrets its decision names (each
/// decision made again may name new ones).
pub const MAX_OWNER_ROUNDS: usize = 3;

/// Every host the outcome's certificates hold (their temporary Secrets name them all).
fn hosts_of(outcome: &Outcome) -> BTreeSet<&str> {
    outcome
        .effects
        .iter()
        .flat_map(|e| match e {
            Effect::TemporarySecret { domains, .. } => domains.as_slice(),
            _ => &[],
        })
        .map(String::as_str)
        .collect()
}

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
            claims: None,
        }
    }

    /// Claims the hosts of every review for its namespace before any certificate is
    /// configured for them: one owner per host, within the allowed domains.
    pub fn with_host_claims(mut self, claims: HostClaims) -> Self {
        self.claims = Some(claims);
        self
    }

    /// Applies the namespace rules to every review before anything else: a Pod or Ingress in
    /// a namespace that did not opt in (as the API server says), a system namespace or
    /// sidecert's own is left unchanged, with no side effect, whatever the review says.
    pub fn with_namespace_gate(mut self, gate: NamespaceGate) -> Self {
        self.namespaces = Some(gate);
        self
    }

    /// `Err(outcome)` when the namespace rules leave this review unchanged; else what the
    /// API server said of the namespace (`None` without a gate).
    async fn gate(
        &self,
        request: &Request,
        deadline: Option<Instant>,
    ) -> Result<Option<Served>, Box<Outcome>> {
        let Some(gate) = self.namespaces.as_ref() else {
            return Ok(None);
        };
        if matches!(request, Request::Other { .. }) {
            return Ok(None);
        }
        let ns = request.namespace();
        let budget = deadline.map_or(LIVE_LOOKUP_TIMEOUT, |d| {
            d.saturating_duration_since(Instant::now())
        });
        let result = match gate.serves(ns, budget.min(LIVE_LOOKUP_TIMEOUT)).await {
            Ok(Some(served)) => return Ok(Some(served)),
            Ok(None) => "not_served",
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
        Err(Box::new(
            Outcome::skip(SkipReason::NamespaceNotServed).warn(not_served_warning(ns)),
        ))
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

    /// Asks the API server who owns the hosts and whose are the Secrets the review's
    /// certificates and the sidecar's ACME account name. A host claimed by another namespace
    /// (or outside the domains this one may claim, or whose claim is not known in time) is
    /// left out of its certificate, and a certificate left with no host goes; a certificate
    /// whose Secret is someone else's is left unconfigured (decided again without it: no
    /// sidecar, no right, no HTTP-01 path for it), and so is a Pod whose account Secret is.
    /// The effects look at every Secret again before the Role names it (one found to be
    /// sidecert's here may have been replaced since).
    ///
    /// A decision made again may name hosts and Secrets the first did not (a host's next TLS
    /// entry, or an Ingress a fresh look found): those are asked about in turn, for at most
    /// [`MAX_OWNER_ROUNDS`] look-ups; the last decision may use only hosts claimed and names
    /// asked about, so no unchecked name ever reaches a Role or a certificate.
    async fn check_names(
        &self,
        request: &Request,
        exec: &Executor,
        mut outcome: Outcome,
        deadline: Option<Instant>,
        served: Option<&Served>,
    ) -> Outcome {
        // At most half of what is left, however many rounds: the side effects follow, and
        // with no time left they would all fail (no Secret, no Lease, no Role).
        let decide_by = deadline.map(|d| {
            let now = Instant::now();
            now + d.saturating_duration_since(now) / 2
        });
        let claims = self.claims.as_ref();
        let namespace = request.namespace().to_owned();
        let mut owners = SecretOwners::default();
        let mut asked: BTreeSet<String> = BTreeSet::new();
        let mut hosts = Claimed::default();
        for round in 1..=MAX_OWNER_ROUNDS {
            let names = secret_names(&outcome);
            let wanted_hosts = if claims.is_some() {
                hosts_of(&outcome)
            } else {
                BTreeSet::new()
            };
            if names.is_none() && wanted_hosts.is_empty() {
                break;
            }
            // The candidates too: a Pod then picks the same Secret for a host as its Ingress.
            let mut new: Vec<&str> = names
                .iter()
                .flat_map(|(_, n)| n)
                .chain(&outcome.secret_candidates)
                .map(String::as_str)
                .filter(|n| !asked.contains(*n))
                .collect();
            new.sort_unstable();
            new.dedup();
            let new_hosts: Vec<&str> = wanted_hosts
                .iter()
                .copied()
                .filter(|h| !hosts.owned.contains(*h) && !hosts.left_out.contains_key(*h))
                .collect();
            // At most MAX_HOSTS_PER_REVIEW hosts over all rounds; the rest are left out.
            let room = MAX_HOSTS_PER_REVIEW.saturating_sub(hosts.owned.len() + hosts.left_out.len());
            let (new_hosts, over) = new_hosts.split_at(room.min(new_hosts.len()));
            let over: Vec<String> = over.iter().map(|h| (*h).to_owned()).collect();
            hosts
                .left_out
                .extend(over.into_iter().map(|h| (h, HostStanding::TooMany)));
            let budget = decide_by
                .map_or(exec.budget(), |d| d.saturating_duration_since(Instant::now()))
                .min(LIVE_LOOKUP_TIMEOUT);
            let look_secrets = async {
                match &names {
                    Some((ns, _)) if !new.is_empty() => Some(exec.secret_owners(ns, &new, budget).await),
                    _ => None,
                }
            };
            let claim_hosts = async {
                match claims {
                    Some(c) if !new_hosts.is_empty() => {
                        let ask = if request.dry_run() {
                            Ask::DryRun
                        } else {
                            Ask::Review
                        };
                        Some(c.claim(&namespace, served, new_hosts, ask, budget).await)
                    }
                    _ => None,
                }
            };
            let (found, claimed) = futures::join!(look_secrets, claim_hosts);
            if let Some(found) = found {
                owners.extend(found);
            }
            asked.extend(new.iter().map(|n| (*n).to_owned()));
            if let Some(claimed) = claimed {
                hosts.extend(claimed);
            }
            let secrets_ok = names
                .as_ref()
                .is_none_or(|(_, names)| names.iter().all(|n| owners.allows(n)));
            let hosts_ok = wanted_hosts.iter().all(|h| hosts.owned.contains(*h));
            if secrets_ok && hosts_ok {
                break;
            }
            let left_out = owners.left_out();
            tracing::info!(uid = request.uid(), secrets = ?left_out, hosts = ?hosts.left_out.keys().collect::<Vec<_>>(), round, "certificates naming hosts or Secrets that are not (or not known to be) the namespace's are left out");
            // Decided again without them; in the last round, with only the names asked about
            // and the hosts claimed.
            let last = round == MAX_OWNER_ROUNDS;
            let checks = SecretChecks {
                left_out,
                checked: last.then(|| asked.clone()),
            };
            let ctx = self
                .ctx
                .with_secret_checks(checks)
                .with_host_checks(hosts.checks(last && claims.is_some()));
            outcome = self.decide_again(request, exec, &ctx, decide_by, outcome).await;
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
        let served = self.gate(&request, deadline).await;
        let mut outcome = match (&request, &self.executor, served) {
            (_, _, Err(refused)) => *refused,
            (Request::Pod(pod), Some(exec), Ok(served)) => {
                let outcome = self.decide_pod(pod, exec, &self.ctx, deadline).await;
                self.check_names(&request, exec, outcome, deadline, served.as_ref())
                    .await
            }
            (Request::Ingress(_), Some(exec), Ok(served)) => {
                let outcome = self.mutate(&request);
                self.check_names(&request, exec, outcome, deadline, served.as_ref())
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
