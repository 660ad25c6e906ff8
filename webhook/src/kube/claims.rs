//! One owner per host, decided by the API server: a claim Lease per host in sidecert's own
//! namespace ([`sidecert_contract::hosts`]), created only if absent, holder the namespace
//! that asked first. Admission claims the hosts a review's certificates name (a dry run only
//! looks); the reconciler's leader releases a claim after its owner has had no object for
//! that host for a while ([`HostClaims::sweep`]).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::{
    api::{
        coordination::v1::{Lease, LeaseSpec},
        core::v1::{Namespace, Pod},
        networking::v1::Ingress,
    },
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, ObjectMeta, PostParams},
};
use sidecert_contract::{
    MANAGED_BY, MANAGED_BY_LABEL, annotations, decode_certificates,
    hosts::{
        CLAIM_CONFIRMED_LABEL, CLAIM_HOLDER_LABEL, CLAIM_HOST_ANNOTATION, CLAIM_LABEL, CLAIM_LABEL_VALUE,
        CLAIM_NAMESPACE_UID_ANNOTATION, CLAIM_PREFIX, DomainPolicy, claim_name,
    },
};

use crate::{
    error::Result,
    kube::{
        delete::{Deleted, delete_unchanged},
        executor::already_exists,
        namespaces::Served,
    },
    mutate::{
        context::{HostChecks, HostStanding, MAX_CLAIMS_PER_NAMESPACE, MAX_HOSTS_PER_REVIEW},
        ingress::{is_annotated, plan},
    },
};

/// How many claims [`HostClaims::claim`] asks about at once.
const CLAIMS_AT_ONCE: usize = 16;

/// How long a claim the leader never saw in use by a stored object lasts unused: a review
/// whose object was refused after admission (validation, quota, a later webhook) holds its
/// hosts no longer than this.
/// No release delay is shorter (`--host-claim-release-after` is at least this).
pub const PROVISIONAL_RELEASE_AFTER: Duration = crate::config::MIN_HOST_CLAIM_RELEASE_AFTER;

/// The claims in sidecert's namespace.
#[derive(Clone)]
pub struct HostClaims {
    api: Api<Lease>,
    /// The chart's `allowedDomains` (none: any domain).
    pub policy: DomainPolicy,
    /// `--host-claim-release-after`: how long a confirmed claim lasts unused.
    release_after: Duration,
}

/// Who asks for a claim, and what the claim may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// A dry run: only looks (and counts the namespace's claims), never writes.
    DryRun,
    /// An admission review: creates the claims absent, and renews a held claim older than
    /// half the shortest release delay, since the object it admits is not stored yet and
    /// the sweep could otherwise release the claim under it.
    Review,
    /// The reconciler, for a stored object: creates the claims absent, renews none (the
    /// sweep sees the object, live, before it releases anything).
    Reconcile,
}

/// What a review learned of its hosts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claimed {
    /// Hosts the namespace owns (or, on a dry run, would own).
    pub owned: BTreeSet<String>,
    /// Hosts it may not have, and why.
    pub left_out: BTreeMap<String, HostStanding>,
}

impl Claimed {
    pub fn extend(&mut self, other: Self) {
        self.owned.extend(other.owned);
        self.left_out.extend(other.left_out);
    }

    /// The checks a decision is made again with; `last`: only the hosts owned are allowed.
    pub fn checks(&self, last: bool) -> HostChecks {
        HostChecks {
            left_out: self.left_out.clone(),
            claimed: last.then(|| self.owned.clone()),
        }
    }
}

/// The namespace holding a claim: its name, and its uid when known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner<'a> {
    pub name: &'a str,
    pub uid: Option<&'a str>,
}

