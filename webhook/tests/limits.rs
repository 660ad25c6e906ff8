//! The HTTPS server under a client that trickles: the real server (TLS, the connection
//! limits, the review slots, the read timeout) on 127.0.0.1, with a Reviewer that has no API
//! server behind it. One address (127.0.0.2) opens many connections, each trickling a 3 MiB
//! body; another (127.0.0.1, standing for the API server) keeps getting its reviews answered.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    sync::Arc,
    time::{Duration, Instant},
};

use actix_web::web;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use sidecert_webhook::{
    AcmeDefaults, Context, Reviewer, SidecarSettings,
    admission::{AppState, ConnectionLimiter, Limits, Readiness, limits::Reserved},
    https::{HttpsSettings, serve_https},
    metrics::Metrics,
    mutate::Snapshot,
};

mod common;
use common::{in_own_runtime, pki};

const SERVER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const API_SERVER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const TRICKLER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const READ_TIMEOUT: Duration = Duration::from_secs(2);

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

struct Running {
    addr: SocketAddr,
    ca: String,
    connections: ConnectionLimiter,
    metrics: Metrics,
    handle: actix_web::dev::ServerHandle,
}

/// Starts the HTTPS server with `limits` on a port of 127.0.0.1.
fn start(tag: &str, limits: Limits) -> Running {
    start_with(tag, limits, None)
}

