//! Helpers for the Pebble tests: the plane, a private Pebble, chain checks, metrics.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use rand::Rng;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_sidecert-sidecar")
}

pub fn init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SIDECERT_TEST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_test_writer()
        .try_init();
}

/// A random domain under `.example` with a prefix.
pub fn domain(prefix: &str) -> String {
    let n: u32 = rand::rng().random();
    format!("{prefix}-{n:08x}.example")
}

pub fn temp_dir(prefix: &str) -> PathBuf {
    let n: u32 = rand::rng().random();
    let d = std::env::temp_dir().join(format!("sidecert-test-{prefix}-{n:08x}"));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Points `host` at `ip` through a challtestsrv management API.
pub async fn add_a(challtestsrv: &str, host: &str, ip: Ipv4Addr) {
    let body = serde_json::json!({"host": host, "addresses": [ip.to_string()]}).to_string();
    let url = format!("{challtestsrv}/add-a");
    let (status, text) = post(&url, body).await;
    assert!(status.is_success(), "{url}: {status} {text}");
}

async fn post(url: &str, body: String) -> (http::StatusCode, String) {
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    let client: Client<_, Full<bytes::Bytes>> =
        Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let req = http::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let rsp = client.request(req).await.unwrap();
    let status = rsp.status();
    let b = rsp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&b).into_owned())
}

/// GET over HTTPS trusting `ca_pem` (Pebble's management interface).
pub async fn https_get(url: &str, ca_pem: &str) -> String {
    use http_body_util::{BodyExt, Empty};
    let mut roots = rustls::RootCertStore::empty();
    for c in sidecert_sidecar::certificate::x509::pem_certificates(ca_pem).unwrap() {
        roots.add(c).unwrap();
    }
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let conn = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(cfg)
        .https_only()
        .enable_http1()
        .build();
    let client: hyper_util::client::legacy::Client<_, Empty<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(conn);
    let req = http::Request::get(url)
        .header("user-agent", "sidecert-test")
        .body(Empty::new())
        .unwrap();
    let rsp = client.request(req).await.unwrap();
    let status = rsp.status();
    let b = rsp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&b).into_owned();
    assert!(status.is_success(), "{url}: {status} {text}");
    text
}

/// Checks that `chain_pem` (leaf first) chains to `root_pem` and names `domains`.
pub fn assert_chains_to(chain_pem: &str, root_pem: &str, domains: &[String]) {
    use x509_parser::prelude::*;
    let chain = sidecert_sidecar::certificate::x509::pem_certificates(chain_pem).unwrap();
    let root = sidecert_sidecar::certificate::x509::pem_certificates(root_pem).unwrap();
    let mut all: Vec<_> = chain.iter().collect();
    all.push(&root[0]);
    let parsed: Vec<X509Certificate<'_>> = all
        .iter()
        .map(|d| parse_x509_certificate(d.as_ref()).unwrap().1)
        .collect();
    for pair in parsed.windows(2) {
        pair[0]
            .verify_signature(Some(pair[1].public_key()))
            .unwrap_or_else(|e| panic!("{} not signed by {}: {e}", pair[0].subject(), pair[1].subject()));
    }
    let info = sidecert_sidecar::certificate::x509::CertInfo::from_pem_chain(chain_pem).unwrap();
    let want: std::collections::BTreeSet<String> = domains.iter().cloned().collect();
    assert_eq!(info.domains, want);
}

/// Scrapes a metrics endpoint.
pub async fn scrape(addr: &str) -> String {
    match sidecert_sidecar::challenge::responder::http_request(
        http::Method::GET,
        &format!("http://{addr}/metrics"),
    )
    .await
    {
        Ok((_, body)) => body,
        Err(_) => String::new(),
    }
}

/// The value of one sample line (`name{labels}`), 0 when absent.
pub fn sample(metrics: &str, name_and_labels: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or(0.0)
}

pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A child process killed on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A private Pebble (and challtestsrv) on its own ports.
pub struct OwnPebble {
    pub directory: String,
    pub management: String,
    pub challtestsrv: String,
    pub ca_file: PathBuf,
    pub dir: PathBuf,
    procs: Vec<Proc>,
}

