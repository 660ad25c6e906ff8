//! `sidecert-e2e plane-dns`: keeps pebble-challtestsrv's A records in line with the cluster,
//! as real DNS plus an ingress controller would. No real component gives Pebble these records:
//! the kubelet, containerd and kube-proxy run the node, and this is all the plane adds.
//!
//! * every TLS host of every Ingress resolves to the ready endpoints of the Service behind
//!   the host's `/.well-known/acme-challenge/` path (else the rule's first backend, else the
//!   Ingress' default backend);
//! * every domain in a Pod's `sidecert.io/domains` annotation resolves to that Pod's IP.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::Pod,
    discovery::v1::EndpointSlice,
    networking::v1::{Ingress, IngressBackend},
};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, reflector, reflector::Store, watcher},
};
use serde::de::DeserializeOwned;
use sidecert_contract::{ACME_CHALLENGE_PATH, annotations::DOMAINS, parse_domains};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// `sidecert-e2e plane-dns` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Admin kubeconfig of the plane.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: PathBuf,
    /// pebble-challtestsrv's management URL.
    #[arg(long, default_value = "http://127.0.0.1:8055")]
    pub challtestsrv: String,
}

/// Host → addresses.
pub type Records = BTreeMap<String, BTreeSet<Ipv4Addr>>;

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
const DEBOUNCE: Duration = Duration::from_millis(200);

/// The records the cluster asks for. Hosts without any address are left out.
pub fn desired(ingresses: &[Arc<Ingress>], slices: &[Arc<EndpointSlice>], pods: &[Arc<Pod>]) -> Records {
    let mut records = Records::new();
    for ing in ingresses {
        let ns = ing.metadata.namespace.as_deref().unwrap_or_default();
        let Some(spec) = &ing.spec else { continue };
        for host in spec.tls.iter().flatten().flat_map(|t| t.hosts.iter().flatten()) {
            let host = host.trim().trim_end_matches('.').to_ascii_lowercase();
            if host.is_empty() || host.starts_with("*.") {
                continue;
            }
            let Some(service) = service_for_host(ing, &host) else {
                continue;
            };
            let ready = ready_addresses(slices, ns, &service);
            if !ready.is_empty() {
                records.entry(host).or_default().extend(ready);
            }
        }
    }
    for pod in pods {
        if pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            continue;
        }
        let Some(value) = pod.metadata.annotations.as_ref().and_then(|a| a.get(DOMAINS)) else {
            continue;
        };
        let Some(ip) = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
        else {
            continue;
        };
        match parse_domains(value) {
            Ok(domains) => domains.into_iter().for_each(|d| {
                records.entry(d).or_default().insert(ip);
            }),
            Err(e) => debug!(pod = ?pod.metadata.name, error = %e, "ignoring bad domains annotation"),
        }
    }
    records
}

/// The Service that serves `host`'s HTTP-01 challenges.
fn service_for_host(ing: &Ingress, host: &str) -> Option<String> {
    let spec = ing.spec.as_ref()?;
    let backend_service = |b: &IngressBackend| b.service.as_ref().map(|s| s.name.clone());
    let rule = spec
        .rules
        .iter()
        .flatten()
        .find(|r| r.host.as_deref().is_some_and(|h| h.eq_ignore_ascii_case(host)))
        .or_else(|| spec.rules.iter().flatten().find(|r| r.host.is_none()));
    let paths = rule
        .and_then(|r| r.http.as_ref())
        .map(|h| h.paths.as_slice())
        .unwrap_or_default();
    let challenge = paths.iter().find(|p| {
        p.path.as_deref().is_some_and(|path| {
            path.trim_end_matches('/') == ACME_CHALLENGE_PATH.trim_end_matches('/')
                || path.starts_with(ACME_CHALLENGE_PATH)
        })
    });
    challenge
        .or_else(|| paths.first())
        .and_then(|p| backend_service(&p.backend))
        .or_else(|| spec.default_backend.as_ref().and_then(backend_service))
}

fn ready_addresses(slices: &[Arc<EndpointSlice>], ns: &str, service: &str) -> BTreeSet<Ipv4Addr> {
    slices
        .iter()
        .filter(|s| s.metadata.namespace.as_deref() == Some(ns))
        .filter(|s| {
            s.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .map(String::as_str)
                == Some(service)
        })
        .flat_map(|s| s.endpoints.iter())
        // An unset `ready` means ready (the API's documented reading of "unknown").
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .flat_map(|e| e.addresses.iter())
        .filter_map(|a| a.parse::<Ipv4Addr>().ok())
        .collect()
}

/// What to send to bring `current` to `desired`: records to add (new or changed) and hosts
/// to clear.
pub fn diff(current: &Records, desired: &Records) -> (Records, Vec<String>) {
    let adds = desired
        .iter()
        .filter(|(h, a)| current.get(*h) != Some(*a))
        .map(|(h, a)| (h.clone(), a.clone()))
        .collect();
    let clears = current
        .keys()
        .filter(|h| !desired.contains_key(*h))
        .cloned()
        .collect();
    (adds, clears)
}

