//! `serve --self-signed` against the local control plane: the webhook makes its CA, fills the
//! `caBundle` of a configuration created without one, rotates its serving certificate and
//! its CA (validities of seconds) while Pods are admitted in a loop with `failurePolicy:
//! Fail`, and two replicas started together end with one CA.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    admissionregistration::v1::MutatingWebhookConfiguration,
    core::v1::{Namespace, Pod, Secret},
};
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::json;
use sidecert_e2e::{Plane, TestNamespace, create_until, wait_for};
use sidecert_webhook::server::serve;

mod common;
use common::{PODS, TEST_LABEL, free_port, has_sidecar, in_own_runtime, serve_args, webhook_config};

/// Starts `sidecert-webhook serve <args>` in its own thread and runtime (it ends with the
/// test process), from a real command line so the flags are exercised too.
fn start(args: &[String]) {
    let serve_args = serve_args(args.iter().cloned());
    in_own_runtime(move || async move {
        if let Err(e) = serve(serve_args).await {
            eprintln!("webhook: {e}");
        }
    });
}

fn common_args(plane: &Plane, ns: &str, config: &str, port: u16, metrics_port: u16) -> Vec<String> {
    let ip = plane.gateway();
    [
        "--self-signed",
        "--listen",
        &format!("{ip}:{port}"),
        "--metrics-listen",
        &format!("127.0.0.1:{metrics_port}"),
        "--kubeconfig",
        &plane.kubeconfig().display().to_string(),
        "--namespace",
        ns,
        "--webhook-configuration-name",
        config,
        "--extra-ip-sans",
        &ip.to_string(),
        "--extra-dns-names",
        "webhook.test.example",
        "--workers",
        "1",
        // The reconciler has its own test (tests/reconciler.rs).
        "--reconcile=false",
        // An image the plane runs without a process: admitted Pods start nothing.
        "--sidecar-image",
        "example.invalid/sidecar:0",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect()
}

/// What a TLS client that trusts `bundle` sees at `addr`: the served leaf, and the status
/// line of `GET /readyz`.
fn probe(addr: SocketAddr, bundle: &[u8]) -> Result<(Vec<u8>, String), String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(bundle) {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
    let name = ServerName::IpAddress(addr.ip().into());
    let conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
    let tcp =
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(b"GET /readyz HTTP/1.1\r\nHost: webhook\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match tls.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            // No close_notify from the server: what arrived is enough.
            Err(_) if !buf.is_empty() => break,
            Err(e) => return Err(e.to_string()),
        }
    }
    let leaf = tls
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .ok_or("no peer certificate")?;
    let status = String::from_utf8_lossy(&buf)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    Ok((leaf, status))
}

async fn probe_async(addr: SocketAddr, bundle: Vec<u8>) -> Result<(Vec<u8>, String), String> {
    tokio::task::spawn_blocking(move || probe(addr, &bundle))
        .await
        .unwrap()
}

async fn live_bundle(hooks: &Api<MutatingWebhookConfiguration>, name: &str) -> Option<Vec<u8>> {
    let cfg = hooks.get(name).await.ok()?;
    let bundle = cfg.webhooks?.first()?.client_config.ca_bundle.clone()?;
    (!bundle.0.is_empty()).then_some(bundle.0)
}

async fn metrics(port: u16) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut s,
        b"GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut out = String::new();
    let _ = tokio::io::AsyncReadExt::read_to_string(&mut s, &mut out).await;
    out
}

fn pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "ss"}, "annotations": {
            "sidecert.io/inject": "true",
            "sidecert.io/domains": "ss.shop.example",
            "sidecert.io/secret-name": "ss-tls"
        }},
        "spec": {"containers": [{"name": "app", "image": "example.invalid/app:0"}]}
    }))
    .unwrap()
}

fn run_id(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{tag}{}-{:x}", std::process::id(), nanos % 0xffffff)
}

