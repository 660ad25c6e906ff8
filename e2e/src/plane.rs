//! The test helper: reach the local plane (bringing it up if needed), get namespaces.

use std::{
    collections::BTreeMap,
    future::Future,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use k8s_openapi::api::core::v1::{Event, Namespace, Pod};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, LogParams, PostParams},
};
use rand::Rng;
use tokio::sync::OnceCell;

use crate::{Error, Result, client_from_kubeconfig, dns};

static PLANE: OnceCell<Plane> = OnceCell::const_new();

/// The running local plane, as described by `e2e/.state/env`.
#[derive(Debug, Clone)]
pub struct Plane {
    repo_root: PathBuf,
    kubeconfig: PathBuf,
    pebble_directory: String,
    pebble_ca_file: PathBuf,
    pebble_ca_pem: String,
    webhook_client_ca_file: PathBuf,
    pebble_management: String,
    challtestsrv_url: String,
    gateway: Ipv4Addr,
    ingress_http: SocketAddr,
    ingress_https: SocketAddr,
    state_dir: PathBuf,
}

impl Plane {
    /// The plane, brought up with `make cluster-up` the first time in this process if it is
    /// not running.
    pub async fn get() -> Result<&'static Plane> {
        crate::install_crypto_provider();
        PLANE.get_or_try_init(Self::connect_or_start).await
    }

    async fn connect_or_start() -> Result<Plane> {
        let repo_root = repo_root();
        let env_file = repo_root.join("e2e/.state/env");
        if env_file.exists()
            && let Ok(plane) = Self::from_env_file(&repo_root, &env_file).await
            && plane.ready().await
        {
            return Ok(plane);
        }
        eprintln!(
            "sidecert-e2e: local plane not running; `make -C {} cluster-up`",
            repo_root.display()
        );
        let status = tokio::process::Command::new("make")
            .arg("-C")
            .arg(&repo_root)
            .arg("cluster-up")
            .status()
            .await
            .map_err(|e| Error::Command {
                command: "make cluster-up".into(),
                reason: e.to_string(),
            })?;
        if !status.success() {
            return Err(Error::Command {
                command: "make cluster-up".into(),
                reason: status.to_string(),
            });
        }
        let plane = Self::from_env_file(&repo_root, &env_file).await?;
        if !plane.ready().await {
            return Err(Error::invalid(
                "plane",
                "the API server does not answer /readyz after cluster-up",
            ));
        }
        Ok(plane)
    }

    async fn from_env_file(repo_root: &Path, path: &Path) -> Result<Plane> {
        let text = tokio::fs::read_to_string(path)
            .await
            .map_err(|e| Error::io(path, e))?;
        let env = parse_env_file(&text);
        let get = |key: &'static str| {
            env.get(key)
                .cloned()
                .ok_or_else(|| Error::invalid("e2e/.state/env", format!("{key} missing")))
        };
        let resolve = |p: String| {
            let p = PathBuf::from(p);
            if p.is_absolute() { p } else { repo_root.join(p) }
        };
        let pebble_ca_file = resolve(get("PEBBLE_CA_FILE")?);
        let pebble_ca_pem = tokio::fs::read_to_string(&pebble_ca_file)
            .await
            .map_err(|e| Error::io(&pebble_ca_file, e))?;
        let webhook_client_ca_file = resolve(get("WEBHOOK_CLIENT_CA_FILE")?);
        let ingress_ip: Ipv4Addr = get("INGRESS_IP")?
            .parse()
            .map_err(|e| Error::invalid("INGRESS_IP", format!("{e}")))?;
        let port = |key: &'static str| -> Result<u16> {
            get(key)?.parse().map_err(|e| Error::invalid(key, format!("{e}")))
        };
        Ok(Plane {
            ingress_http: SocketAddr::from((ingress_ip, port("INGRESS_HTTP_PORT")?)),
            ingress_https: SocketAddr::from((ingress_ip, port("INGRESS_HTTPS_PORT")?)),
            state_dir: path.parent().map(Path::to_owned).unwrap_or_default(),
            webhook_client_ca_file,
            repo_root: repo_root.to_owned(),
            kubeconfig: resolve(get("KUBECONFIG")?),
            pebble_directory: get("PEBBLE_DIRECTORY")?,
            pebble_ca_file,
            pebble_ca_pem,
            pebble_management: get("PEBBLE_MANAGEMENT")?.trim_end_matches('/').to_owned(),
            challtestsrv_url: env
                .get("CHALLTESTSRV_URL")
                .cloned()
                .unwrap_or_else(|| "http://127.0.0.1:8055".into())
                .trim_end_matches('/')
                .to_owned(),
            gateway: env
                .get("SIDECERT_PLANE_GATEWAY")
                .and_then(|g| g.parse().ok())
                .unwrap_or(Ipv4Addr::new(10, 213, 0, 1)),
        })
    }

    async fn ready(&self) -> bool {
        let Ok(client) = self.client().await else {
            return false;
        };
        let Ok(req) = http::Request::get("/readyz").body(Vec::new()) else {
            return false;
        };
        matches!(client.request_text(req).await, Ok(body) if body.trim() == "ok")
    }

    /// The repository root.
    pub fn repo_root(&self) -> &Path {
        &self.repo_root
    }

    /// The admin kubeconfig.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The ACME directory URL.
    pub fn pebble_directory(&self) -> &str {
        &self.pebble_directory
    }

    /// The CA of Pebble's own HTTPS (PEM), and its file.
    pub fn pebble_ca_pem(&self) -> &str {
        &self.pebble_ca_pem
    }

    pub fn pebble_ca_file(&self) -> &Path {
        &self.pebble_ca_file
    }

    /// The CA of the client certificate the API server presents to admission webhooks.
    pub fn webhook_client_ca_file(&self) -> &Path {
        &self.webhook_client_ca_file
    }

    /// Pebble's management URL.
    pub fn pebble_management(&self) -> &str {
        &self.pebble_management
    }

    /// pebble-challtestsrv's management URL.
    pub fn challtestsrv_url(&self) -> &str {
        &self.challtestsrv_url
    }

    /// Waits until plane-dns has given `host` an A record in
    /// pebble-challtestsrv (it logs every record it sets).
    pub async fn wait_dns_record(&self, host: &str, timeout: Duration) -> Result<()> {
        let log = self.repo_root.join("e2e/.state/logs/plane-dns.log");
        let needle = format!("dns: A record set host=\"{host}\"");
        wait_for(timeout, || async {
            let text = tokio::fs::read_to_string(&log).await.ok()?;
            text.contains(&needle).then_some(())
        })
        .await
    }

    /// The bridge's host address (API server, Pebble, Node InternalIP).
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// The ingress controller's HTTP entrypoint (also Pebble's HTTP-01 port).
    pub fn ingress_http(&self) -> SocketAddr {
        self.ingress_http
    }

    /// The ingress controller's HTTPS entrypoint.
    pub fn ingress_https(&self) -> SocketAddr {
        self.ingress_https
    }

    /// The folder Traefik's file provider watches (`e2e/scripts/ingress.sh`): a scenario puts
    /// dynamic configuration there (an HTTP-to-HTTPS redirect).
    pub fn traefik_dynamic_dir(&self) -> PathBuf {
        self.state_dir.join("traefik/dynamic")
    }

    /// A new client (clients are bound to the runtime that made them; each test has its own).
    pub async fn client(&self) -> Result<Client> {
        client_from_kubeconfig(&self.kubeconfig).await
    }

    /// Pebble's issuing root (`GET <management>/roots/0`), PEM.
    pub async fn pebble_root_pem(&self) -> Result<String> {
        let ca = reqwest::Certificate::from_pem(self.pebble_ca_pem.as_bytes())?;
        let http = reqwest::Client::builder()
            .add_root_certificate(ca)
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()?;
        Ok(http
            .get(format!("{}/roots/0", self.pebble_management))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?)
    }

    /// Points `host` at `ip` (only) in pebble-challtestsrv's DNS.
    pub async fn add_a(&self, host: &str, ip: Ipv4Addr) -> Result<()> {
        dns::Challtestsrv::new(&self.challtestsrv_url)?
            .set_a(host, &[ip.to_string()])
            .await
    }

    /// Removes `host`'s A record.
    pub async fn clear_a(&self, host: &str) -> Result<()> {
        dns::Challtestsrv::new(&self.challtestsrv_url)?
            .clear_a(host)
            .await
    }

    /// Creates `<prefix>-<6 random chars>`, labelled `sidecert.io/injection=enabled` when
    /// `labelled`. Deleted when the returned value is dropped.
    pub async fn namespace(&self, prefix: &str, labelled: bool) -> Result<TestNamespace> {
        let client = self.client().await?;
        let suffix: String = rand::rng()
            .sample_iter(rand::distr::Alphanumeric)
            .take(6)
            .map(|c| char::from(c).to_ascii_lowercase())
            .collect();
        let name = format!("{prefix}-{suffix}");
        let mut ns = Namespace::default();
        ns.metadata.name = Some(name.clone());
        if labelled {
            ns.metadata.labels = Some(BTreeMap::from([(
                sidecert_contract::INJECTION_LABEL.to_owned(),
                sidecert_contract::INJECTION_ENABLED.to_owned(),
            )]));
        }
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await?;
        Ok(TestNamespace {
            name,
            client,
            kubeconfig: self.kubeconfig.clone(),
            cleaned: false,
        })
    }

    /// Prints the namespace's Pods, Events and container logs (for a failing test).
    pub async fn dump_on_failure(&self, ns: &str) {
        match self.client().await {
            Ok(client) => dump_on_failure(&client, ns).await,
            Err(e) => eprintln!("dump: no client: {e}"),
        }
    }
}

