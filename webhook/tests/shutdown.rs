//! Shutdown of `serve` against the local control plane: `/readyz` turns false at once, the
//! server keeps serving through `--shutdown-delay` with `Connection: close` on every response,
//! and idle keep-alive connections are closed when it stops listening (not left to their
//! keep-alive timeout).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    sync::Arc,
    time::{Duration, Instant},
};

use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use sidecert_e2e::{Plane, wait_for};
use sidecert_webhook::server::serve_until;

mod common;
use common::{free_port, in_own_runtime, pki, serve_args};

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn connect(addr: SocketAddr, ca: &str) -> Tls {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let conn =
        rustls::ClientConnection::new(Arc::new(config), ServerName::IpAddress(addr.ip().into())).unwrap();
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// One keep-alive `GET /readyz`; returns the head (lower-cased) and the body.
fn readyz(tls: &mut Tls) -> (String, String) {
    tls.write_all(b"GET /readyz HTTP/1.1\r\nHost: webhook\r\n\r\n")
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let head = text[..end].to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if text.len() >= end + 4 + len {
                return (head, text[end + 4..end + 4 + len].to_owned());
            }
        }
        let n = tls.read(&mut chunk).unwrap();
        assert!(n > 0, "connection closed mid-response");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Waits for the server to close the connection; returns when it did.
fn closed(tls: &mut Tls) -> Instant {
    let mut chunk = [0u8; 64];
    loop {
        match tls.read(&mut chunk) {
            Ok(0) | Err(_) => return Instant::now(),
            Ok(_) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_then_closes_idle_connections() {
    let plane = Plane::get().await.expect("local plane");
    sidecert_webhook::install_crypto_provider();
    let ip = plane.gateway();
    let (ca_pem, dir) = pki(ip, "shutdown");
    let (port, metrics_port) = (free_port(ip), free_port(Ipv4Addr::LOCALHOST));
    let args = serve_args([
        format!("--listen={ip}:{port}"),
        format!("--metrics-listen=127.0.0.1:{metrics_port}"),
        format!("--tls-cert-file={}", dir.join("tls.crt").display()),
        format!("--tls-key-file={}", dir.join("tls.key").display()),
        format!("--kubeconfig={}", plane.kubeconfig().display()),
        "--reconcile=false".to_owned(),
        "--shutdown-delay=2s".to_owned(),
        "--workers=1".to_owned(),
    ]);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, done) = tokio::sync::oneshot::channel::<Instant>();
    in_own_runtime(move || async move {
        let _ = serve_until(args, async move {
            let _ = stopped.await;
        })
        .await;
        let _ = done_tx.send(Instant::now());
    });
    let addr = SocketAddr::from((ip, port));
    let ca2 = ca_pem.clone();
    wait_for(Duration::from_secs(30), || {
        let ca = ca2.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                std::panic::catch_unwind(|| readyz(&mut connect(addr, &ca)))
                    .ok()
                    .filter(|(h, _)| h.starts_with("http/1.1 200"))
            })
            .await
            .ok()
            .flatten()
        }
    })
    .await
    .expect("ready");

    let result = tokio::task::spawn_blocking(move || {
        // Two kept-alive connections: one used again during the drain, one left idle.
        let mut used = connect(addr, &ca_pem);
        let mut idle = connect(addr, &ca_pem);
        assert!(readyz(&mut used).0.starts_with("http/1.1 200"));
        let (head, _) = readyz(&mut idle);
        assert!(!head.contains("connection: close"), "{head}");

        stop.send(()).unwrap();
        let signalled = Instant::now();
        std::thread::sleep(Duration::from_millis(300));
        // Still serving, not ready, and closing the connection after the answer.
        let (head, body) = readyz(&mut used);
        assert!(head.starts_with("http/1.1 503"), "{head}");
        assert_eq!(body, "shutting down");
        assert!(head.contains("connection: close"), "{head}");
        closed(&mut used);
        let fresh = readyz(&mut connect(addr, &ca_pem));
        assert!(
            fresh.0.starts_with("http/1.1 503"),
            "new connections are still served during the delay"
        );

        // The idle connection is closed once the delay is over, not at its keep-alive timeout.
        let at = closed(&mut idle);
        let after = at - signalled;
        assert!(
            after >= Duration::from_millis(1900) && after < Duration::from_secs(6),
            "idle connection closed after {after:?}"
        );
        signalled
    })
    .await;
    let signalled = result.unwrap();
    let finished = tokio::time::timeout(Duration::from_secs(10), done)
        .await
        .expect("serve returns")
        .unwrap();
    assert!(finished - signalled < Duration::from_secs(8));
}