impl Owner<'_> {
    /// Whether this namespace holds `lease`: its name is the holder, and the uid on the
    /// claim (when both are known) is its own.
    fn holds(&self, lease: &Lease) -> bool {
        holder(lease) == Some(self.name) && self.same_uid(lease.annotations())
    }

    /// Whether a claim annotated `annotations` is of this namespace's uid (when both are
    /// known), not of a deleted one of the same name.
    fn same_uid(&self, annotations: &BTreeMap<String, String>) -> bool {
        match (annotations.get(CLAIM_NAMESPACE_UID_ANNOTATION), self.uid) {
            (Some(theirs), Some(ours)) => theirs == ours,
            _ => true,
        }
    }
}

/// The claim Lease for `host`, held by `owner`.
pub fn claim_lease(name: &str, host: &str, owner: Owner<'_>) -> Lease {
    let now = MicroTime(Timestamp::now());
    Lease {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(
                [
                    (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
                    (CLAIM_LABEL.to_owned(), CLAIM_LABEL_VALUE.to_owned()),
                    (CLAIM_HOLDER_LABEL.to_owned(), owner.name.to_owned()),
                ]
                .into(),
            ),
            annotations: Some(
                std::iter::once((CLAIM_HOST_ANNOTATION.to_owned(), host.to_owned()))
                    .chain(
                        owner
                            .uid
                            .map(|uid| (CLAIM_NAMESPACE_UID_ANNOTATION.to_owned(), uid.to_owned())),
                    )
                    .collect(),
            ),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(owner.name.to_owned()),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            ..LeaseSpec::default()
        }),
    }
}

fn holder(lease: &Lease) -> Option<&str> {
    lease.spec.as_ref()?.holder_identity.as_deref()
}

/// The host a claim is for: its annotation, else its name without the prefix.
fn claimed_host(lease: &Lease) -> Option<String> {
    lease
        .annotations()
        .get(CLAIM_HOST_ANNOTATION)
        .cloned()
        .or_else(|| lease.name_any().strip_prefix(CLAIM_PREFIX).map(str::to_owned))
}

/// What [`HostClaims::claim_one`] found.
enum Claim {
    /// The namespace holds it.
    Held,
    /// Another namespace does.
    Other,
    /// It is absent and the namespace holds [`MAX_CLAIMS_PER_NAMESPACE`] already.
    Full,
}

/// A delay as a signed duration (a delay too long for one never comes).
fn signed(d: Duration) -> SignedDuration {
    SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX)
}

/// `lease` with its renewal now (kept on the resourceVersion it was read at).
fn renewed_now(mut lease: Lease) -> Lease {
    if let Some(spec) = lease.spec.as_mut() {
        spec.renew_time = Some(MicroTime(Timestamp::now()));
    }
    lease
}

/// When the owner was last seen using the claim.
fn renewed(lease: &Lease) -> Option<Timestamp> {
    let spec = lease.spec.as_ref()?;
    spec.renew_time
        .as_ref()
        .or(spec.acquire_time.as_ref())
        .map(|t| t.0)
        .or_else(|| lease.creation_timestamp().map(|t| t.0))
}