/// A namespace for one test; deleted on drop (best effort) or by [`TestNamespace::cleanup`].
pub struct TestNamespace {
    name: String,
    client: Client,
    kubeconfig: PathBuf,
    cleaned: bool,
}

impl TestNamespace {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A client (made in the test's runtime).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// An `Api` for namespaced resources in this namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// Deletes the namespace now.
    pub async fn cleanup(mut self) -> Result<()> {
        self.cleaned = true;
        delete_namespace(&self.client, &self.name).await
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        // The test's runtime may be shutting down: delete from a runtime of our own.
        let name = self.name.clone();
        let kubeconfig = self.kubeconfig.clone();
        let thread = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            rt.block_on(async {
                if let Ok(client) = client_from_kubeconfig(&kubeconfig).await {
                    let _ = delete_namespace(&client, &name).await;
                }
            });
        });
        let _ = thread.join();
    }
}

async fn delete_namespace(client: &Client, name: &str) -> Result<()> {
    match Api::<Namespace>::all(client.clone())
        .delete(name, &DeleteParams::background())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Polls `check` every 250 ms until it returns `Some`, for at most `timeout`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Timeout(timeout));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Creates Pods `<prefix>-1`, `<prefix>-2`, ... (from `pod`, given the name) until one comes
/// back from admission as `accepted` wants, for at most `timeout`; the others are deleted.
/// For a webhook that is still catching up: its configuration not yet seen by the API
/// server, or its caches not yet holding a new Ingress.
pub async fn create_until<F, A>(
    api: &Api<Pod>,
    prefix: &str,
    timeout: Duration,
    pod: F,
    accepted: A,
) -> Result<Pod>
where
    F: Fn(&str) -> Pod,
    A: Fn(&Pod) -> bool,
{
    let mut attempt = 0u32;
    let accepted = &accepted;
    wait_for(timeout, || {
        attempt += 1;
        let name = format!("{prefix}-{attempt}");
        let object = pod(&name);
        async move {
            let created = api
                .create(&PostParams::default(), &object)
                .await
                .map_err(|e| eprintln!("creating Pod {name}: {e}"))
                .ok()?;
            if accepted(&created) {
                return Some(created);
            }
            let _ = api.delete(&name, &DeleteParams::default()).await;
            None
        }
    })
    .await
}

