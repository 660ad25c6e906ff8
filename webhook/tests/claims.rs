//! One owner per host, against the real API server: the first namespace to claim a host
//! owns it (a claim Lease in sidecert's namespace, created only if absent); a later claim
//! from another namespace, by Ingress or by Pod, gets a warning and nothing else; a dry run
//! claims nothing; a Namespace's `sidecert.io/allowed-domains` narrows what it may claim;
//! and the leader releases a claim no object uses any more.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{sync::Arc, time::Duration};

use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Namespace, Secret},
    networking::v1::Ingress,
};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use sidecert_contract::hosts::DomainPolicy;
use sidecert_e2e::{Plane, TestNamespace};
use sidecert_webhook::{
    Reviewer,
    kube::{
        NamespaceGate,
        claims::{Ask, HostClaims},
        namespaces::Served,
    },
    mutate::Snapshot,
};

mod common;
use common::{create_review, reviewer_over, warned};

fn ingress(namespace: &str, name: &str, secret: &str, hosts: &[&str]) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
        "metadata": {"name": name, "namespace": namespace,
            "annotations": {"sidecert.io/issue-temporary-certificate": "true"}},
        "spec": {
            "tls": [{"hosts": hosts, "secretName": secret}],
            "rules": hosts.iter().map(|h| json!({"host": h, "http": {"paths": [{"path": "/",
                "pathType": "Prefix", "backend": {"service": {"name": "web", "port": {"number": 80}}}}]}}))
                .collect::<Vec<_>>()
        }
    })
}

fn pod(secret: &str, host: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "p-", "annotations": {
            "sidecert.io/inject": "true", "sidecert.io/domains": host,
            "sidecert.io/secret-name": secret}},
        "spec": {"containers": [{"name": "app", "image": "example.invalid/app:1"}]}
    })
}

async fn respond(reviewer: &Reviewer, namespace: &str, object: Value, dry_run: bool) -> Value {
    common::respond(reviewer, &create_review(namespace, object, dry_run)).await
}

/// A reviewer with the namespace gate and host claims in `release`.
async fn reviewer(client: &kube::Client, release: &str, policy: DomainPolicy) -> Reviewer {
    let gate = NamespaceGate::start(client.clone(), "sidecert.io/injection=enabled", release);
    assert!(gate.wait_until_ready().await);
    reviewer_over(client, Arc::new(Snapshot::default()))
        .with_namespace_gate(gate)
        .with_host_claims(HostClaims::new(
            client.clone(),
            release,
            policy,
            Duration::from_secs(900),
        ))
}

async fn holder(release: &TestNamespace, host: &str) -> Option<String> {
    release
        .api::<Lease>()
        .get_opt(&format!("sidecert-host-{host}"))
        .await
        .unwrap()
        .and_then(|l| l.spec?.holder_identity)
}

/// The namespace's uid, as the API server has it.
async fn uid(client: &kube::Client, ns: &TestNamespace) -> String {
    Api::<Namespace>::all(client.clone())
        .get(ns.name())
        .await
        .unwrap()
        .metadata
        .uid
        .unwrap()
}