/// A pebble-challtestsrv management API client.
#[derive(Debug, Clone)]
pub struct Challtestsrv {
    http: reqwest::Client,
    base: String,
}

impl Challtestsrv {
    pub fn new(base: &str) -> crate::Result<Self> {
        Ok(Self {
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(5))
                .build()?,
            base: base.trim_end_matches('/').to_owned(),
        })
    }

    /// Makes `host` resolve to exactly `addresses`. (challtestsrv's `add-a` appends to what
    /// the host has, so the host is cleared first.)
    pub async fn set_a(&self, host: &str, addresses: &[String]) -> crate::Result<()> {
        self.clear_a(host).await?;
        self.post("add-a", serde_json::json!({"host": host, "addresses": addresses}))
            .await
    }

    pub async fn clear_a(&self, host: &str) -> crate::Result<()> {
        self.post("clear-a", serde_json::json!({"host": host})).await
    }

    async fn post(&self, path: &str, body: serde_json::Value) -> crate::Result<()> {
        self.http
            .post(format!("{}/{path}", self.base))
            .json(&body)
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }
}

fn reflect<K>(api: Api<K>, notify: Arc<Notify>) -> (Store<K>, impl std::future::Future<Output = ()>)
where
    K: kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector(writer, watcher(api, watcher::Config::default())).default_backoff();
    let drive = async move {
        let mut stream = stream.boxed();
        while let Some(e) = stream.next().await {
            match e {
                Ok(_) => notify.notify_one(),
                Err(e) => warn!(error = %e, "dns watch error"),
            }
        }
    };
    (reader, drive)
}

/// Runs until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> crate::Result<()> {
    let client = crate::client_from_kubeconfig(&config.kubeconfig).await?;
    let challtestsrv = Challtestsrv::new(&config.challtestsrv)?;
    info!("plane-dns: keeping challtestsrv's records in line with the cluster");
    sync(client, challtestsrv, shutdown).await;
    info!("plane-dns stopped");
    Ok(())
}

