//! `sidecert-sidecar run` against the plane's API server and Pebble.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    process::{Command, Stdio},
    time::Duration,
};

use common::*;
use k8s_openapi::{
    ByteString,
    api::{
        coordination::v1::Lease,
        core::v1::{Event, Secret},
    },
};
use kube::{
    Api,
    api::{ListParams, ObjectMeta, PostParams},
};
use sidecert_contract::{
    CertificateSpec, KeyAlgorithm, MANAGED_BY, MANAGED_BY_LABEL, PodIdentity, SidecarConfig, annotations,
};
use sidecert_e2e::Plane;
use sidecert_sidecar::{certificate::schedule::MAX_FAILED_VALIDATIONS_PER_HOUR, run::RunOptions};
use tokio_util::sync::CancellationToken;

fn options(
    plane: &Plane,
    ns: &str,
    spec: &CertificateSpec,
    ip: Ipv4Addr,
    profile: Option<&str>,
    ari: bool,
) -> RunOptions {
    RunOptions {
        config: SidecarConfig {
            certificates: vec![spec.clone()],
            acme_server: plane.pebble_directory().to_owned(),
            acme_email: Some("ops@example.com".into()),
            acme_profile: profile.map(str::to_owned),
            acme_ca_bundle: Some(plane.pebble_ca_pem().to_owned()),
            eab_secret: None,
            key_algorithm: KeyAlgorithm::EcdsaP256,
            reload_url: None,
            http01_port: 8089,
            metrics_port: 9089,
        },
        pod: PodIdentity {
            name: Some(format!("pod-{ip}").replace('.', "-")),
            namespace: Some(ns.to_owned()),
            uid: None,
            ip: Some(ip.to_string()),
        },
        namespace: ns.to_owned(),
        http01_listen: SocketAddr::from((ip, 8089)),
        metrics_listen: SocketAddr::from((ip, 9089)),
        cert_dir: None,
        ari,
        retry_base: Duration::from_secs(2),
        retry_cap: Duration::from_secs(30),
        lease_duration: Duration::from_secs(6),
        route_wait: Duration::from_secs(60),
        route_settle: Duration::from_secs(1),
        reload_delay: Duration::ZERO,
    }
}

/// [`options`] against a private Pebble (default profile), retrying after 1 s.
fn own_pebble_options(
    plane: &Plane,
    ns: &str,
    spec: &CertificateSpec,
    ip: Ipv4Addr,
    pebble: &OwnPebble,
) -> RunOptions {
    let mut opts = options(plane, ns, spec, ip, Some("default"), true);
    opts.config.acme_server = pebble.directory.clone();
    opts.config.acme_ca_bundle = Some(pebble.ca_pem());
    opts.retry_base = Duration::from_secs(1);
    opts
}

struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<sidecert_sidecar::Result<()>>,
    metrics: String,
}

impl Running {
    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("run stops within 5 s")
            .unwrap()
            .unwrap();
    }
}

async fn start(opts: RunOptions, client: kube::Client) -> Running {
    let stop = CancellationToken::new();
    let metrics = opts.metrics_listen.to_string();
    let task = tokio::spawn(sidecert_sidecar::run::run(opts, client, stop.clone()));
    Running { stop, task, metrics }
}

fn temporary_secret(name: &str, domains: &[String]) -> Secret {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(domains.to_vec())
        .unwrap()
        .self_signed(&key)
        .unwrap();
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            annotations: Some(BTreeMap::from([(
                annotations::TEMPORARY.to_owned(),
                "true".to_owned(),
            )])),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            ("tls.crt".into(), ByteString(cert.pem().into_bytes())),
            ("tls.key".into(), ByteString(key.serialize_pem().into_bytes())),
        ])),
        ..Default::default()
    }
}

/// Waits until the Secret holds a real certificate whose not-after differs from `not`.
async fn wait_issued(api: &Api<Secret>, name: &str, not: Option<&str>, timeout: Duration) -> Secret {
    wait_until("a real certificate in the Secret", timeout, || async {
        let s = api.get_opt(name).await.ok()??;
        let a = s.metadata.annotations.clone().unwrap_or_default();
        let na = a.get(annotations::NOT_AFTER)?;
        (!a.contains_key(annotations::TEMPORARY) && Some(na.as_str()) != not).then_some(s)
    })
    .await
}

fn crt(s: &Secret) -> String {
    String::from_utf8(s.data.as_ref().unwrap()["tls.crt"].0.clone()).unwrap()
}