impl OwnPebble {
    /// Starts challtestsrv and Pebble; `port_base` + 0..4 are used on 127.0.0.1.
    pub fn start(port_base: u16, extra_env: &[(&str, &str)], start_pebble: bool) -> Self {
        Self::launch(port_base, extra_env, start_pebble, &[])
    }

    /// A Pebble that requires external account binding, with these (key id, base64url HMAC
    /// key) pairs.
    pub fn start_requiring_eab(port_base: u16, mac_keys: &[(&str, &str)]) -> Self {
        Self::launch(port_base, &[], true, mac_keys)
    }

    fn launch(
        port_base: u16,
        extra_env: &[(&str, &str)],
        start_pebble: bool,
        mac_keys: &[(&str, &str)],
    ) -> Self {
        let root = repo_root();
        let dir = temp_dir("pebble");
        let pki = root.join("e2e/.state/pki");
        let (dir_port, mgmt_port, dns_port, cts_port) =
            (port_base, port_base + 1, port_base + 2, port_base + 3);
        let config = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{dir_port}"),
            "managementListenAddress": format!("127.0.0.1:{mgmt_port}"),
            "certificate": pki.join("pebble.crt"),
            "privateKey": pki.join("pebble.key"),
            "httpPort": 8089, "tlsPort": 5001, "ocspResponderURL": "",
            "externalAccountBindingRequired": !mac_keys.is_empty(),
            "externalAccountMACKeys": mac_keys.iter().copied().collect::<std::collections::BTreeMap<_, _>>(),
            "retryAfter": {"authz": 1, "order": 1},
            "profiles": {
                "default": {"description": "90 days", "validityPeriod": 7776000},
                "shortlived": {"description": "120 s", "validityPeriod": 120}
            }
        }});
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        let cts = Command::new(root.join("e2e/.cache/bin/pebble-challtestsrv"))
            .args([
                "-dnsserver",
                &format!("127.0.0.1:{dns_port}"),
                "-management",
                &format!("127.0.0.1:{cts_port}"),
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-doh",
                "",
                "-defaultIPv6",
                "",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pebble-challtestsrv");
        let mut me = Self {
            directory: format!("https://127.0.0.1:{dir_port}/dir"),
            management: format!("https://127.0.0.1:{mgmt_port}"),
            challtestsrv: format!("http://127.0.0.1:{cts_port}"),
            ca_file: pki.join("pebble-ca.crt"),
            dir,
            procs: vec![Proc(cts)],
        };
        // Ready once its management API accepts connections (add_a must not race its start).
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", cts_port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "pebble-challtestsrv did not listen on {cts_port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        if start_pebble {
            me.start_pebble(extra_env, dns_port);
        }
        me
    }

    pub fn start_pebble(&mut self, extra_env: &[(&str, &str)], dns_port: u16) {
        let log = std::fs::File::create(self.dir.join("pebble.log")).unwrap();
        let mut cmd = Command::new(repo_root().join("e2e/.cache/bin/pebble"));
        cmd.args([
            "-config",
            &self.dir.join("config.json").display().to_string(),
            "-dnsserver",
            &format!("127.0.0.1:{dns_port}"),
        ])
        .env("PEBBLE_VA_NOSLEEP", "1")
        .stdout(log.try_clone().unwrap())
        .stderr(log);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        self.procs.push(Proc(cmd.spawn().expect("pebble")));
    }

    /// Kills Pebble and starts a new one on the same ports: it has forgotten every account,
    /// order and root.
    pub fn restart_pebble(&mut self, dns_port: u16) {
        self.procs.pop();
        self.start_pebble(&[], dns_port);
    }

    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(&self.ca_file).unwrap()
    }

    pub async fn wait_ready(&self) {
        let ca = self.ca_pem();
        let dir = self.directory.clone();
        wait_until("pebble", Duration::from_secs(20), || {
            let (dir, ca) = (dir.clone(), ca.clone());
            async move {
                let r = tokio::time::timeout(Duration::from_secs(2), async {
                    tokio::spawn(async move { https_get(&dir, &ca).await }).await
                })
                .await;
                matches!(r, Ok(Ok(_))).then_some(())
            }
        })
        .await;
    }

    pub async fn root_pem(&self) -> String {
        https_get(&format!("{}/roots/0", self.management), &self.ca_pem()).await
    }
}