/// Prints a namespace's Pods (phase, IP, container states), Events and its containers' logs.
pub async fn dump_on_failure(client: &Client, ns: &str) {
    eprintln!("===== dump of namespace {ns} =====");
    match Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
    {
        Ok(pods) => {
            for p in pods {
                let status = p.status.unwrap_or_default();
                eprintln!(
                    "pod {} node={:?} phase={:?} ip={:?}",
                    p.metadata.name.unwrap_or_default(),
                    p.spec.and_then(|s| s.node_name),
                    status.phase,
                    status.pod_ip
                );
                for c in status
                    .init_container_statuses
                    .iter()
                    .flatten()
                    .chain(status.container_statuses.iter().flatten())
                {
                    eprintln!(
                        "  container {} ready={} restarts={} state={}",
                        c.name,
                        c.ready,
                        c.restart_count,
                        serde_json::to_string(&c.state).unwrap_or_default()
                    );
                }
            }
        }
        Err(e) => eprintln!("listing pods failed: {e}"),
    }
    match Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
    {
        Ok(events) => {
            for e in events {
                eprintln!(
                    "event {} {}/{}: {} {}",
                    e.type_.unwrap_or_default(),
                    e.involved_object.kind.unwrap_or_default(),
                    e.involved_object.name.unwrap_or_default(),
                    e.reason.unwrap_or_default(),
                    e.message.unwrap_or_default()
                );
            }
        }
        Err(e) => eprintln!("listing events failed: {e}"),
    }
    print_container_logs(client, ns, 200).await;
    eprintln!("===== end of dump =====");
}