/// Recomputes the records on every Ingress, EndpointSlice or Pod change (debounced) and
/// sends the difference to challtestsrv, until `shutdown`.
async fn sync(client: Client, challtestsrv: Challtestsrv, shutdown: CancellationToken) {
    let notify = Arc::new(Notify::new());
    let (ingresses, a) = reflect(Api::<Ingress>::all(client.clone()), notify.clone());
    let (slices, b) = reflect(Api::<EndpointSlice>::all(client.clone()), notify.clone());
    let (pods, c) = reflect(Api::<Pod>::all(client), notify.clone());
    let drivers = async {
        tokio::join!(a, b, c);
    };
    let sync = async {
        for store in [
            ingresses.wait_until_ready().await.is_ok(),
            slices.wait_until_ready().await.is_ok(),
            pods.wait_until_ready().await.is_ok(),
        ] {
            if !store {
                warn!("dns store not ready");
            }
        }
        let mut current = Records::new();
        loop {
            let want = desired(&ingresses.state(), &slices.state(), &pods.state());
            let (adds, clears) = diff(&current, &want);
            let mut failed = false;
            for (host, addrs) in adds {
                let list: Vec<String> = addrs.iter().map(Ipv4Addr::to_string).collect();
                match challtestsrv.set_a(&host, &list).await {
                    Ok(()) => {
                        info!(host, addresses = ?list, "dns: A record set");
                        current.insert(host, addrs);
                    }
                    Err(e) => {
                        warn!(host, error = %e, "dns: add-a failed");
                        failed = true;
                    }
                }
            }
            for host in clears {
                match challtestsrv.clear_a(&host).await {
                    Ok(()) => {
                        info!(host, "dns: A record cleared");
                        current.remove(&host);
                    }
                    Err(e) => {
                        warn!(host, error = %e, "dns: clear-a failed");
                        failed = true;
                    }
                }
            }
            let retry = if failed {
                Duration::from_secs(2)
            } else {
                Duration::from_secs(60)
            };
            tokio::select! {
                _ = notify.notified() => {}
                _ = tokio::time::sleep(retry) => {}
            }
            tokio::time::sleep(DEBOUNCE).await;
        }
    };
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = drivers => {}
        _ = sync => {}
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use serde_json::json;

    use super::*;

    fn ingress(v: serde_json::Value) -> Arc<Ingress> {
        Arc::new(serde_json::from_value(v).unwrap())
    }

    fn slice(ns: &str, svc: &str, endpoints: serde_json::Value) -> Arc<EndpointSlice> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": format!("{svc}-x"), "namespace": ns,
                              "labels": {"kubernetes.io/service-name": svc}},
                "addressType": "IPv4",
                "endpoints": endpoints
            }))
            .unwrap(),
        )
    }

    fn pod(name: &str, domains: Option<&str>, ip: Option<&str>, deleting: bool) -> Arc<Pod> {
        let mut meta = json!({"name": name, "namespace": "shop"});
        if let Some(d) = domains {
            meta["annotations"] = json!({"sidecert.io/domains": d});
        }
        if deleting {
            meta["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        Arc::new(
            serde_json::from_value(json!({"metadata": meta, "status": {"podIP": ip, "phase": "Running"}}))
                .unwrap(),
        )
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn web_ingress() -> Arc<Ingress> {
        ingress(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {
                "tls": [{"hosts": ["Web.Example", "api.example", "*.wild.example", "nobackend.example"], "secretName": "web-tls"}],
                "rules": [
                    {"host": "web.example", "http": {"paths": [
                        {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "web", "port": {"number": 80}}}},
                        {"path": "/.well-known/acme-challenge/", "pathType": "Prefix",
                         "backend": {"service": {"name": "web-sidecert-solver", "port": {"number": 8089}}}}
                    ]}},
                    {"host": "api.example", "http": {"paths": [
                        {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "api", "port": {"number": 80}}}}
                    ]}}
                ]
            }
        }))
    }

    #[test]
    fn ingress_hosts_follow_the_challenge_route_else_first_backend() {
        let slices = [
            slice(
                "shop",
                "web",
                json!([{"addresses": ["10.213.0.50"], "conditions": {"ready": true}}]),
            ),
            slice(
                "shop",
                "web-sidecert-solver",
                json!([
                    {"addresses": ["10.213.0.10"], "conditions": {"ready": true}},
                    {"addresses": ["10.213.0.11"], "conditions": {"ready": false}},
                    {"addresses": ["10.213.0.12"]}
                ]),
            ),
            slice(
                "shop",
                "api",
                json!([{"addresses": ["10.213.0.20"], "conditions": {"ready": true}}]),
            ),
            slice(
                "other",
                "api",
                json!([{"addresses": ["10.213.0.99"], "conditions": {"ready": true}}]),
            ),
        ];
        let got = desired(&[web_ingress()], &slices, &[]);
        let want: Records = [
            (
                "web.example".to_string(),
                [ip("10.213.0.10"), ip("10.213.0.12")].into(),
            ),
            ("api.example".to_string(), [ip("10.213.0.20")].into()),
        ]
        .into();
        assert_eq!(got, want);
    }

    #[test]
    fn hosts_without_ready_endpoints_are_left_out() {
        let slices = [slice(
            "shop",
            "web-sidecert-solver",
            json!([{"addresses": ["10.213.0.10"], "conditions": {"ready": false}}]),
        )];
        assert!(desired(&[web_ingress()], &slices, &[]).is_empty());
    }

    #[test]
    fn default_backend_serves_hosts_without_a_rule() {
        let ing = ingress(json!({
            "metadata": {"name": "d", "namespace": "shop"},
            "spec": {"tls": [{"hosts": ["d.example"]}],
                     "defaultBackend": {"service": {"name": "dflt", "port": {"number": 80}}}}
        }));
        let slices = [slice("shop", "dflt", json!([{"addresses": ["10.213.0.30"]}]))];
        assert_eq!(
            desired(&[ing], &slices, &[]),
            [("d.example".to_string(), [ip("10.213.0.30")].into())].into()
        );
    }

    #[test]
    fn pod_domains_resolve_to_the_pod() {
        let pods = [
            pod("a", Some("a.example, B.example"), Some("10.213.0.40"), false),
            pod("b", Some("b.example"), Some("10.213.0.41"), false),
            pod("c", Some("c.example"), None, false),
            pod("d", Some("d.example"), Some("10.213.0.42"), true),
            pod("e", None, Some("10.213.0.43"), false),
            pod("f", Some("not a domain!"), Some("10.213.0.44"), false),
        ];
        let want: Records = [
            ("a.example".to_string(), [ip("10.213.0.40")].into()),
            (
                "b.example".to_string(),
                [ip("10.213.0.40"), ip("10.213.0.41")].into(),
            ),
        ]
        .into();
        assert_eq!(desired(&[], &[], &pods), want);
    }

    #[test]
    fn diff_adds_changed_and_clears_removed() {
        let current: Records = [
            ("same.example".to_string(), [ip("10.213.0.1")].into()),
            ("changed.example".to_string(), [ip("10.213.0.2")].into()),
            ("gone.example".to_string(), [ip("10.213.0.3")].into()),
        ]
        .into();
        let desired: Records = [
            ("same.example".to_string(), [ip("10.213.0.1")].into()),
            ("changed.example".to_string(), [ip("10.213.0.9")].into()),
            ("new.example".to_string(), [ip("10.213.0.4")].into()),
        ]
        .into();
        let (adds, clears) = diff(&current, &desired);
        assert_eq!(
            adds.keys().collect::<Vec<_>>(),
            ["changed.example", "new.example"]
        );
        assert_eq!(clears, ["gone.example"]);
    }
}
