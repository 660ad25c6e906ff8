//! `sidecert-e2e plane-dns`: keeps pebble-challtestsrv's A records in line with the cluster,
//! as real DNS (external-dns, say) would. No real component gives Pebble these records: the
//! kubelet, containerd, kube-proxy and the ingress controller run the node, and this is all
//! the plane adds.
//!
//! * every host of every Ingress (its TLS hosts and its rules' hosts) resolves to the
//!   addresses the ingress controller serving it published in its status (Traefik: the
//!   node's address); an Ingress no controller serves gets no record;
//! * every hostname of a Gateway API Gateway's listeners, and of the HTTPRoutes attached to
//!   it, resolves to the addresses in the Gateway's status (Traefik's Gateway provider
//!   publishes the node's address); without the Gateway API CRDs there are none;
//! * every domain in a Pod's `sidecert.io/domains` annotation resolves to that Pod's IP.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::{core::v1::Pod, networking::v1::Ingress};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{WatchStreamExt, reflector, reflector::Store, watcher},
};
use serde::de::DeserializeOwned;
use sidecert_contract::{annotations::DOMAINS, parse_domains};
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

const DEBOUNCE: Duration = Duration::from_millis(200);

fn normalise(host: &str) -> Option<String> {
    let host = host.trim().trim_end_matches('.').to_ascii_lowercase();
    (!host.is_empty() && !host.starts_with("*.")).then_some(host)
}

/// The Gateway API kinds plane-dns reads (k8s-openapi has no types for them).
pub fn gateway_api(kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", kind))
}

/// The IPv4 addresses a Gateway's status publishes (`type` unset or `IPAddress`).
fn gateway_addresses(gateway: &DynamicObject) -> BTreeSet<Ipv4Addr> {
    gateway.data["status"]["addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| matches!(a["type"].as_str(), None | Some("IPAddress")))
        .filter_map(|a| a["value"].as_str()?.parse().ok())
        .collect()
}

fn strings(v: &serde_json::Value) -> impl Iterator<Item = &str> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(serde_json::Value::as_str)
}

/// Gateway hosts: each Gateway's listener hostnames, and the hostnames of the HTTPRoutes
/// whose `parentRefs` name it, resolve to the Gateway's published addresses.
fn gateway_records(records: &mut Records, gateways: &[Arc<DynamicObject>], routes: &[Arc<DynamicObject>]) {
    let mut published: BTreeMap<(String, String), BTreeSet<Ipv4Addr>> = BTreeMap::new();
    for gw in gateways {
        let addresses = gateway_addresses(gw);
        if addresses.is_empty() {
            continue;
        }
        let ns = gw.metadata.namespace.clone().unwrap_or_default();
        let name = gw.metadata.name.clone().unwrap_or_default();
        let listeners = gw.data["spec"]["listeners"].as_array().into_iter().flatten();
        for host in listeners
            .filter_map(|l| l["hostname"].as_str())
            .filter_map(normalise)
        {
            records.entry(host).or_default().extend(&addresses);
        }
        published.insert((ns, name), addresses);
    }
    for route in routes {
        let route_ns = route.metadata.namespace.as_deref().unwrap_or_default();
        let parents = route.data["spec"]["parentRefs"].as_array().into_iter().flatten();
        for parent in parents {
            let is_gateway = matches!(parent["kind"].as_str(), None | Some("Gateway"))
                && matches!(parent["group"].as_str(), None | Some("gateway.networking.k8s.io"));
            let Some(name) = parent["name"].as_str().filter(|_| is_gateway) else {
                continue;
            };
            let ns = parent["namespace"].as_str().unwrap_or(route_ns);
            let Some(addresses) = published.get(&(ns.to_owned(), name.to_owned())) else {
                continue;
            };
            for host in strings(&route.data["spec"]["hostnames"]).filter_map(normalise) {
                records.entry(host).or_default().extend(addresses);
            }
        }
    }
}