/// Prints the last `lines` lines of every container's log in `ns`, read through the API
/// server from the kubelet (the previous run's too, for a container that restarted).
pub async fn print_container_logs(client: &Client, ns: &str, lines: i64) {
    let api = Api::<Pod>::namespaced(client.clone(), ns);
    let Ok(pods) = api.list(&ListParams::default()).await else {
        return;
    };
    for p in pods {
        let pod = p.metadata.name.clone().unwrap_or_default();
        let status = p.status.unwrap_or_default();
        for c in status
            .init_container_statuses
            .iter()
            .flatten()
            .chain(status.container_statuses.iter().flatten())
        {
            let runs: &[bool] = if c.restart_count > 0 {
                &[true, false]
            } else {
                &[false]
            };
            for &previous in runs {
                let params = LogParams {
                    container: Some(c.name.clone()),
                    tail_lines: Some(lines),
                    previous,
                    ..LogParams::default()
                };
                let which = if previous { " (previous run)" } else { "" };
                match api.logs(&pod, &params).await {
                    Ok(text) => eprintln!("----- {ns}/{pod} {}{which} -----\n{text}", c.name),
                    Err(e) => eprintln!("----- {ns}/{pod} {}{which}: no log: {e}", c.name),
                }
            }
        }
    }
}

/// The repository root: the parent of this crate's manifest directory.
fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_owned()
}

/// `export KEY=VALUE` / `KEY="VALUE"` lines; comments and other lines are ignored.
fn parse_env_file(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let l = l.strip_prefix("export ").unwrap_or(l);
            let (k, v) = l.split_once('=')?;
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            Some((k.trim().to_owned(), v.to_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn parses_env_file() {
        let env = parse_env_file(
            "# plane\nexport KUBECONFIG=/r/e2e/.state/kubeconfig\nexport PEBBLE_DIRECTORY=\"https://10.213.0.1:14000/dir\"\n\
             PEBBLE_CA_FILE='/r/ca.crt'\necho hi\n",
        );
        assert_eq!(
            env.get("KUBECONFIG").map(String::as_str),
            Some("/r/e2e/.state/kubeconfig")
        );
        assert_eq!(
            env.get("PEBBLE_DIRECTORY").map(String::as_str),
            Some("https://10.213.0.1:14000/dir")
        );
        assert_eq!(env.get("PEBBLE_CA_FILE").map(String::as_str), Some("/r/ca.crt"));
        assert_eq!(env.len(), 3);
    }

    #[tokio::test]
    async fn wait_for_times_out_and_succeeds() {
        let r: Result<()> = wait_for(Duration::from_millis(300), || async { None }).await;
        assert!(matches!(r, Err(Error::Timeout(_))));
        let mut n = 0;
        let v = wait_for(Duration::from_secs(5), || {
            n += 1;
            let n = n;
            async move { (n >= 2).then_some(n) }
        })
        .await
        .unwrap();
        assert_eq!(v, 2);
    }
}