fn not_after(s: &Secret) -> String {
    s.metadata.annotations.as_ref().unwrap()[annotations::NOT_AFTER].clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn run_replaces_the_temporary_secret_and_a_restart_orders_nothing() {
    init();
    let plane = Plane::get().await.unwrap();
    let ns = plane.namespace("sc-run", false).await.unwrap();
    let ip = Ipv4Addr::new(127, 0, 0, 51);
    let domains = vec![domain("run-a"), domain("run-b")];
    for d in &domains {
        plane.add_a(d, ip).await.unwrap();
    }
    let spec = CertificateSpec::new("web-tls", &domains).unwrap();
    let secrets: Api<Secret> = ns.api();
    secrets
        .create(
            &PostParams::default(),
            &temporary_secret("web-tls", &spec.domains),
        )
        .await
        .unwrap();

    let r = start(
        options(plane, ns.name(), &spec, ip, Some("default"), true),
        ns.client(),
    )
    .await;
    let s = wait_issued(&secrets, "web-tls", None, Duration::from_secs(60)).await;
    assert_eq!(s.type_.as_deref(), Some("kubernetes.io/tls"));
    assert_chains_to(&crt(&s), &plane.pebble_root_pem().await.unwrap(), &spec.domains);
    let key = String::from_utf8(s.data.as_ref().unwrap()["tls.key"].0.clone()).unwrap();
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
    let a = s.metadata.annotations.clone().unwrap();
    assert_eq!(a[annotations::DOMAINS_ON_SECRET], spec.domains.join(","));
    assert_eq!(a[annotations::ISSUER_URL], plane.pebble_directory());
    assert!(a.contains_key(annotations::RENEW_AT));
    // Ready once this replica's Secret watch has seen its own write.
    let m = wait_until("sidecert_ready", Duration::from_secs(10), || async {
        let m = scrape(&r.metrics).await;
        (sample(&m, "sidecert_ready{secret=\"web-tls\"}") == 1.0).then_some(m)
    })
    .await;
    assert_eq!(sample(&m, "sidecert_orders_total{result=\"issued\"}"), 1.0, "{m}");
    assert_eq!(sample(&m, "sidecert_leader{secret=\"web-tls\"}"), 1.0);
    assert!(
        sample(
            &m,
            "sidecert_acme_requests_total{endpoint=\"order\",status=\"201\"}"
        ) >= 1.0,
        "{m}"
    );
    let events: Api<Event> = ns.api();
    let issued_ev = wait_until("an Issued Event on the Pod", Duration::from_secs(10), || async {
        let evs = events.list(&ListParams::default()).await.ok()?;
        evs.items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("Issued"))
    })
    .await;
    assert_eq!(issued_ev.involved_object.kind.as_deref(), Some("Pod"));
    r.stop().await;
    // Stopping released the Lease.
    let lease: Lease = ns.api().get(&spec.lease_name()).await.unwrap();
    let holder = lease.spec.and_then(|s| s.holder_identity).unwrap_or_default();
    assert!(holder.is_empty(), "Lease still held by {holder}");

    // Restart: the Secret holds a valid certificate, nothing is ordered.
    let rv = s.metadata.resource_version.clone();
    let r = start(
        options(plane, ns.name(), &spec, ip, Some("default"), true),
        ns.client(),
    )
    .await;
    wait_until(
        "leader and ready after restart",
        Duration::from_secs(30),
        || async {
            let m = scrape(&r.metrics).await;
            (sample(&m, "sidecert_leader{secret=\"web-tls\"}") == 1.0
                && sample(&m, "sidecert_ready{secret=\"web-tls\"}") == 1.0)
                .then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let m = scrape(&r.metrics).await;
    assert_eq!(sample(&m, "sidecert_orders_total{result=\"issued\"}"), 0.0, "{m}");
    assert_eq!(
        secrets.get("web-tls").await.unwrap().metadata.resource_version,
        rv
    );
    r.stop().await;
    ns.cleanup().await.unwrap();
}

async fn renewal(ari: bool, ip: Ipv4Addr) {
    init();
    let plane = Plane::get().await.unwrap();
    let ns = plane
        .namespace(if ari { "sc-ari" } else { "sc-noari" }, false)
        .await
        .unwrap();
    let d = domain("renew");
    plane.add_a(&d, ip).await.unwrap();
    let spec = CertificateSpec::new("short-tls", [&d]).unwrap();
    let secrets: Api<Secret> = ns.api();
    let mut opts = options(plane, ns.name(), &spec, ip, Some("shortlived"), ari);
    let dir = temp_dir("renew");
    opts.cert_dir = Some(dir.clone());
    let (reload_url, reloads) = reload_target(ip).await;
    opts.config.reload_url = Some(reload_url);
    let r = start(opts, ns.client()).await;
    let first = wait_issued(&secrets, "short-tls", None, Duration::from_secs(60)).await;
    let second = wait_issued(
        &secrets,
        "short-tls",
        Some(&not_after(&first)),
        Duration::from_secs(150),
    )
    .await;
    assert_ne!(crt(&first), crt(&second));
    assert_chains_to(
        &crt(&second),
        &plane.pebble_root_pem().await.unwrap(),
        &spec.domains,
    );
    let on_disk = wait_until("the directory follows", Duration::from_secs(10), || async {
        let c = std::fs::read_to_string(dir.join("tls.crt")).ok()?;
        (c == crt(&second)).then_some(c)
    })
    .await;
    assert!(!on_disk.is_empty());
    wait_until(
        "the reload URL is called for each certificate",
        Duration::from_secs(10),
        || async { (reloads.load(std::sync::atomic::Ordering::SeqCst) >= 2).then_some(()) },
    )
    .await;
    let m = scrape(&r.metrics).await;
    assert!(
        sample(&m, "sidecert_orders_total{result=\"issued\"}") >= 2.0,
        "{m}"
    );
    wait_until(
        "sidecert_ready once the Secret holds it",
        Duration::from_secs(10),
        || async {
            let m = scrape(&r.metrics).await;
            (sample(&m, "sidecert_ready{secret=\"short-tls\"}") == 1.0).then_some(())
        },
    )
    .await;
    let events: Api<Event> = ns.api();
    wait_until(
        "an Issued and a Renewed Event",
        Duration::from_secs(10),
        || async {
            let evs = events.list(&ListParams::default()).await.ok()?;
            let has = |reason: &str| evs.items.iter().any(|e| e.reason.as_deref() == Some(reason));
            (has("Issued") && has("Renewed")).then_some(())
        },
    )
    .await;
    if ari {
        assert!(
            sample(
                &m,
                "sidecert_acme_requests_total{endpoint=\"renewal-info\",status=\"200\"}"
            ) >= 1.0,
            "{m}"
        );
    } else {
        assert_eq!(
            sample(
                &m,
                "sidecert_acme_requests_total{endpoint=\"renewal-info\",status=\"200\"}"
            ),
            0.0,
            "{m}"
        );
    }
    r.stop().await;
    ns.cleanup().await.unwrap();
}

/// A tiny HTTP server on `ip`:8080 that counts POSTs to /-/reload.
async fn reload_target(ip: Ipv4Addr) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind((ip, 8080)).await.unwrap();
    let c = count.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let n = sock.read(&mut buf).await.unwrap_or(0);
            if buf[..n].starts_with(b"POST /-/reload") {
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            let _ = sock
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .await;
        }
    });
    (format!("http://{ip}:8080/-/reload"), count)
}