/// The records the cluster asks for. Hosts without any address are left out.
pub fn desired(
    ingresses: &[Arc<Ingress>],
    gateways: &[Arc<DynamicObject>],
    routes: &[Arc<DynamicObject>],
    pods: &[Arc<Pod>],
) -> Records {
    let mut records = Records::new();
    gateway_records(&mut records, gateways, routes);
    for ing in ingresses {
        let published: BTreeSet<Ipv4Addr> = ing
            .status
            .iter()
            .filter_map(|s| s.load_balancer.as_ref())
            .flat_map(|lb| lb.ingress.iter().flatten())
            .filter_map(|i| i.ip.as_deref()?.parse().ok())
            .collect();
        if published.is_empty() {
            continue;
        }
        let Some(spec) = &ing.spec else { continue };
        let tls_hosts = spec.tls.iter().flatten().flat_map(|t| t.hosts.iter().flatten());
        let rule_hosts = spec.rules.iter().flatten().filter_map(|r| r.host.as_ref());
        for host in tls_hosts.chain(rule_hosts).filter_map(|h| normalise(h)) {
            records.entry(host).or_default().extend(&published);
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

fn reflect<K>(
    api: Api<K>,
    dyntype: K::DynamicType,
    notify: Arc<Notify>,
) -> (Store<K>, impl std::future::Future<Output = ()>)
where
    K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Clone + Eq + std::hash::Hash + Send + Sync,
{
    let writer = reflector::store::Writer::new(dyntype);
    let reader = writer.as_reader();
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

/// Recomputes the records on every Ingress, Gateway, HTTPRoute or Pod change (debounced) and
/// sends the difference to challtestsrv, until `shutdown`.
async fn sync(client: Client, challtestsrv: Challtestsrv, shutdown: CancellationToken) {
    let notify = Arc::new(Notify::new());
    let (ingresses, a) = reflect(Api::<Ingress>::all(client.clone()), (), notify.clone());
    let (pods, b) = reflect(Api::<Pod>::all(client.clone()), (), notify.clone());
    // Until the Gateway API CRDs are installed (ingress.sh, after plane-dns starts) these
    // watches fail and back off; their stores stay empty meanwhile and are not waited for.
    let (gw, route) = (gateway_api("Gateway"), gateway_api("HTTPRoute"));
    let (gateways, c) = reflect(
        Api::<DynamicObject>::all_with(client.clone(), &gw),
        gw,
        notify.clone(),
    );
    let (routes, d) = reflect(
        Api::<DynamicObject>::all_with(client, &route),
        route,
        notify.clone(),
    );
    let drivers = async {
        tokio::join!(a, b, c, d);
    };
    let sync = async {
        for store in [
            ingresses.wait_until_ready().await.is_ok(),
            pods.wait_until_ready().await.is_ok(),
        ] {
            if !store {
                warn!("dns store not ready");
            }
        }
        let mut current = Records::new();
        loop {
            let want = desired(
                &ingresses.state(),
                &gateways.state(),
                &routes.state(),
                &pods.state(),
            );
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

    use serde_json::{Value, json};

    use super::*;

    fn ingress(v: serde_json::Value) -> Arc<Ingress> {
        Arc::new(serde_json::from_value(v).unwrap())
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

    fn web_ingress(status_ips: &[&str]) -> Arc<Ingress> {
        let lb: Vec<Value> = status_ips.iter().map(|ip| json!({"ip": ip})).collect();
        ingress(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {
                "tls": [{"hosts": ["Web.Example.", "*.wild.example"], "secretName": "web-tls"}],
                "rules": [
                    {"host": "web.example", "http": {"paths": [
                        {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "web", "port": {"number": 80}}}}
                    ]}},
                    {"host": "api.example", "http": {"paths": [
                        {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "api", "port": {"number": 80}}}}
                    ]}},
                    {"http": {"paths": [
                        {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "any", "port": {"number": 80}}}}
                    ]}}
                ]
            },
            "status": {"loadBalancer": {"ingress": lb}}
        }))
    }

    #[test]
    fn ingress_hosts_resolve_to_the_controllers_published_addresses() {
        let got = desired(&[web_ingress(&["10.213.0.1"])], &[], &[], &[]);
        let want: Records = [
            ("web.example".to_string(), [ip("10.213.0.1")].into()),
            ("api.example".to_string(), [ip("10.213.0.1")].into()),
        ]
        .into();
        assert_eq!(got, want);
    }

    #[test]
    fn ingresses_no_controller_serves_resolve_nowhere() {
        assert!(desired(&[web_ingress(&[])], &[], &[], &[]).is_empty());
        let hostname_only = ingress(json!({
            "metadata": {"name": "h", "namespace": "shop"},
            "spec": {"tls": [{"hosts": ["h.example"]}]},
            "status": {"loadBalancer": {"ingress": [{"hostname": "lb.example"}]}}
        }));
        assert!(desired(&[hostname_only], &[], &[], &[]).is_empty());
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
        assert_eq!(desired(&[], &[], &[], &pods), want);
    }

    fn dynamic(kind: &str, v: serde_json::Value) -> Arc<DynamicObject> {
        let mut obj: DynamicObject = serde_json::from_value(v).unwrap();
        obj.types = Some(kube::api::TypeMeta {
            api_version: "gateway.networking.k8s.io/v1".into(),
            kind: kind.into(),
        });
        Arc::new(obj)
    }

    #[test]
    fn gateway_and_route_hostnames_resolve_to_the_gateways_published_addresses() {
        let gw = |name: &str, ns: &str, addresses: Value| {
            dynamic(
                "Gateway",
                json!({
                    "metadata": {"name": name, "namespace": ns},
                    "spec": {"gatewayClassName": "traefik", "listeners": [
                        {"name": "http", "protocol": "HTTP", "port": 8089, "hostname": "Shop.Example"},
                        {"name": "https", "protocol": "HTTPS", "port": 8443, "hostname": "*.wild.example"},
                        {"name": "any", "protocol": "HTTP", "port": 8089}
                    ]},
                    "status": {"addresses": addresses}
                }),
            )
        };
        let gateways = [
            gw(
                "edge",
                "infra",
                json!([{"type": "IPAddress", "value": "10.213.0.1"}, {"type": "Hostname", "value": "lb.example"}]),
            ),
            gw("unpublished", "infra", json!([])),
        ];
        let route = |ns: &str, parents: Value, hostnames: Value| {
            dynamic(
                "HTTPRoute",
                json!({"metadata": {"name": "r", "namespace": ns},
                                        "spec": {"parentRefs": parents, "hostnames": hostnames}}),
            )
        };
        let routes = [
            route(
                "shop",
                json!([{"name": "edge", "namespace": "infra"}]),
                json!(["api.example", "*.x.example"]),
            ),
            // Same name, the route's own namespace: not the Gateway in infra.
            route("shop", json!([{"name": "edge"}]), json!(["wrong-ns.example"])),
            route(
                "shop",
                json!([{"name": "unpublished", "namespace": "infra"}]),
                json!(["nowhere.example"]),
            ),
            route(
                "shop",
                json!([{"name": "edge", "namespace": "infra", "kind": "Service", "group": ""}]),
                json!(["svc.example"]),
            ),
        ];
        let got = desired(&[], &gateways, &routes, &[]);
        let want: Records = [
            ("shop.example".to_string(), [ip("10.213.0.1")].into()),
            ("api.example".to_string(), [ip("10.213.0.1")].into()),
        ]
        .into();
        assert_eq!(got, want);
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