async fn has_secret(ns: &TestNamespace, name: &str) -> bool {
    ns.api::<Secret>().get_opt(name).await.unwrap().is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_namespace_to_claim_a_host_owns_it() {
    sidecert_webhook::install_crypto_provider();
    let plane = Plane::get().await.expect("local plane");
    let client = plane.client().await.unwrap();
    let release = plane.namespace("claims-release", false).await.unwrap();
    let a = plane.namespace("claims-a", true).await.unwrap();
    let b = plane.namespace("claims-b", true).await.unwrap();
    let reviewer = reviewer(&client, release.name(), DomainPolicy::default()).await;
    let host = format!("shop.{}.example", a.name());
    let other = format!("blog.{}.example", b.name());

    // A dry run only looks: no claim, no Secret.
    let dry = respond(
        &reviewer,
        a.name(),
        ingress(a.name(), "web", "web-tls", &[&host]),
        true,
    )
    .await;
    assert!(dry["patch"].is_string(), "{dry}");
    assert_eq!(holder(&release, &host).await, None);

    // A claims the host first: routed, its temporary Secret made, the claim held by A.
    let first = respond(
        &reviewer,
        a.name(),
        ingress(a.name(), "web", "web-tls", &[&host]),
        false,
    )
    .await;
    assert!(first["patch"].is_string(), "{first}");
    assert_eq!(holder(&release, &host).await.as_deref(), Some(a.name()));
    assert!(has_secret(&a, "web-tls").await);
    // A again (an update, another Ingress): still A's.
    let again = respond(
        &reviewer,
        a.name(),
        ingress(a.name(), "web2", "web2-tls", &[&host]),
        false,
    )
    .await;
    assert!(again["patch"].is_string(), "{again}");

    // B asks for the same host, by Ingress and by Pod: a warning, no path, no Secret, no
    // sidecar; B's other host in the same TLS entry goes on.
    let late = respond(
        &reviewer,
        b.name(),
        ingress(b.name(), "web", "steal-tls", &[&host]),
        false,
    )
    .await;
    assert!(late["patch"].is_null(), "{late}");
    assert!(warned(&late, "claimed by another namespace"), "{late}");
    assert!(!has_secret(&b, "steal-tls").await);
    let mixed = respond(
        &reviewer,
        b.name(),
        ingress(b.name(), "mixed", "mixed-tls", &[&host, &other]),
        false,
    )
    .await;
    assert!(warned(&mixed, "claimed by another namespace"), "{mixed}");
    assert!(mixed["patch"].is_string(), "B's own host is routed: {mixed}");
    let patch: k8s_openapi::ByteString = serde_json::from_value(mixed["patch"].clone()).unwrap();
    let patch = String::from_utf8(patch.0).unwrap();
    assert!(
        patch.contains("/spec/rules/1/"),
        "only B's own host (rule 1) is routed: {patch}"
    );
    assert!(!patch.contains("/spec/rules/0/"), "{patch}");
    assert_eq!(holder(&release, &other).await.as_deref(), Some(b.name()));
    let pod = respond(&reviewer, b.name(), pod("pod-steal-tls", &host), false).await;
    assert!(pod["patch"].is_null(), "{pod}");
    assert!(warned(&pod, "claimed by another namespace"), "{pod}");
    assert!(!has_secret(&b, "pod-steal-tls").await);
    assert_eq!(holder(&release, &host).await.as_deref(), Some(a.name()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_claims_only_its_allowed_domains() {
    sidecert_webhook::install_crypto_provider();
    let plane = Plane::get().await.expect("local plane");
    let client = plane.client().await.unwrap();
    let release = plane.namespace("claims-release", false).await.unwrap();
    let shop = plane.namespace("claims-shop", true).await.unwrap();
    let typo = plane.namespace("claims-typo", true).await.unwrap();
    let base = format!("{}.example", shop.name());
    let annotate = |ns: &str, value: &str| {
        let api = Api::<Namespace>::all(client.clone());
        let (ns, patch) = (
            ns.to_owned(),
            json!({"metadata": {"annotations": {"sidecert.io/allowed-domains": value}}}),
        );
        async move {
            api.patch(&ns, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .unwrap();
        }
    };
    annotate(shop.name(), &format!("*.{base}")).await;
    annotate(typo.name(), &format!("*.{base},not a domain")).await;
    // The chart's list: the cluster's own domains; the annotation only narrows it (the
    // apex and www.shop.example are the cluster's, not the namespace's).
    let cluster = format!("{base},*.{base},a.b.{base},www.shop.example");
    let policy = DomainPolicy {
        cluster: Some(sidecert_contract::hosts::AllowedDomains::parse(&cluster).unwrap()),
        namespace: None,
    };
    let reviewer = reviewer(&client, release.name(), policy).await;

    let ok = format!("www.{base}");
    let allowed = respond(
        &reviewer,
        shop.name(),
        ingress(shop.name(), "a", "a-tls", &[&ok]),
        false,
    )
    .await;
    assert!(allowed["patch"].is_string(), "{allowed}");
    assert_eq!(holder(&release, &ok).await.as_deref(), Some(shop.name()));

    // Outside the annotation (the apex, two labels down, another domain): refused, unclaimed.
    for host in [base.clone(), format!("a.b.{base}"), "www.shop.example".to_owned()] {
        let out = respond(
            &reviewer,
            shop.name(),
            ingress(shop.name(), "b", "b-tls", &[&host]),
            false,
        )
        .await;
        assert!(out["patch"].is_null(), "{host}: {out}");
        assert!(warned(&out, "is not among the domains"), "{host}: {out}");
        assert_eq!(holder(&release, &host).await, None, "{host}");
    }
    // An invalid annotation allows nothing, not even what both lists allow.
    let host = format!("www.{base}");
    assert_eq!(holder(&release, &host).await.as_deref(), Some(shop.name()));
    let host = format!("api.{base}");
    let out = respond(&reviewer, typo.name(), pod("t-tls", &host), false).await;
    assert!(out["patch"].is_null(), "{out}");
    assert!(warned(&out, "annotation is invalid"), "{out}");
    assert_eq!(holder(&release, &host).await, None);
}

/// Sets the claim's last renewal `minutes` ago (as the admin; the webhook never backdates).
async fn age(release: &TestNamespace, host: &str, minutes: i64) {
    let when = k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_mins(minutes);
    let when = k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(when);
    let patch = json!({"spec": {"renewTime": when}});
    release
        .api::<Lease>()
        .patch(
            &format!("sidecert-host-{host}"),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .unwrap();
}

async fn lease(release: &TestNamespace, host: &str) -> Lease {
    release
        .api::<Lease>()
        .get(&format!("sidecert-host-{host}"))
        .await
        .unwrap()
}

fn confirmed(lease: &Lease) -> bool {
    lease
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("sidecert.io/claim-confirmed"))
        .is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_no_object_uses_is_released_and_one_in_use_is_kept() {
    sidecert_webhook::install_crypto_provider();
    let plane = Plane::get().await.expect("local plane");
    let client = plane.client().await.unwrap();
    let release = plane.namespace("claims-release", false).await.unwrap();
    let a = plane.namespace("claims-sweep", true).await.unwrap();
    let claims = HostClaims::new(
        client.clone(),
        release.name(),
        DomainPolicy::default(),
        Duration::from_secs(3600),
    );
    let selector = "sidecert.io/injection=enabled";
    let used = format!("used.{}.example", a.name());
    let idle = format!("idle.{}.example", a.name());
    let fresh = format!("fresh.{}.example", a.name());
    let a_uid = uid(&client, &a).await;
    let owner = Served {
        uid: Some(a_uid.clone()),
        allowed_domains: None,
    };
    let claimed = claims
        .claim(
            a.name(),
            Some(&owner),
            &[&used, &idle, &fresh],
            Ask::Review,
            Duration::from_secs(4),
        )
        .await;
    assert_eq!(claimed.owned.len(), 3, "{claimed:?}");
    // A namespace of the same name but another uid (deleted and made again) holds nothing.
    let impostor = Served {
        uid: Some("another-uid".to_owned()),
        allowed_domains: None,
    };
    let stolen = claims
        .claim(
            a.name(),
            Some(&impostor),
            &[&used],
            Ask::Review,
            Duration::from_secs(4),
        )
        .await;
    assert!(stolen.owned.is_empty(), "{stolen:?}");
    // Only `used` has a stored object: an annotated Ingress (the caches say nothing of it).
    let object: Ingress = serde_json::from_value(ingress(a.name(), "used", "used-tls", &[&used])).unwrap();
    a.api::<Ingress>()
        .create(&PostParams::default(), &object)
        .await
        .unwrap();

    // Never seen in use (a review whose object may not exist): released after two minutes
    // unused, not after the hour; a fresh one stays; the used one is confirmed.
    age(&release, &idle, 10).await;
    age(&release, &used, 10).await;
    let released = claims
        .sweep(&client, selector, |_, _| Default::default())
        .await
        .unwrap();
    assert_eq!(released.as_slice(), std::slice::from_ref(&idle));
    assert_eq!(holder(&release, &idle).await, None);
    assert_eq!(holder(&release, &fresh).await.as_deref(), Some(a.name()));
    let kept = lease(&release, &used).await;
    assert!(confirmed(&kept), "{kept:?}");

    // Confirmed: unused for 30 minutes, an hour's delay keeps it, untouched.
    a.api::<Ingress>()
        .delete("used", &Default::default())
        .await
        .unwrap();
    age(&release, &used, 30).await;
    let before = lease(&release, &used).await.metadata.resource_version;
    assert!(
        claims
            .sweep(&client, selector, |_, _| Default::default())
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(lease(&release, &used).await.metadata.resource_version, before);
    // The reconciler acts on stored objects: it relies on the claim without renewing it.
    let reconciled = claims
        .claim(
            a.name(),
            Some(&owner),
            &[&used],
            Ask::Reconcile,
            Duration::from_secs(4),
        )
        .await;
    assert!(reconciled.owned.contains(&used), "{reconciled:?}");
    assert_eq!(lease(&release, &used).await.metadata.resource_version, before);
    // A review that relies on a claim that old renews it, so that a sweep that looked
    // before cannot delete it (its delete is conditional on the version it saw).
    let again = claims
        .claim(
            a.name(),
            Some(&owner),
            &[&used],
            Ask::Review,
            Duration::from_secs(4),
        )
        .await;
    assert!(again.owned.contains(&used), "{again:?}");
    let renewed = lease(&release, &used).await;
    assert_ne!(renewed.metadata.resource_version, before, "renewed by the review");

    // Once the namespace is no longer served, its claims go like unused ones.
    let unlabel = json!({"metadata": {"labels": {"sidecert.io/injection": null}}});
    Api::<Namespace>::all(client.clone())
        .patch(a.name(), &PatchParams::default(), &Patch::Merge(&unlabel))
        .await
        .unwrap();
    let object: Ingress = serde_json::from_value(ingress(a.name(), "back", "back-tls", &[&used])).unwrap();
    a.api::<Ingress>()
        .create(&PostParams::default(), &object)
        .await
        .unwrap();
    age(&release, &used, 90).await;
    let released = claims
        .sweep(&client, selector, |_, _| Default::default())
        .await
        .unwrap();
    assert!(released.contains(&used), "{released:?}");

    // Released, a host is free for the next namespace to claim; a held one is not.
    let b = plane.namespace("claims-next", true).await.unwrap();
    let b_uid = uid(&client, &b).await;
    let next = claims
        .claim(
            b.name(),
            Some(&Served {
                uid: Some(b_uid),
                allowed_domains: None,
            }),
            &[&idle, &fresh],
            Ask::Review,
            Duration::from_secs(4),
        )
        .await;
    assert!(
        next.owned.contains(&idle) && !next.owned.contains(&fresh),
        "{next:?}"
    );
}

/// A claim Lease written by the admin: `holder`, the namespace uid `uid`, the holder label
/// only if `labelled` (older versions made claims without it), renewed `minutes` ago.
fn raw_claim(host: &str, holder: &str, uid: &str, labelled: bool, minutes: i64) -> Lease {
    let when = k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_mins(minutes);
    let mut labels = json!({"app.kubernetes.io/managed-by": "sidecert", "sidecert.io/claim": "host"});
    if labelled {
        labels["sidecert.io/claim-holder"] = holder.into();
    }
    serde_json::from_value(json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": format!("sidecert-host-{host}"), "labels": labels,
            "annotations": {"sidecert.io/host": host, "sidecert.io/namespace-uid": uid}},
        "spec": {"holderIdentity": holder,
            "renewTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(when)}
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_goes_on_past_a_claim_it_cannot_look_at() {
    sidecert_webhook::install_crypto_provider();
    let plane = Plane::get().await.expect("local plane");
    let client = plane.client().await.unwrap();
    let release = plane.namespace("claims-release", false).await.unwrap();
    let a = plane.namespace("claims-pass", true).await.unwrap();
    let a_uid = uid(&client, &a).await;
    let claims = HostClaims::new(
        client.clone(),
        release.name(),
        DomainPolicy::default(),
        Duration::from_secs(3600),
    );
    let leases = release.api::<Lease>();
    // Listed first (by name), a claim whose holder no list can select: the look at its
    // namespace fails.
    let broken = "0broken.example";
    leases
        .create(&PostParams::default(), &raw_claim(broken, "x,y", "u", false, 10))
        .await
        .unwrap();
    // A claim from before the holder label, in use: renewed, and labelled on the way.
    let legacy = format!("legacy.{}.example", a.name());
    leases
        .create(
            &PostParams::default(),
            &raw_claim(&legacy, a.name(), &a_uid, false, 40),
        )
        .await
        .unwrap();
    let idle = format!("idle.{}.example", a.name());
    let served = Served {
        uid: Some(a_uid.clone()),
        allowed_domains: None,
    };
    let claimed = claims
        .claim(
            a.name(),
            Some(&served),
            &[&idle],
            Ask::Review,
            Duration::from_secs(4),
        )
        .await;
    assert!(claimed.owned.contains(&idle), "{claimed:?}");
    age(&release, &idle, 10).await;

    let in_use = |ns: &str, _: Option<&str>| {
        if ns == a.name() {
            std::iter::once(legacy.clone()).collect()
        } else {
            Default::default()
        }
    };
    let released = claims
        .sweep(&client, "sidecert.io/injection=enabled", in_use)
        .await
        .expect("one claim that cannot be looked at does not end the pass");
    assert_eq!(released.as_slice(), std::slice::from_ref(&idle));
    assert_eq!(
        holder(&release, broken).await.as_deref(),
        Some("x,y"),
        "left for the next pass"
    );
    let renewed = lease(&release, &legacy).await;
    assert!(confirmed(&renewed), "{renewed:?}");
    assert_eq!(
        renewed
            .metadata
            .labels
            .unwrap_or_default()
            .get("sidecert.io/claim-holder")
            .map(String::as_str),
        Some(a.name()),
        "the holder label is added, so the claim counts towards the namespace's cap"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_at_its_claim_cap_gets_no_new_host_even_on_a_dry_run() {
    use futures::StreamExt;
    sidecert_webhook::install_crypto_provider();
    let plane = Plane::get().await.expect("local plane");
    let client = plane.client().await.unwrap();
    let release = plane.namespace("claims-release", false).await.unwrap();
    let a = plane.namespace("claims-cap", true).await.unwrap();
    let a_uid = uid(&client, &a).await;
    let claims = HostClaims::new(
        client.clone(),
        release.name(),
        DomainPolicy::default(),
        Duration::from_secs(900),
    );
    let max = sidecert_webhook::mutate::context::MAX_CLAIMS_PER_NAMESPACE;
    // One short of the cap, plus a few a deleted namespace of the same name left behind
    // (another uid): those are not this namespace's.
    let leases = release.api::<Lease>();
    let made: Vec<_> = futures::stream::iter((0..max - 1 + 5).map(|i| {
        let leases = leases.clone();
        let uid = if i < max - 1 {
            a_uid.clone()
        } else {
            "gone-uid".to_owned()
        };
        let host = format!("h{i}.{}.example", a.name());
        let lease = raw_claim(&host, a.name(), &uid, true, 0);
        async move { leases.create(&PostParams::default(), &lease).await }
    }))
    .buffer_unordered(32)
    .collect()
    .await;
    assert!(made.iter().all(Result::is_ok));
    let served = Served {
        uid: Some(a_uid.clone()),
        allowed_domains: None,
    };
    let last = format!("last.{}.example", a.name());
    let got = claims
        .claim(
            a.name(),
            Some(&served),
            &[&last],
            Ask::Review,
            Duration::from_secs(4),
        )
        .await;
    assert!(
        got.owned.contains(&last),
        "the stale claims do not count: {got:?}"
    );

    // At the cap: a dry run says what the review would get.
    let over = format!("over.{}.example", a.name());
    for ask in [Ask::DryRun, Ask::Review] {
        let got = claims
            .claim(a.name(), Some(&served), &[&over], ask, Duration::from_secs(4))
            .await;
        assert_eq!(
            got.left_out.get(&over),
            Some(&sidecert_webhook::mutate::context::HostStanding::TooManyClaims),
            "{ask:?}: {got:?}"
        );
    }
    assert_eq!(holder(&release, &over).await, None);
}