/// The same, asking for a client certificate of `client_ca` (PEM) for `/mutate`.
fn start_with(tag: &str, limits: Limits, client_ca: Option<&str>) -> Running {
    sidecert_webhook::install_crypto_provider();
    let (ca, dir) = pki(SERVER, tag);
    let listener = std::net::TcpListener::bind((SERVER, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    let resolver =
        sidecert_webhook::tls::resolver::ReloadingResolver::load(dir.join("tls.crt"), dir.join("tls.key"))
            .unwrap();
    let client_roots = client_ca.map(|pem| sidecert_webhook::tls::client_roots(pem.as_bytes()).unwrap());
    let require = client_roots.is_some();
    let tls = sidecert_webhook::tls::resolver::server_config(Arc::new(resolver), client_roots).unwrap();
    let metrics = Metrics::new().unwrap();
    let connections = limits.connection_limiter();
    let (tx, rx) = std::sync::mpsc::channel();
    let (m, c) = (metrics.clone(), connections.clone());
    in_own_runtime(move || async move {
        let ctx = Context {
            sidecar: SidecarSettings::default(),
            acme: AcmeDefaults::default(),
            lookup: Arc::new(Snapshot::default()),
            secrets: Default::default(),
            hosts: Default::default(),
        };
        let state = web::Data::new(
            AppState::new(Reviewer::new(ctx, m, None), Readiness::new(true, true), &limits)
                .requiring_client_certificate(require),
        );
        let settings = HttpsSettings {
            limits,
            workers: Some(2),
            shutdown_timeout: Duration::from_secs(1),
        };
        let server = serve_https(listener, tls, state, c, &settings).unwrap();
        tx.send(server.handle()).unwrap();
        let _ = server.await;
    });
    let handle = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    Running {
        addr,
        ca,
        connections,
        metrics,
        handle,
    }
}

/// A client's certificate chain and key (PEM).
type ClientCert = (String, String);

fn client_config(ca: &str, client_cert: Option<&ClientCert>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
    Arc::new(match client_cert {
        None => builder.with_no_client_auth(),
        Some((chain, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(chain.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap(),
                rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
    })
}

/// A TCP connection from `src` to `dst`.
fn tcp_from(src: Ipv4Addr, dst: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&SocketAddr::from((src, 0)).into()).unwrap();
    socket
        .connect_timeout(&dst.into(), Duration::from_secs(5))
        .unwrap();
    let tcp: TcpStream = socket.into();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    tcp
}

/// A TLS connection from `src`, handshake done; `None` when the server closed it first.
fn connect(src: Ipv4Addr, run: &Running) -> Option<Tls> {
    connect_as(src, run, None)
}

/// The same, presenting `client_cert`. `None` also when the server refused the certificate
/// (with TLS 1.3 the client learns that on its first read: see [`review`]).
fn connect_as(src: Ipv4Addr, run: &Running, client_cert: Option<&ClientCert>) -> Option<Tls> {
    let mut tcp = tcp_from(src, run.addr);
    let name = ServerName::IpAddress(run.addr.ip().into());
    let mut conn = rustls::ClientConnection::new(client_config(&run.ca, client_cert), name).unwrap();
    while conn.is_handshaking() {
        match conn.complete_io(&mut tcp) {
            Ok((0, 0)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
    Some(rustls::StreamOwned::new(conn, tcp))
}

/// A CA (PEM) and a client certificate it issued.
fn client_pki() -> (String, ClientCert) {
    use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer).unwrap();
    (ca_pem, (cert.pem(), key.serialize_pem()))
}

/// A GET of `path` on a fresh connection; the status line.
fn get(tls: &mut Tls, path: &str) -> Option<String> {
    tls.write_all(format!("GET {path} HTTP/1.1\r\nHost: webhook\r\n\r\n").as_bytes())
        .ok()?;
    response(tls).map(|(status, _)| status)
}

/// Reads one response; returns its status line (lower-cased) and body. `None`: the
/// connection was closed without an answer.
fn response(tls: &mut Tls) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if buf.len() >= end + 4 + len {
                let status = head.lines().next().unwrap_or_default().to_owned();
                return Some((status, buf[end + 4..end + 4 + len].to_vec()));
            }
        }
        match tls.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/tests/data/{name}.json", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// One review on `tls`; returns the status line.
fn review(tls: &mut Tls, body: &[u8]) -> Option<String> {
    let head = format!(
        "POST /mutate HTTP/1.1\r\nHost: webhook\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).ok()?;
    tls.write_all(body).ok()?;
    let (status, body) = response(tls)?;
    if status.starts_with("http/1.1 200") {
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["response"]["uid"], "5eedce27-0000-4000-8000-000000000001");
    }
    Some(status)
}

/// What became of one trickling connection.
#[derive(Debug)]
enum Trickled {
    /// The server closed it before the TLS handshake.
    Refused,
    /// The server answered (status line) or closed it, this long after the head was sent.
    CutOff(Option<String>, Duration),
}

/// Opens a connection from `src`, sends the head of a 3 MiB review, then a byte every 100 ms
/// until the server answers or closes it.
fn trickle(src: Ipv4Addr, run: &Running) -> Trickled {
    let Some(mut tls) = connect(src, run) else {
        return Trickled::Refused;
    };
    let head = format!(
        "POST /mutate HTTP/1.1\r\nHost: webhook\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        3 * 1024 * 1024
    );
    let start = Instant::now();
    if tls.write_all(head.as_bytes()).is_err() {
        return Trickled::CutOff(None, start.elapsed());
    }
    // Reads answer the trickle: the server's reply (or close) shows up as soon as it comes.
    tls.sock
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    while start.elapsed() < Duration::from_secs(30) {
        match tls.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
        if got.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
        if tls.write_all(b" ").is_err() || tls.flush().is_err() {
            break;
        }
    }
    let status = String::from_utf8_lossy(&got)
        .lines()
        .next()
        .map(str::to_ascii_lowercase);
    Trickled::CutOff(status, start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tricklers_are_bounded_and_cut_off_while_reviews_go_on() {
    let limits = Limits {
        request_read_timeout: READ_TIMEOUT,
        connections: 64,
        connections_per_address: 8,
        reviews: 16,
        reviews_per_address: 4,
        reserved: Default::default(),
    };
    let run = Arc::new(start("limits", limits));

    // 24 tricklers from one address: 8 connections accepted, the rest closed at once.
    let tricklers: Vec<_> = (0..24)
        .map(|_| {
            let run = run.clone();
            std::thread::spawn(move || trickle(TRICKLER, &run))
        })
        .collect();

    // Meanwhile the API server's reviews are answered: on one kept-alive connection and on
    // new ones, for longer than the tricklers are allowed to take.
    let api = {
        let run = run.clone();
        std::thread::spawn(move || {
            let body = fixture("pod-direct");
            let mut kept = connect(API_SERVER, &run).expect("the API server's connection");
            let (mut answered, mut slowest, mut peak) = (0, Duration::ZERO, 0);
            let start = Instant::now();
            while start.elapsed() < READ_TIMEOUT + Duration::from_secs(1) {
                peak = peak.max(run.connections.open_from(TRICKLER.into()));
                let t = Instant::now();
                assert_eq!(review(&mut kept, &body).as_deref(), Some("http/1.1 200 ok"));
                let mut fresh = connect(API_SERVER, &run).expect("a new connection");
                assert_eq!(review(&mut fresh, &body).as_deref(), Some("http/1.1 200 ok"));
                slowest = slowest.max(t.elapsed());
                answered += 2;
                std::thread::sleep(Duration::from_millis(50));
            }
            (answered, slowest, peak)
        })
    };

    let outcomes: Vec<Trickled> = tricklers.into_iter().map(|t| t.join().unwrap()).collect();
    let (answered, slowest, peak) = api.join().unwrap();
    eprintln!("{answered} reviews answered, the slowest in {slowest:?}; tricklers: {outcomes:?}");

    let refused = outcomes.iter().filter(|o| matches!(o, Trickled::Refused)).count();
    assert_eq!(refused, 16, "{outcomes:?}");
    assert!(peak <= 8, "{peak} connections from one address");
    for o in &outcomes {
        if let Trickled::CutOff(status, after) = o {
            // Either reading the body (408) or waiting for one of the address's 4 review
            // slots (429) until the read timeout, or closed then (the answer may be lost to
            // the reset); never kept for the 3 MiB to arrive.
            let status = status.as_deref().unwrap_or("closed");
            assert!(
                ["http/1.1 408", "http/1.1 429", "closed"]
                    .iter()
                    .any(|s| status.starts_with(s)),
                "{o:?}"
            );
            assert!(
                *after >= READ_TIMEOUT - Duration::from_millis(200) && *after < READ_TIMEOUT * 3,
                "{o:?}"
            );
        }
    }
    assert!(answered >= 10, "{answered} reviews answered");
    assert!(slowest < Duration::from_secs(1), "slowest review {slowest:?}");

    // The cut-off connections are gone, not left to their keep-alive timeout.
    let gone = Instant::now();
    while run.connections.open_from(TRICKLER.into()) > 0 {
        assert!(
            gone.elapsed() < Duration::from_secs(5),
            "trickler connections still open"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The server's side: 16 connections refused; of the 8 accepted, the 4 holding the
    // address's review slots timed out on their bodies, and the 4 waiting either got no slot
    // (429) or got one late and timed out too.
    let text = String::from_utf8(run.metrics.render()).unwrap();
    let refusals = |what: &str, reason: &str| -> u64 {
        let key = format!(r#"sidecert_webhook_refusals_total{{reason="{reason}",what="{what}"}} "#);
        text.lines()
            .find_map(|l| l.strip_prefix(&key))
            .map_or(0, |v| v.trim().parse().unwrap())
    };
    assert_eq!(refusals("connection", "per_address"), 16, "{text}");
    let (timeouts, no_slot) = (refusals("body", "timeout"), refusals("review", "per_address"));
    assert!(timeouts >= 4 && timeouts + no_slot == 8, "{text}");
    run.handle.stop(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_head_is_cut_off_and_the_total_is_bounded() {
    let limits = Limits {
        request_read_timeout: READ_TIMEOUT,
        connections: 4,
        connections_per_address: 4,
        reviews: 4,
        reviews_per_address: 4,
        reserved: Default::default(),
    };
    let run = Arc::new(start("limits-head", limits));
    let result = tokio::task::spawn_blocking({
        let run = run.clone();
        move || {
            // Four addresses' connections fill the total; a fifth address is refused.
            let mut held: Vec<Tls> = (2..6)
                .map(|i| connect(Ipv4Addr::new(127, 0, 1, i), &run).expect("within the total"))
                .collect();
            assert!(connect(Ipv4Addr::new(127, 0, 1, 9), &run).is_none());
            assert_eq!(run.connections.open(), 4);

            // Half a head, then nothing: answered 408 and closed at the read timeout.
            let start = Instant::now();
            held[0].write_all(b"POST /mutate HTTP/1.1\r\nHost: web").unwrap();
            held[0].flush().unwrap();
            let answer = response(&mut held[0]).map(|(status, _)| status);
            let after = start.elapsed();
            assert_eq!(answer.as_deref(), Some("http/1.1 408 request timeout"));
            assert!(after < READ_TIMEOUT * 3, "{after:?}");
            drop(held.remove(0));

            // The freed slot is usable again.
            let gone = Instant::now();
            while run.connections.open() >= 4 {
                assert!(gone.elapsed() < Duration::from_secs(5));
                std::thread::sleep(Duration::from_millis(20));
            }
            let mut tls = connect(Ipv4Addr::new(127, 0, 1, 9), &run).expect("a slot again");
            assert_eq!(
                review(&mut tls, &fixture("pod-direct")).as_deref(),
                Some("http/1.1 200 ok")
            );
        }
    })
    .await;
    run.handle.stop(false).await;
    result.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserved_source_gets_in_and_is_reviewed_while_others_fill_the_totals() {
    // --reserved-sources: the API server's address counts only against its per-address
    // limits. Four other addresses hold every connection and one holds the only review
    // slot (a trickled body); the API server still connects and is answered at once.
    let limits = Limits {
        request_read_timeout: READ_TIMEOUT,
        connections: 4,
        connections_per_address: 4,
        reviews: 1,
        reviews_per_address: 1,
        reserved: Reserved::parse(&API_SERVER.to_string()).unwrap(),
    };
    let run = Arc::new(start("limits-reserved", limits));
    let result = tokio::task::spawn_blocking({
        let run = run.clone();
        move || {
            let mut held: Vec<Tls> = (2..6)
                .map(|i| connect(Ipv4Addr::new(127, 0, 2, i), &run).expect("within the total"))
                .collect();
            assert!(connect(Ipv4Addr::new(127, 0, 2, 9), &run).is_none(), "over the total");
            // The only review slot, held by a body that trickles.
            let head = "POST /mutate HTTP/1.1\r\nHost: webhook\r\nContent-Type: application/json\r\nContent-Length: 3000000\r\n\r\n{";
            held[0].write_all(head.as_bytes()).unwrap();
            held[0].flush().unwrap();
            std::thread::sleep(Duration::from_millis(200));
            let started = Instant::now();
            let mut api = connect(API_SERVER, &run).expect("a reserved source gets in past the total");
            assert_eq!(review(&mut api, &fixture("pod-direct")).as_deref(), Some("http/1.1 200 ok"));
            assert!(started.elapsed() < READ_TIMEOUT, "{:?}: waited for the held slot", started.elapsed());
            assert_eq!(run.connections.open(), 4, "the reserved connection is not in the total");
            drop(held);
        }
    })
    .await;
    run.handle.stop(false).await;
    result.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_closes_idle_connections_at_once() {
    let run = Arc::new(start("limits-stop", Limits::default()));
    let idle = tokio::task::spawn_blocking({
        let run = run.clone();
        move || {
            let mut tls = connect(API_SERVER, &run).unwrap();
            assert_eq!(
                review(&mut tls, &fixture("pod-direct")).as_deref(),
                Some("http/1.1 200 ok")
            );
            tls
        }
    })
    .await
    .unwrap();
    let stopped = Instant::now();
    run.handle.stop(true).await;
    let closed = tokio::task::spawn_blocking(move || {
        let mut tls = idle;
        let mut chunk = [0u8; 64];
        while let Ok(n) = tls.read(&mut chunk) {
            if n == 0 {
                break;
            }
        }
        Instant::now()
    })
    .await
    .unwrap();
    // Not left to the 120 s keep-alive.
    assert!(closed - stopped < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_client_ca_only_its_clients_are_reviewed_and_the_probes_stay_open() {
    let (api_server_ca, api_server) = client_pki();
    let (_, stranger) = client_pki();
    let run = Arc::new(start_with(
        "limits-client-ca",
        Limits::default(),
        Some(&api_server_ca),
    ));
    let result = tokio::task::spawn_blocking({
        let run = run.clone();
        move || {
            let body = fixture("pod-direct");
            // The API server's certificate: reviewed.
            let mut tls = connect_as(API_SERVER, &run, Some(&api_server)).expect("the API server connects");
            assert_eq!(review(&mut tls, &body).as_deref(), Some("http/1.1 200 ok"));
            // No certificate (a Pod that reaches port 8443): 401, and the probes still answer.
            let mut tls = connect(TRICKLER, &run).expect("connects without a certificate");
            assert_eq!(
                review(&mut tls, &body).as_deref(),
                Some("http/1.1 401 unauthorized")
            );
            for path in ["/healthz", "/readyz"] {
                let mut tls = connect(TRICKLER, &run).unwrap();
                assert_eq!(get(&mut tls, path).as_deref(), Some("http/1.1 200 ok"), "{path}");
            }
            // A certificate of another CA: the handshake fails, nothing is answered.
            let answered =
                connect_as(TRICKLER, &run, Some(&stranger)).and_then(|mut tls| review(&mut tls, &body));
            assert_eq!(answered, None);
        }
    })
    .await;
    let text = String::from_utf8(run.metrics.render()).unwrap();
    run.handle.stop(false).await;
    result.unwrap();
    assert!(
        text.contains(r#"sidecert_webhook_refusals_total{reason="unauthenticated",what="review"} 1"#),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_head_on_a_kept_alive_connection_is_cut_off_too() {
    // actix-http times only a connection's first head: a client that sent one byte of the
    // next head and then trickled held the connection for as long as it liked.
    let run = Arc::new(start(
        "limits-later-head",
        Limits {
            request_read_timeout: READ_TIMEOUT,
            ..Limits::default()
        },
    ));
    let result = tokio::task::spawn_blocking({
        let run = run.clone();
        move || {
            let mut tls = connect(TRICKLER, &run).unwrap();
            assert_eq!(
                review(&mut tls, &fixture("pod-direct")).as_deref(),
                Some("http/1.1 200 ok")
            );
            tls.sock
                .set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let start = Instant::now();
            let mut chunk = [0u8; 256];
            let closed = loop {
                if start.elapsed() > READ_TIMEOUT * 3 {
                    break None;
                }
                if tls.write_all(b"x").is_err() || tls.flush().is_err() {
                    break Some(start.elapsed());
                }
                match tls.read(&mut chunk) {
                    Ok(0) => break Some(start.elapsed()),
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Ok(_) | Err(_) => break Some(start.elapsed()),
                }
            };
            let closed = closed.expect("the trickled head was never cut off");
            assert!(
                closed >= READ_TIMEOUT - Duration::from_millis(200),
                "cut off after {closed:?}, before the read timeout"
            );
            // The same connection served a review first: a slow review is not a slow head.
        }
    })
    .await;
    let text = String::from_utf8(run.metrics.render()).unwrap();
    run.handle.stop(false).await;
    result.unwrap();
    assert!(
        text.contains(r#"sidecert_webhook_refusals_total{reason="timeout",what="head"} 1"#),
        "{text}"
    );
}