/// Runs `body`, then deletes the configuration and the namespaces whatever happened.
async fn guarded<F: Future<Output = ()>>(
    plane: &Plane,
    hooks: &Api<MutatingWebhookConfiguration>,
    config: &str,
    namespaces: Vec<TestNamespace>,
    body: F,
) {
    let outcome = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(body)).await;
    let _ = hooks.delete(config, &DeleteParams::default()).await;
    for ns in namespaces {
        if outcome.is_err() {
            plane.dump_on_failure(ns.name()).await;
        }
        let _ = ns.cleanup().await;
    }
    if let Err(p) = outcome {
        std::panic::resume_unwind(p);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstraps_and_rotates_without_failed_admissions() {
    let plane = Plane::get().await.expect("local plane");
    sidecert_webhook::install_crypto_provider();
    let client = plane.client().await.unwrap();
    let ip = plane.gateway();
    let run = run_id("ss");
    let ca_ns = plane.namespace("whk-ss-ca", false).await.unwrap();
    let pods_ns = plane.namespace("whk-ss", true).await.unwrap();
    Api::<Namespace>::all(client.clone())
        .patch(
            pods_ns.name(),
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"labels": {TEST_LABEL: run}}})),
        )
        .await
        .unwrap();
    let (port, metrics_port) = (free_port(ip), free_port(Ipv4Addr::LOCALHOST));
    let addr = SocketAddr::from((ip, port));
    let config = format!("sidecert-ss-{run}");
    let hooks = Api::<MutatingWebhookConfiguration>::all(client.clone());

    let mut args = common_args(plane, ca_ns.name(), &config, port, metrics_port);
    // Serving certificates every 20 s; a CA rollover 50 s after the CA is made, switched
    // after 10 s in the bundle, promoted after 20 s.
    for (flag, value) in [
        ("--serving-validity", "40s"),
        ("--serving-rotate-before", "20s"),
        ("--ca-validity", "150s"),
        ("--ca-rotate-before", "100s"),
        ("--ca-rollover-delay", "10s"),
    ] {
        args.extend([flag.to_owned(), value.to_owned()]);
    }
    start(&args);
    let secrets: Api<Secret> = ca_ns.api();
    let pods: Api<Pod> = pods_ns.api();

    let body = async {
        // The configuration does not exist yet: the webhook serves, but is not ready.
        wait_for(Duration::from_secs(30), || async move {
            tokio::net::TcpStream::connect(addr).await.ok()
        })
        .await
        .expect("webhook listening");
        let secret = wait_for(Duration::from_secs(20), || {
            let secrets = secrets.clone();
            async move { secrets.get_opt("sidecert-webhook-ca").await.ok().flatten() }
        })
        .await
        .expect("CA Secret created");
        let ca_pem = secret.data.unwrap()["ca.crt"].0.clone();
        let (_, status) = probe_async(addr, ca_pem).await.expect("TLS with the new CA");
        assert!(status.contains("503"), "{status}");

        let started = Instant::now();
        hooks
            .create(
                &PostParams::default(),
                &webhook_config(
                    &config,
                    &format!("https://{ip}:{port}/mutate"),
                    // No caBundle: the webhook fills it in.
                    None,
                    &run,
                    "Fail",
                    &[PODS],
                ),
            )
            .await
            .unwrap();
        let bundle = wait_for(Duration::from_secs(30), || live_bundle(&hooks, &config))
            .await
            .expect("caBundle filled in");
        wait_for(Duration::from_secs(30), || {
            let bundle = bundle.clone();
            async move {
                let (_, status) = probe_async(addr, bundle).await.ok()?;
                status.contains("200").then_some(())
            }
        })
        .await
        .expect("/readyz true once the caBundle trusts the serving certificate");
        eprintln!(
            "ready {:?} after the configuration was created",
            started.elapsed()
        );

        // A real Pod, then dry-run creations (admission without Pods left behind) through
        // serving rotations and a CA rollover.
        // `/readyz` is the webhook's view; the API server learns the caBundle through its own
        // informer a moment later, so the first Pod may need a retry.
        create_until(&pods, "ss-real", Duration::from_secs(10), pod, has_sidecar)
            .await
            .expect("a real Pod is admitted with the sidecar");
        let (mut admitted, mut failures) = (0u32, Vec::new());
        let (mut leaves, mut cas) = (BTreeSet::new(), BTreeSet::new());
        let dry = PostParams {
            dry_run: true,
            ..Default::default()
        };
        let loop_start = Instant::now();
        let mut i = 0u32;
        let mut last_probe = Instant::now();
        while loop_start.elapsed() < Duration::from_secs(90) {
            i += 1;
            match pods.create(&dry, &pod(&format!("ss-{i}"))).await {
                Ok(p) if has_sidecar(&p) => admitted += 1,
                Ok(_) => failures.push(format!("{:?}: pod {i} not mutated", loop_start.elapsed())),
                Err(e) => failures.push(format!("{:?}: pod {i}: {e}", loop_start.elapsed())),
            }
            if last_probe.elapsed() >= Duration::from_secs(1) {
                last_probe = Instant::now();
                if let Some(bundle) = live_bundle(&hooks, &config).await {
                    cas.insert(bundle.clone());
                    match probe_async(addr, bundle).await {
                        Ok((leaf, _)) => {
                            leaves.insert(leaf);
                        }
                        Err(e) => failures.push(format!("{:?}: TLS probe: {e}", loop_start.elapsed())),
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        eprintln!(
            "admitted {admitted}, {} serving certificates, {} caBundles seen",
            leaves.len(),
            cas.len()
        );
        assert!(failures.is_empty(), "{} failures: {failures:#?}", failures.len());
        assert!(admitted > 100, "{admitted}");
        assert!(leaves.len() >= 4, "serving certificates seen: {}", leaves.len());
        // old, old+next, next: the rollover went through the bundle.
        assert!(cas.len() >= 3, "caBundles seen: {}", cas.len());

        let text = metrics(metrics_port).await;
        for needle in [
            "sidecert_webhook_certificate_rotations_total{kind=\"ca_rollover\"}",
            "sidecert_webhook_certificate_rotations_total{kind=\"ca_promote\"}",
            "sidecert_webhook_certificate_rotations_total{kind=\"serving\"}",
            "sidecert_webhook_serving_cert_not_after_seconds",
            "sidecert_webhook_ca_not_after_seconds",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
    };
    guarded(plane, &hooks, &config, vec![ca_ns, pods_ns], body).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_starting_together_share_one_ca() {
    let plane = Plane::get().await.expect("local plane");
    sidecert_webhook::install_crypto_provider();
    let client = plane.client().await.unwrap();
    let ip = plane.gateway();
    let run = run_id("two");
    let ca_ns = plane.namespace("whk-two", false).await.unwrap();
    let config = format!("sidecert-two-{run}");
    let hooks = Api::<MutatingWebhookConfiguration>::all(client.clone());
    let ports = [free_port(ip), free_port(ip)];
    hooks
        .create(
            &PostParams::default(),
            &webhook_config(
                &config,
                &format!("https://{ip}:{}/mutate", ports[0]),
                None,
                &run,
                "Ignore",
                &[PODS],
            ),
        )
        .await
        .unwrap();
    let secrets: Api<Secret> = ca_ns.api();
    for port in ports {
        start(&common_args(
            plane,
            ca_ns.name(),
            &config,
            port,
            free_port(Ipv4Addr::LOCALHOST),
        ));
    }

    let body = async {
        let bundle = wait_for(Duration::from_secs(30), || live_bundle(&hooks, &config))
            .await
            .expect("caBundle filled in");
        let secret = secrets.get("sidecert-webhook-ca").await.unwrap();
        let data = secret.data.unwrap();
        assert_eq!(
            data.keys().map(String::as_str).collect::<Vec<_>>(),
            ["ca.crt", "ca.key"]
        );
        let ca = data["ca.crt"].0.clone();
        // Both replicas serve from that one CA, and both are ready.
        for port in ports {
            let addr = SocketAddr::from((ip, port));
            let ca = ca.clone();
            wait_for(Duration::from_secs(30), || {
                let ca = ca.clone();
                async move {
                    let (_, status) = probe_async(addr, ca).await.ok()?;
                    status.contains("200").then_some(())
                }
            })
            .await
            .unwrap_or_else(|_| panic!("replica on port {port} ready with the shared CA"));
        }
        // The bundle holds exactly that CA, and stays so.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(live_bundle(&hooks, &config).await.unwrap(), bundle);
        let pems: Vec<_> = CertificateDer::pem_slice_iter(&bundle).collect();
        assert_eq!(pems.len(), 1);
        assert_eq!(bundle, ca);
        let after = secrets.get("sidecert-webhook-ca").await.unwrap();
        assert_eq!(after.data.unwrap()["ca.crt"].0, ca, "the CA changed");
    };
    guarded(plane, &hooks, &config, vec![ca_ns], body).await;
}