#[tokio::test(flavor = "multi_thread")]
async fn renewal_with_ari() {
    renewal(true, Ipv4Addr::new(127, 0, 0, 52)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn renewal_without_ari() {
    renewal(false, Ipv4Addr::new(127, 0, 0, 53)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_challenge_backs_off_with_event_and_metric() {
    init();
    let plane = Plane::get().await.unwrap();
    let ns = plane.namespace("sc-fail", false).await.unwrap();
    let ip = Ipv4Addr::new(127, 0, 0, 54);
    let d = domain("fail");
    // Validation goes to an address where nothing listens.
    plane.add_a(&d, Ipv4Addr::new(127, 0, 0, 99)).await.unwrap();
    let spec = CertificateSpec::new("fail-tls", [&d]).unwrap();
    let opts = options(plane, ns.name(), &spec, ip, None, true);
    let pod = opts.pod.name.clone().unwrap();
    let r = start(opts, ns.client()).await;
    // Retry base 2 s: attempts at ~0, +1..2, +2..4, +4..8 s, so at most four in 12 s: never
    // a tight loop, and below the CA's five failed validations an hour (a fifth would make
    // the new holder below wait an hour, rightly).
    tokio::time::sleep(Duration::from_secs(12)).await;
    let m = scrape(&r.metrics).await;
    let failed = sample(&m, "sidecert_orders_total{result=\"validation_failed\"}");
    assert!(
        (1.0..=4.0).contains(&failed),
        "{failed} failed orders in 12 s\n{m}"
    );
    assert!(
        sample(
            &m,
            "sidecert_failures_total{kind=\"validation\",secret=\"fail-tls\"}"
        ) >= 1.0,
        "{m}"
    );
    // The Event is published after the counter moves.
    let events: Api<Event> = ns.api();
    let note = wait_until("a Failed Event", Duration::from_secs(10), || async {
        let evs = events.list(&ListParams::default()).await.ok()?;
        evs.items
            .into_iter()
            .find(|e| {
                e.reason.as_deref() == Some("Failed")
                    && e.involved_object.name.as_deref() == Some(pod.as_str())
            })
            .and_then(|e| e.message)
    })
    .await;
    assert!(
        note.contains("connection"),
        "the Failed Event lacks the CA's detail: {note}"
    );
    r.stop().await;

    // The failures are on the Lease, so a new holder (here: the Pod restarted) neither
    // orders before the recorded backoff ends nor forgets the failed validations.
    let leases: Api<Lease> = ns.api();
    let lease = leases.get(&spec.lease_name()).await.unwrap();
    let record: serde_json::Value =
        serde_json::from_str(&lease.metadata.annotations.unwrap()["sidecert.io/order-failures"]).unwrap();
    // At least what was scraped (an order may have ended since).
    let recorded = record["failures"].as_f64().unwrap();
    assert!(recorded >= failed, "{record}");
    assert_eq!(
        record["validations"][&d].as_array().map(Vec::len),
        Some(recorded as usize),
        "{record}"
    );
    let not_before = record["notBefore"].as_i64().unwrap();
    let mut opts = options(plane, ns.name(), &spec, ip, None, true);
    opts.retry_cap = Duration::from_secs(60);
    let r = start(opts, ns.client()).await;
    if recorded as usize >= MAX_FAILED_VALIDATIONS_PER_HOUR {
        // A fifth attempt ended between the scrape and the stop: the hourly limit holds the
        // new holder back for an hour from the first failure.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let m = scrape(&r.metrics).await;
        assert_eq!(
            sample(
                &m,
                "sidecert_acme_requests_total{endpoint=\"order\",status=\"201\"}"
            ),
            0.0,
            "ordered past the hourly validation limit: {record}\n{m}"
        );
        r.stop().await;
        ns.cleanup().await.unwrap();
        return;
    }
    // The moment of its first newOrder (201 Created), seen within 300 ms.
    let at = wait_until("the new holder's first order", Duration::from_secs(90), || {
        let metrics = r.metrics.clone();
        async move {
            let m = scrape(&metrics).await;
            (sample(
                &m,
                "sidecert_acme_requests_total{endpoint=\"order\",status=\"201\"}",
            ) >= 1.0)
                .then(time::OffsetDateTime::now_utc)
        }
    })
    .await;
    assert!(
        at.unix_timestamp() >= not_before,
        "ordered at {at}, before the recorded {not_before}"
    );
    r.stop().await;
    ns.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn ca_down_at_start_then_up_issues_with_bounded_attempts() {
    init();
    let plane = Plane::get().await.unwrap();
    let ns = plane.namespace("sc-cadown", false).await.unwrap();
    let mut pebble = OwnPebble::start(14120, &[], false);
    let ip = Ipv4Addr::new(127, 0, 0, 55);
    let d = domain("cadown");
    add_a(&pebble.challtestsrv, &d, ip).await;
    let spec = CertificateSpec::new("cadown-tls", [&d]).unwrap();
    let opts = own_pebble_options(plane, ns.name(), &spec, ip, &pebble);
    let r = start(opts, ns.client()).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    pebble.start_pebble(&[], 14122);
    let secrets: Api<Secret> = ns.api();
    let s = wait_issued(&secrets, "cadown-tls", None, Duration::from_secs(60)).await;
    assert_chains_to(&crt(&s), &pebble.root_pem().await, &spec.domains);
    let m = scrape(&r.metrics).await;
    let failed = sample(&m, "sidecert_orders_total{result=\"failed\"}");
    assert!((1.0..=8.0).contains(&failed), "{failed} failed attempts\n{m}");
    r.stop().await;
    ns.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn eab_credentials_come_from_a_secret() {
    init();
    let plane = Plane::get().await.unwrap();
    let ns = plane.namespace("sc-eab", false).await.unwrap();
    let hmac = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";
    let pebble = OwnPebble::start_requiring_eab(14140, &[("kid-run", hmac)]);
    pebble.wait_ready().await;
    let ip = Ipv4Addr::new(127, 0, 0, 61);
    let d = domain("eab-run");
    add_a(&pebble.challtestsrv, &d, ip).await;
    let secrets: Api<Secret> = ns.api();
    let eab = Secret {
        metadata: ObjectMeta {
            name: Some("acme-eab".into()),
            ..Default::default()
        },
        string_data: Some(BTreeMap::from([
            ("keyId".into(), "kid-run".into()),
            ("hmacKey".into(), hmac.into()),
        ])),
        ..Default::default()
    };
    secrets.create(&PostParams::default(), &eab).await.unwrap();
    let spec = CertificateSpec::new("eab-tls", [&d]).unwrap();
    let mut opts = own_pebble_options(plane, ns.name(), &spec, ip, &pebble);
    opts.config.eab_secret = Some("acme-eab".into());
    let r = start(opts, ns.client()).await;
    let s = wait_issued(&secrets, "eab-tls", None, Duration::from_secs(60)).await;
    assert_chains_to(&crt(&s), &pebble.root_pem().await, &spec.domains);
    r.stop().await;
    ns.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_foreign_or_mismatched_certificate_in_the_secret_is_replaced() {
    init();
    let plane = Plane::get().await.unwrap();
    let ns = plane.namespace("sc-foreign", false).await.unwrap();
    let ip = Ipv4Addr::new(127, 0, 0, 62);
    let (foreign, mismatched) = (domain("foreign"), domain("mismatch"));
    for d in [&foreign, &mismatched] {
        plane.add_a(d, ip).await.unwrap();
    }
    let secrets: Api<Secret> = ns.api();
    // Valid, not temporary: one says another ACME server issued it, the other holds a key
    // that is not its certificate's.
    // Both are sidecert's (its label), as a Secret it wrote before is.
    let sidecerts = || {
        Some(BTreeMap::from([(
            MANAGED_BY_LABEL.to_owned(),
            MANAGED_BY.to_owned(),
        )]))
    };
    let mut from_elsewhere = temporary_secret("foreign-tls", std::slice::from_ref(&foreign));
    from_elsewhere.metadata.labels = sidecerts();
    from_elsewhere.metadata.annotations = Some(BTreeMap::from([(
        annotations::ISSUER_URL.to_owned(),
        "https://acme-staging.example/directory".to_owned(),
    )]));
    let mut broken = temporary_secret("mismatch-tls", std::slice::from_ref(&mismatched));
    broken.metadata.labels = sidecerts();
    broken.metadata.annotations = Some(BTreeMap::from([(
        annotations::ISSUER_URL.to_owned(),
        plane.pebble_directory().to_owned(),
    )]));
    let other_key = rcgen::KeyPair::generate().unwrap().serialize_pem();
    broken
        .data
        .as_mut()
        .unwrap()
        .insert("tls.key".into(), ByteString(other_key.into_bytes()));
    for s in [&from_elsewhere, &broken] {
        secrets.create(&PostParams::default(), s).await.unwrap();
    }
    let specs = [
        CertificateSpec::new("foreign-tls", [&foreign]).unwrap(),
        CertificateSpec::new("mismatch-tls", [&mismatched]).unwrap(),
    ];
    let mut opts = options(plane, ns.name(), &specs[0], ip, Some("default"), true);
    opts.config.certificates = specs.to_vec();
    let r = start(opts, ns.client()).await;
    let root = plane.pebble_root_pem().await.unwrap();
    for spec in &specs {
        let s = wait_issued(&secrets, &spec.secret_name, None, Duration::from_secs(60)).await;
        assert_chains_to(&crt(&s), &root, &spec.domains);
        let a = s.metadata.annotations.as_ref().unwrap();
        assert_eq!(a[annotations::ISSUER_URL], plane.pebble_directory());
    }
    // And it stays: the old certificate (valid longer than the new one) is neither taken
    // back from the Secret nor restored into it (the restore guard is 30 s); no reorder.
    tokio::time::sleep(Duration::from_secs(35)).await;
    for spec in &specs {
        let s = secrets.get(&spec.secret_name).await.unwrap();
        assert_chains_to(&crt(&s), &root, &spec.domains);
    }
    let m = scrape(&r.metrics).await;
    assert_eq!(sample(&m, "sidecert_orders_total{result=\"issued\"}"), 2.0, "{m}");
    r.stop().await;
    ns.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_account_the_ca_forgot_is_replaced() {
    init();
    let plane = Plane::get().await.unwrap();
    let ns = plane.namespace("sc-forgot", false).await.unwrap();
    let mut pebble = OwnPebble::start(14150, &[], true);
    pebble.wait_ready().await;
    let ip = Ipv4Addr::new(127, 0, 0, 63);
    let (first, second) = (domain("forgot-a"), domain("forgot-b"));
    for d in [&first, &second] {
        add_a(&pebble.challtestsrv, d, ip).await;
    }
    let run =
        |spec: &CertificateSpec, pebble: &OwnPebble| own_pebble_options(plane, ns.name(), spec, ip, pebble);
    let secrets: Api<Secret> = ns.api();
    let a = CertificateSpec::new("forgot-a-tls", [&first]).unwrap();
    let r = start(run(&a, &pebble), ns.client()).await;
    wait_issued(&secrets, "forgot-a-tls", None, Duration::from_secs(60)).await;
    r.stop().await;
    let account_name = sidecert_contract::account_secret_name(&pebble.directory, Some("ops@example.com"));
    let before = secrets.get(&account_name).await.unwrap();

    // A new Pebble knows no account: the stored one is refused, replaced, and used.
    pebble.restart_pebble(14152);
    pebble.wait_ready().await;
    let b = CertificateSpec::new("forgot-b-tls", [&second]).unwrap();
    let r = start(run(&b, &pebble), ns.client()).await;
    let s = wait_issued(&secrets, "forgot-b-tls", None, Duration::from_secs(60)).await;
    assert_chains_to(&crt(&s), &pebble.root_pem().await, &b.domains);
    let after = secrets.get(&account_name).await.unwrap();
    let creds = |s: &Secret| s.data.as_ref().unwrap()["credentials.json"].0.clone();
    assert_eq!(
        before.metadata.uid, after.metadata.uid,
        "replaced in place (update, no delete)"
    );
    assert_ne!(creds(&before), creds(&after), "a new account in the Secret");
    r.stop().await;
    ns.cleanup().await.unwrap();
}

struct Replica {
    _proc: Proc,
    metrics: String,
}

fn spawn_replica(plane: &Plane, ns: &str, spec: &CertificateSpec, ip: Ipv4Addr) -> Replica {
    let metrics = format!("{ip}:9089");
    let child = Command::new(bin())
        .arg("run")
        .args(["--metrics-listen", &metrics])
        .env("KUBECONFIG", plane.kubeconfig())
        .env(
            sidecert_contract::env::CERTIFICATES,
            sidecert_contract::encode_certificates(std::slice::from_ref(spec)),
        )
        .env(sidecert_contract::env::ACME_SERVER, plane.pebble_directory())
        .env(sidecert_contract::env::ACME_CA_BUNDLE, plane.pebble_ca_pem())
        .env(sidecert_contract::env::ACME_PROFILE, "shortlived")
        .env(sidecert_contract::env::POD_NAMESPACE, ns)
        .env(
            sidecert_contract::env::POD_NAME,
            format!("replica-{ip}").replace('.', "-"),
        )
        .env(sidecert_contract::env::POD_IP, ip.to_string())
        .env("SIDECERT_LEASE_DURATION", "6s")
        .env("SIDECERT_RETRY_BASE", "2s")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    Replica {
        _proc: Proc(child),
        metrics,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn three_replicas_one_order_and_the_lease_moves() {
    init();
    let plane = Plane::get().await.unwrap();
    let ns = plane.namespace("sc-replicas", false).await.unwrap();
    let ips = [56, 57, 58].map(|n| Ipv4Addr::new(127, 0, 0, n));
    let d = domain("replicas");
    // Until a leader is known the name points at 127.0.0.1, where no replica answers: an
    // early order fails validation (and its authorization is not reused).
    plane.add_a(&d, Ipv4Addr::LOCALHOST).await.unwrap();
    let spec = CertificateSpec::new("shared-tls", [&d]).unwrap();
    let mut replicas: Vec<Replica> = ips
        .iter()
        .map(|ip| spawn_replica(plane, ns.name(), &spec, *ip))
        .collect();
    let leader = wait_until("a leader", Duration::from_secs(30), || async {
        for (i, r) in replicas.iter().enumerate() {
            let m = scrape(&r.metrics).await;
            if sample(&m, "sidecert_leader{secret=\"shared-tls\"}") == 1.0 {
                return Some(i);
            }
        }
        None
    })
    .await;
    // The CA validates at a replica that does NOT lead: issuance proves that a non-leader
    // answers the challenge the leader published on the Lease.
    let answering = (leader + 1) % 3;
    plane.add_a(&d, ips[answering]).await.unwrap();
    let secrets: Api<Secret> = ns.api();
    let first = wait_issued(&secrets, "shared-tls", None, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut issued = 0.0;
    for (i, r) in replicas.iter().enumerate() {
        let m = scrape(&r.metrics).await;
        issued += sample(&m, "sidecert_orders_total{result=\"issued\"}");
        assert_eq!(
            sample(&m, "sidecert_leader{secret=\"shared-tls\"}") == 1.0,
            i == leader,
            "replica {i}"
        );
        if i == answering {
            assert!(
                sample(&m, "sidecert_http01_requests_total{result=\"served\"}") >= 1.0,
                "{m}"
            );
        }
    }
    assert_eq!(issued, 1.0, "exactly one certificate ordered");
    eprintln!("replica {leader} leads; the CA validated at replica {answering}");

    // The holder dies (SIGKILL: no release); the Lease moves to a survivor.
    let dead = replicas.remove(leader);
    drop(dead);
    let survivor_ips: Vec<Ipv4Addr> = ips
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != leader)
        .map(|(_, ip)| *ip)
        .collect();
    let new_leader = wait_until("the Lease moves", Duration::from_secs(30), || async {
        for (i, r) in replicas.iter().enumerate() {
            if sample(
                &scrape(&r.metrics).await,
                "sidecert_leader{secret=\"shared-tls\"}",
            ) == 1.0
            {
                return Some(i);
            }
        }
        None
    })
    .await;
    eprintln!("replica {new_leader} of the survivors took over");
    // The CA now validates at the survivor that does NOT lead: the renewal only succeeds if
    // a non-leader answers the challenge the leader published on the Lease.
    plane.add_a(&d, survivor_ips[1 - new_leader]).await.unwrap();
    let second = wait_issued(
        &secrets,
        "shared-tls",
        Some(&not_after(&first)),
        Duration::from_secs(150),
    )
    .await;
    assert_chains_to(
        &crt(&second),
        &plane.pebble_root_pem().await.unwrap(),
        &spec.domains,
    );
    drop(replicas);
    ns.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_releases_the_lease_and_exits_quickly() {
    init();
    let plane = Plane::get().await.unwrap();
    let ns = plane.namespace("sc-term", false).await.unwrap();
    let ip = Ipv4Addr::new(127, 0, 0, 59);
    let d = domain("term");
    plane.add_a(&d, ip).await.unwrap();
    let spec = CertificateSpec::new("term-tls", [&d]).unwrap();
    let mut replica = spawn_replica(plane, ns.name(), &spec, ip);
    let secrets: Api<Secret> = ns.api();
    wait_issued(&secrets, "term-tls", None, Duration::from_secs(60)).await;
    let pid = replica._proc.0.id().to_string();
    let t0 = std::time::Instant::now();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = loop {
        if let Some(s) = replica._proc.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "still running 5 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "{status}");
    let lease: Lease = ns.api().get(&spec.lease_name()).await.unwrap();
    let holder = lease.spec.and_then(|s| s.holder_identity).unwrap_or_default();
    assert!(holder.is_empty(), "Lease still held by {holder}");
    ns.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_issued_certificate_survives_a_failing_secret_write() {
    init();
    let plane = Plane::get().await.unwrap();
    let ns = plane.namespace("sc-keep", false).await.unwrap();
    let ip = Ipv4Addr::new(127, 0, 0, 60);
    let d = domain("keep");
    plane.add_a(&d, ip).await.unwrap();
    let spec = CertificateSpec::new("keep-tls", [&d]).unwrap();
    let secrets: Api<Secret> = ns.api();
    // An immutable Secret rejects every write.
    let mut blocker = temporary_secret("keep-tls", &spec.domains);
    blocker.immutable = Some(true);
    secrets.create(&PostParams::default(), &blocker).await.unwrap();
    let r = start(
        options(plane, ns.name(), &spec, ip, Some("default"), true),
        ns.client(),
    )
    .await;
    wait_until("the order", Duration::from_secs(30), || async {
        let m = scrape(&r.metrics).await;
        (sample(&m, "sidecert_orders_total{result=\"issued\"}") == 1.0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let still = secrets.get("keep-tls").await.unwrap();
    assert!(
        still
            .metadata
            .annotations
            .unwrap()
            .contains_key(annotations::TEMPORARY)
    );
    // The obstacle goes away: the certificate kept in memory is written, no new order.
    secrets.delete("keep-tls", &Default::default()).await.unwrap();
    let s = wait_issued(&secrets, "keep-tls", None, Duration::from_secs(90)).await;
    assert_chains_to(&crt(&s), &plane.pebble_root_pem().await.unwrap(), &spec.domains);
    let m = scrape(&r.metrics).await;
    assert_eq!(sample(&m, "sidecert_orders_total{result=\"issued\"}"), 1.0, "{m}");
    // Deleted again: the leader restores it from memory, still without a new order.
    let rv = s.metadata.resource_version.clone();
    secrets.delete("keep-tls", &Default::default()).await.unwrap();
    let again = wait_until("the restored Secret", Duration::from_secs(60), || async {
        let s = secrets.get_opt("keep-tls").await.ok()??;
        (s.metadata.resource_version != rv).then_some(s)
    })
    .await;
    assert_eq!(crt(&again), crt(&s));
    let m = scrape(&r.metrics).await;
    assert_eq!(sample(&m, "sidecert_orders_total{result=\"issued\"}"), 1.0);
    r.stop().await;
    ns.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn another_teams_secret_is_never_overwritten() {
    // A secretName that names a Secret sidecert did not make (no managed-by label, no
    // temporary annotation): no certificate is ordered for it or written over it, whatever
    // the sidecar was told; it says why in a metric and an Event, and goes on once the
    // Secret is handed over.
    init();
    let plane = Plane::get().await.unwrap();
    let ns = plane.namespace("sc-theirs", false).await.unwrap();
    let ip = Ipv4Addr::new(127, 0, 0, 64);
    let d = domain("theirs");
    plane.add_a(&d, ip).await.unwrap();
    let secrets: Api<Secret> = ns.api();
    let theirs = Secret {
        metadata: ObjectMeta {
            name: Some("team-db".into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            "password".into(),
            ByteString(b"hunter2".to_vec()),
        )])),
        ..Default::default()
    };
    let before = secrets.create(&PostParams::default(), &theirs).await.unwrap();
    let spec = CertificateSpec::new("team-db", [&d]).unwrap();
    let r = start(
        options(plane, ns.name(), &spec, ip, Some("default"), true),
        ns.client(),
    )
    .await;
    wait_until("the refused write", Duration::from_secs(30), || async {
        let m = scrape(&r.metrics).await;
        (sample(
            &m,
            "sidecert_failures_total{kind=\"foreign_secret\",secret=\"team-db\"}",
        ) >= 1.0)
            .then_some(())
    })
    .await;
    let events: Api<Event> = ns.api();
    wait_until("a SecretNotOurs Event", Duration::from_secs(10), || async {
        let evs = events.list(&ListParams::default()).await.ok()?;
        evs.items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("SecretNotOurs"))
    })
    .await;
    // While it waits for the Secret to change, it still follows its Lease: taken over by
    // another holder, the leader gauge says so (it used to stay at 1 until the Secret
    // changed). The other holder stops renewing, so the sidecar takes the Lease back.
    let leader = "sidecert_leader{secret=\"team-db\"}";
    wait_until("the Lease", Duration::from_secs(20), || async {
        (sample(&scrape(&r.metrics).await, leader) == 1.0).then_some(())
    })
    .await;
    let leases: Api<Lease> = ns.api();
    // Read and replaced until no renewal of the sidecar's comes in between.
    wait_until("the Lease taken over", Duration::from_secs(10), || async {
        let mut lease = leases.get(&spec.lease_name()).await.ok()?;
        let now =
            k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(k8s_openapi::jiff::Timestamp::now());
        let held = lease.spec.get_or_insert_with(Default::default);
        held.holder_identity = Some("another-replica".into());
        held.acquire_time = Some(now.clone());
        held.renew_time = Some(now);
        leases
            .replace(&spec.lease_name(), &PostParams::default(), &lease)
            .await
            .ok()
    })
    .await;
    wait_until(
        "the leader gauge to follow the Lease",
        Duration::from_secs(20),
        || async { (sample(&scrape(&r.metrics).await, leader) == 0.0).then_some(()) },
    )
    .await;
    let after = secrets.get("team-db").await.unwrap();
    assert_eq!(after.metadata.resource_version, before.metadata.resource_version);
    assert_eq!(after.data, theirs.data);
    // Nothing was ordered for it (the sidecar used to order, then fail to write).
    let m = scrape(&r.metrics).await;
    assert_eq!(sample(&m, "sidecert_orders_total{result=\"issued\"}"), 0.0, "{m}");
    // Handed over with sidecert's label: the certificate is issued and written beside the
    // data already there.
    let mut handed = after.clone();
    handed
        .metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert("app.kubernetes.io/managed-by".into(), "sidecert".into());
    secrets
        .replace("team-db", &PostParams::default(), &handed)
        .await
        .unwrap();
    let s = wait_issued(&secrets, "team-db", None, Duration::from_secs(90)).await;
    assert_chains_to(&crt(&s), &plane.pebble_root_pem().await.unwrap(), &spec.domains);
    assert_eq!(
        s.data.as_ref().and_then(|d| d.get("password")),
        Some(&ByteString(b"hunter2".to_vec()))
    );
    r.stop().await;
    ns.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_account_secret_that_is_not_sidecerts_is_never_used() {
    // The account Secret's name follows from the server and an e-mail the Pod's author
    // picks: a Secret of that name someone else keeps is neither read as the account (its
    // key would make the namespace's certificates theirs) nor written over.
    init();
    let plane = Plane::get().await.unwrap();
    let ns = plane.namespace("sc-acct", false).await.unwrap();
    let ip = Ipv4Addr::new(127, 0, 0, 65);
    let d = domain("acct");
    plane.add_a(&d, ip).await.unwrap();
    let secrets: Api<Secret> = ns.api();
    let spec = CertificateSpec::new("acct-tls", [&d]).unwrap();
    let opts = options(plane, ns.name(), &spec, ip, Some("default"), true);
    let account =
        sidecert_contract::account_secret_name(&opts.config.acme_server, opts.config.acme_email.as_deref());
    let theirs = Secret {
        metadata: ObjectMeta {
            name: Some(account.clone()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            "credentials.json".into(),
            ByteString(b"{\"id\":\"https://elsewhere.example/acct/1\"}".to_vec()),
        )])),
        ..Default::default()
    };
    let before = secrets.create(&PostParams::default(), &theirs).await.unwrap();
    let r = start(opts, ns.client()).await;
    wait_until("the refused account", Duration::from_secs(30), || async {
        let m = scrape(&r.metrics).await;
        (sample(
            &m,
            "sidecert_failures_total{kind=\"foreign_secret\",secret=\"acct-tls\"}",
        ) >= 1.0)
            .then_some(())
    })
    .await;
    let after = secrets.get(&account).await.unwrap();
    assert_eq!(after.metadata.resource_version, before.metadata.resource_version);
    assert!(secrets.get_opt("acct-tls").await.unwrap().is_none());
    // Gone: the sidecar makes its own account at its next attempt and issues.
    secrets.delete(&account, &Default::default()).await.unwrap();
    let s = wait_issued(&secrets, "acct-tls", None, Duration::from_secs(90)).await;
    assert_chains_to(&crt(&s), &plane.pebble_root_pem().await.unwrap(), &spec.domains);
    let ours = secrets.get(&account).await.unwrap();
    assert!(sidecert_contract::is_sidecerts_secret(&ours.metadata));
    r.stop().await;
    ns.cleanup().await.unwrap();
}