impl HostClaims {
    /// Claims live in `namespace` (sidecert's own).
    pub fn new(client: Client, namespace: &str, policy: DomainPolicy, release_after: Duration) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            policy,
            release_after,
        }
    }

    /// A held claim older than this is renewed by the review that relies on it: the sweep
    /// deletes a claim only if unchanged since it looked, so a claim in use is never released
    /// under a review (half the shortest release delay).
    fn renew_after(&self) -> Duration {
        self.release_after.min(PROVISIONAL_RELEASE_AFTER) / 2
    }

    /// How many claims `owner` holds (a claim of a deleted namespace of the same name is
    /// not its).
    async fn held_by(&self, owner: Owner<'_>) -> Result<usize> {
        let lp = ListParams::default().labels(&format!("{CLAIM_HOLDER_LABEL}={}", owner.name));
        let held = self.api.list_metadata(&lp).await?.items;
        Ok(held.iter().filter(|l| owner.same_uid(l.annotations())).count())
    }

    /// Claims `hosts` (normalised) for `namespace` (as the API server has it: `served`,
    /// whose allowed-domains annotation narrows the chart's list), within `budget`: each
    /// one allowed is created if absent (looked at only, on a dry run) and then owned by
    /// whoever holds it. A host whose claim the API server did not answer for in time is
    /// [`HostStanding::Unknown`]; past the first [`MAX_HOSTS_PER_REVIEW`] (in name order),
    /// [`HostStanding::TooMany`].
    pub async fn claim(
        &self,
        namespace: &str,
        served: Option<&Served>,
        hosts: &[&str],
        ask: Ask,
        budget: Duration,
    ) -> Claimed {
        let policy = self
            .policy
            .clone()
            .with_namespace_annotation(served.and_then(|s| s.allowed_domains.as_deref()));
        let owner = Owner {
            name: namespace,
            uid: served.and_then(|s| s.uid.as_deref()),
        };
        let mut out = Claimed::default();
        let mut asks = Vec::new();
        let mut hosts = hosts.to_vec();
        hosts.sort_unstable();
        hosts.dedup();
        for (i, host) in hosts.iter().enumerate() {
            let host = (*host).to_owned();
            if i >= MAX_HOSTS_PER_REVIEW {
                out.left_out.insert(host, HostStanding::TooMany);
                continue;
            }
            if !policy.allows(&host) {
                let warning = policy.refusal(namespace, &host);
                out.left_out.insert(host, HostStanding::NotAllowed(warning));
                continue;
            }
            let Some(name) = claim_name(&host) else {
                out.left_out.insert(host, HostStanding::Unclaimable);
                continue;
            };
            asks.push((host, name));
        }
        let deadline = tokio::time::Instant::now() + budget;
        // A namespace's claims are counted once, when a review first needs a new one.
        let room = tokio::sync::OnceCell::new();
        let room = &room;
        let looks: Vec<_> = asks
            .into_iter()
            .map(|(host, name)| async move {
                let found =
                    tokio::time::timeout_at(deadline, self.claim_one(&name, &host, owner, ask, room)).await;
                (host, found)
            })
            .collect();
        let found: Vec<_> = futures::stream::iter(looks)
            .buffer_unordered(CLAIMS_AT_ONCE)
            .collect()
            .await;
        for (host, found) in found {
            match found {
                Ok(Ok(Claim::Held)) => {
                    out.owned.insert(host);
                }
                Ok(Ok(Claim::Other)) => {
                    tracing::info!(%namespace, %host, "host claimed by another namespace: left out");
                    out.left_out.insert(host, HostStanding::Claimed);
                }
                Ok(Ok(Claim::Full)) => {
                    out.left_out.insert(host, HostStanding::TooManyClaims);
                }
                Ok(Err(e)) => {
                    tracing::warn!(%namespace, %host, error = %e, "cannot claim the host");
                    out.left_out.insert(host, HostStanding::Unknown);
                }
                Err(_) => {
                    tracing::warn!(%namespace, %host, "cannot claim the host in time");
                    out.left_out.insert(host, HostStanding::Unknown);
                }
            }
        }
        out
    }

    /// Whether `owner` holds the claim `name` (after creating it, unless on a dry run); for
    /// a review, a held claim older than [`Self::renew_after`] is renewed first.
    async fn claim_one(
        &self,
        name: &str,
        host: &str,
        owner: Owner<'_>,
        ask: Ask,
        room: &tokio::sync::OnceCell<std::sync::Mutex<usize>>,
    ) -> Result<Claim> {
        let namespace = owner.name;
        let renew_after = signed(self.renew_after());
        // Twice at most: a claim released or renewed between the look and the write is
        // looked at again.
        for _ in 0..2 {
            // Look first: most reviews find their namespace's claim.
            if let Some(lease) = self.api.get_opt(name).await? {
                if !owner.holds(&lease) {
                    return Ok(Claim::Other);
                }
                let age = renewed(&lease).map_or(SignedDuration::MAX, |t| Timestamp::now().duration_since(t));
                if ask != Ask::Review || age < renew_after {
                    return Ok(Claim::Held);
                }
                match self
                    .api
                    .replace(name, &PostParams::default(), &renewed_now(lease))
                    .await
                {
                    Ok(_) => return Ok(Claim::Held),
                    Err(kube::Error::Api(s)) if s.is_not_found() || s.is_conflict() => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            let left = room
                .get_or_try_init(|| async {
                    let held = self.held_by(owner).await?;
                    Ok::<_, crate::error::Error>(std::sync::Mutex::new(
                        MAX_CLAIMS_PER_NAMESPACE.saturating_sub(held),
                    ))
                })
                .await?;
            {
                let mut left = left.lock().unwrap_or_else(|p| p.into_inner());
                if *left == 0 {
                    tracing::warn!(%namespace, %host, max = MAX_CLAIMS_PER_NAMESPACE, "the namespace holds the most host claims it may");
                    return Ok(Claim::Full);
                }
                *left -= 1;
            }
            // A dry run says what a review would get, the cap included, and writes nothing.
            if ask == Ask::DryRun {
                return Ok(Claim::Held);
            }
            match self
                .api
                .create(&PostParams::default(), &claim_lease(name, host, owner))
                .await
            {
                Ok(_) => {
                    tracing::info!(%namespace, %host, "host claimed");
                    return Ok(Claim::Held);
                }
                // Another review was first: whoever it was holds it.
                Err(e) if already_exists(&e) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(crate::error::Error::Contended(format!(
            "the claim {name} changed under two looks in a row"
        )))
    }

    /// The leader's pass over every claim. One whose owner still has an object for the
    /// host (per `in_use`, the caches: the hosts a namespace of that name and uid asks for,
    /// gathered once per namespace and pass) is confirmed, and renewed when its renewal is
    /// older than half the release delay. One unused for the release delay
    /// (`--host-claim-release-after` once confirmed, [`PROVISIONAL_RELEASE_AFTER`] before)
    /// is looked at live (the owner, which must still be the same namespace and carry
    /// `selector`, its annotated Ingresses and its Pods' certificates, once per namespace
    /// and pass) and deleted if still unused, on condition that it is unchanged: a review
    /// that relied on it meanwhile renewed it. A claim that cannot be looked at or written
    /// is left for the next pass, the others go on. Returns the hosts released; `Err` only
    /// when the claims cannot be listed.
    pub async fn sweep(
        &self,
        client: &Client,
        selector: &str,
        in_use: impl Fn(&str, Option<&str>) -> BTreeSet<String>,
    ) -> Result<Vec<String>> {
        let lp = ListParams::default().labels(&format!("{CLAIM_LABEL}={CLAIM_LABEL_VALUE}"));
        let leases = self.api.list(&lp).await?.items;
        let now = Timestamp::now();
        let mut cached: HashMap<(String, Option<String>), BTreeSet<String>> = HashMap::new();
        // None: the namespace could not be looked at this pass; its claims wait.
        let mut live: HashMap<(String, Option<String>), Option<BTreeSet<String>>> = HashMap::new();
        let mut released = Vec::new();
        for lease in leases {
            let (Some(owner), Some(host)) = (holder(&lease).map(str::to_owned), claimed_host(&lease)) else {
                continue;
            };
            let uid = lease.annotations().get(CLAIM_NAMESPACE_UID_ANNOTATION).cloned();
            let confirmed = lease
                .labels()
                .get(CLAIM_CONFIRMED_LABEL)
                .is_some_and(|v| v == "true");
            let after = signed(if confirmed {
                self.release_after
            } else {
                self.release_after.min(PROVISIONAL_RELEASE_AFTER)
            });
            let age = renewed(&lease).map_or(SignedDuration::MAX, |t| now.duration_since(t));
            let key = (owner.clone(), uid.clone());
            let mut used = cached
                .entry(key.clone())
                .or_insert_with(|| in_use(&owner, uid.as_deref()))
                .contains(&host);
            if !used && age >= after {
                if !live.contains_key(&key) {
                    let hosts = hosts_used_live(client, &owner, uid.as_deref(), selector)
                        .await
                        .inspect_err(|e| tracing::warn!(namespace = owner, error = %e, "cannot look at the namespace's objects; its host claims wait for the next pass"))
                        .ok();
                    live.insert(key.clone(), hosts);
                }
                match live.get(&key) {
                    Some(Some(hosts)) => used = hosts.contains(&host),
                    _ => continue,
                }
            }
            let outcome = if used {
                if confirmed && age < signed(self.release_after) / 2 {
                    continue;
                }
                self.renew(lease, &owner).await.map(drop)
            } else if age >= after {
                self.release(&lease).await.map(|gone| {
                    if gone {
                        tracing::info!(namespace = owner, %host, confirmed, "host claim released: no object used it for a while");
                        released.push(host.clone());
                    }
                })
            } else {
                Ok(())
            };
            if let Err(e) = outcome {
                tracing::warn!(namespace = owner, %host, error = %e, "cannot renew or release the host claim; trying again next pass");
            }
        }
        Ok(released)
    }

    /// Deletes a claim unless it changed since it was listed; whether it did.
    async fn release(&self, lease: &Lease) -> Result<bool> {
        Ok(delete_unchanged(&self.api, &lease.metadata).await? == Deleted::Yes)
    }

    /// Renews and confirms a claim `owner` was seen using, unless it changed since it was
    /// listed; one made without the holder label (by an older version) gets it, so that it
    /// counts towards its namespace's claims.
    async fn renew(&self, lease: Lease, owner: &str) -> Result<()> {
        let name = lease.name_any();
        let mut lease = renewed_now(lease);
        let labels = lease.labels_mut();
        labels.insert(CLAIM_CONFIRMED_LABEL.to_owned(), "true".to_owned());
        labels.insert(CLAIM_HOLDER_LABEL.to_owned(), owner.to_owned());
        match self.api.replace(&name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.is_not_found() || s.is_conflict() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// The hosts `namespace` (of uid `uid`, when known) asks for, as the API server says now:
/// those of its annotated Ingresses and of its Pods' certificates. None when the namespace
/// is gone, is another of the same name, or no longer carries `selector` (sidecert serves
/// it no more).
async fn hosts_used_live(
    client: &Client,
    namespace: &str,
    uid: Option<&str>,
    selector: &str,
) -> Result<BTreeSet<String>> {
    // A list by name and label (the webhook may list Namespaces, not get them).
    let lp = ListParams::default()
        .labels(selector)
        .fields(&format!("metadata.name={namespace}"));
    let found = Api::<Namespace>::all(client.clone()).list_metadata(&lp).await?;
    let same = found
        .items
        .first()
        .is_some_and(|ns| uid.is_none_or(|uid| ns.metadata.uid.as_deref() == Some(uid)));
    if !same {
        return Ok(BTreeSet::new());
    }
    let mut hosts = BTreeSet::new();
    for ingress in Api::<Ingress>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|i| is_annotated(i))
    {
        hosts.extend(plan(ingress, None).hosts().into_iter().map(str::to_owned));
    }
    for pod in Api::<Pod>::namespaced(client.clone(), namespace)
        .list_metadata(&ListParams::default())
        .await?
        .items
    {
        hosts.extend(pod_hosts(&pod.metadata));
    }
    Ok(hosts)
}

/// The hosts of a Pod's certificates, from its status annotation.
pub fn pod_hosts(meta: &ObjectMeta) -> Vec<String> {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(annotations::CERTIFICATES))
        .and_then(|v| decode_certificates(v).ok())
        .into_iter()
        .flatten()
        .flat_map(|c| c.domains)
        .collect()
}
