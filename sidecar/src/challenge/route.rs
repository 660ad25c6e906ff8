//! Waiting for the Ingress route before telling the CA to validate.
//!
//! For a certificate selected through an Ingress, the challenge path of its hosts goes to the
//! solver Service (`<backend>-sidecert-solver`). An ingress controller routes to a Service's
//! endpoints as its EndpointSlices list them, so a challenge the CA fetches before this Pod set
//! is listed gets no route, and the failed validation counts against the CA's limits. The
//! leader therefore waits (a watch, not polling) until the solver Service has an endpoint that
//! is not `ready: false`, then until every replica listed there answers the key
//! authorizations (a replica that has just started may not have seen the Lease yet; at most
//! [`PEER_WAIT`]), then a short settle delay for the controller to pick it up. The waits are
//! bounded: after them the order goes ahead with a warning.

use std::{collections::HashMap, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, reflector, watcher},
};

use crate::{acme::Publisher, challenge::responder::self_check, error::Result, kube::events::PodEvents};

/// The label the EndpointSlice controller puts on a Service's slices.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Whether `slices` list an endpoint an ingress controller routes to: one with an address
/// whose `ready` condition is not `false` (unset means ready, as the API documents).
pub fn is_routable<'a>(slices: impl IntoIterator<Item = &'a EndpointSlice>) -> bool {
    slices
        .into_iter()
        .flat_map(|s| s.endpoints.iter())
        .any(|e| !e.addresses.is_empty() && e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
}

/// The addresses of the endpoints [`is_routable`] counts.
pub fn routable_addresses<'a>(slices: impl IntoIterator<Item = &'a EndpointSlice>) -> Vec<String> {
    let mut addresses: Vec<String> = slices
        .into_iter()
        .flat_map(|s| s.endpoints.iter())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .flat_map(|e| e.addresses.iter().cloned())
        .collect();
    addresses.sort();
    addresses.dedup();
    addresses
}

/// How long the leader waits for the other replicas to serve the key authorizations.
pub const PEER_WAIT: Duration = Duration::from_secs(10);

/// How [`RouteGate::wait`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteWait {
    /// The solver Service has a routable endpoint (and the settle delay has passed).
    Routable,
    /// The bound passed first.
    TimedOut,
}

/// Waits for a solver Service's endpoints.
#[derive(Clone)]
pub struct RouteGate {
    pub client: Client,
    pub namespace: String,
    /// The solver Service.
    pub service: String,
    /// Upper bound of the wait for endpoints.
    pub wait: Duration,
    /// Extra delay once they are listed, for the ingress controller to follow.
    pub settle: Duration,
    pub events: PodEvents,
    /// The HTTP-01 port of every replica's responder.
    pub http01_port: u16,
}

impl RouteGate {
    /// Waits until the solver Service has a routable endpoint, then the settle delay; after
    /// `wait` without one, warns (log and Event) and returns [`RouteWait::TimedOut`]. Never
    /// fails: the order goes ahead either way.
    pub async fn wait(&self, domains: &[String], tokens: &HashMap<String, String>) -> RouteWait {
        let start = tokio::time::Instant::now();
        tracing::info!(
            service = self.service,
            namespace = self.namespace,
            timeout = ?self.wait,
            "waiting for the solver Service to have a ready endpoint before telling the CA"
        );
        let found = tokio::time::timeout(self.wait, self.watch_until_routable())
            .await
            .ok();
        let Some(addresses) = found else {
            let note = format!(
                "solver Service {} has no ready endpoint after {}s; telling the CA to validate {} anyway \
                 (the challenge may not be routed)",
                self.service,
                self.wait.as_secs(),
                domains.join(", ")
            );
            tracing::warn!(service = self.service, waited = ?start.elapsed(), "{note}");
            self.events.publish(true, "RouteNotReady", note).await;
            return RouteWait::TimedOut;
        };
        tracing::info!(
            service = self.service,
            waited = ?start.elapsed(),
            settle = ?self.settle,
            "solver Service has a ready endpoint; settling before telling the CA"
        );
        // The CA may fetch the challenge from any replica: each must have seen the Lease
        // (a replica that has just started may not have yet). Bounded, then go ahead.
        let peers = tokio::time::timeout(PEER_WAIT, self.peers_serve(&addresses, tokens)).await;
        if peers.is_ok() {
            tracing::debug!(replicas = ?addresses, "every replica answers the challenge");
        } else {
            tracing::warn!(
                service = self.service,
                replicas = ?addresses,
                "not every replica answered the challenge within {PEER_WAIT:?}; telling the CA anyway"
            );
        }
        tokio::time::sleep(self.settle).await;
        RouteWait::Routable
    }

    /// Resolves once every address answers every key authorization on the HTTP-01 port.
    async fn peers_serve(&self, addresses: &[String], tokens: &HashMap<String, String>) {
        let mut pending: Vec<&String> = addresses.iter().collect();
        loop {
            let mut still = Vec::new();
            for addr in pending {
                let base = match addr.parse::<std::net::IpAddr>() {
                    Ok(ip) => format!("http://{}", std::net::SocketAddr::new(ip, self.http01_port)),
                    Err(_) => continue,
                };
                if self_check(&base, tokens).await.is_err() {
                    still.push(addr);
                }
            }
            if still.is_empty() {
                return;
            }
            pending = still;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Resolves, with the routable addresses, once the watched EndpointSlices of the solver
    /// Service are routable.
    async fn watch_until_routable(&self) -> Vec<String> {
        let api = Api::<EndpointSlice>::namespaced(self.client.clone(), &self.namespace);
        let config = watcher::Config::default().labels(&format!("{SERVICE_NAME_LABEL}={}", self.service));
        let (reader, writer) = reflector::store();
        let mut stream = std::pin::pin!(reflector(writer, watcher(api, config)).default_backoff());
        let mut last_error: Option<String> = None;
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => {
                    // The store swaps in a relist only when it is complete, so this sees
                    // whole states, never half a list.
                    let state = reader.state();
                    if is_routable(state.iter().map(AsRef::as_ref)) {
                        return routable_addresses(state.iter().map(AsRef::as_ref));
                    }
                }
                Err(e) => {
                    let e = e.to_string();
                    if last_error.as_deref() != Some(e.as_str()) {
                        tracing::warn!(service = self.service, error = %e, "EndpointSlice watch");
                        last_error = Some(e);
                    }
                }
            }
        }
        // The stream does not end (the backoff restarts it); if it does, wait out the bound.
        std::future::pending().await
    }
}

/// A [`Publisher`] that, after `inner` has published and self-checked the key
/// authorizations, waits for the Ingress route when there is a solver Service.
pub struct Routed<P> {
    pub inner: P,
    pub gate: Option<RouteGate>,
    pub domains: Vec<String>,
}

impl<P: Publisher> Publisher for Routed<P> {
    async fn publish(&self, tokens: &HashMap<String, String>) -> Result<()> {
        self.inner.publish(tokens).await?;
        // No solver Service (a Pod with its own domains annotation): nothing to wait for.
        if let Some(gate) = &self.gate {
            gate.wait(&self.domains, tokens).await;
        }
        Ok(())
    }

    async fn withdraw(&self) {
        self.inner.withdraw().await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use serde_json::json;

    use super::*;

    fn slice(endpoints: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-sidecert-solver-abcde", "namespace": "shop",
                         "labels": {SERVICE_NAME_LABEL: "web-sidecert-solver"}},
            "addressType": "IPv4",
            "endpoints": endpoints,
        }))
        .unwrap()
    }

    #[test]
    fn routable_needs_an_endpoint_that_is_not_unready() {
        // No slices, an empty slice, or null endpoints (the API's "no endpoints"): not yet.
        assert!(!is_routable([]));
        assert!(!is_routable([&slice(json!([]))]));
        assert!(!is_routable([&slice(json!(null))]));
        // Only unready endpoints (e.g. terminating): not routable.
        let unready = slice(json!([{"addresses": ["10.213.0.11"], "conditions": {"ready": false}}]));
        assert!(!is_routable([&unready]));
        // Ready, or readiness unknown (unset), is routable.
        let ready = slice(json!([{"addresses": ["10.213.0.10"], "conditions": {"ready": true}}]));
        assert!(is_routable([&ready]));
        let unknown = slice(json!([{"addresses": ["10.213.0.12"], "conditions": {}}]));
        assert!(is_routable([&unknown]));
        let no_conditions = slice(json!([{"addresses": ["10.213.0.13"]}]));
        assert!(is_routable([&no_conditions]));
        // One routable endpoint among unready ones, in any slice, is enough.
        let mixed = slice(json!([
            {"addresses": ["10.213.0.11"], "conditions": {"ready": false}},
            {"addresses": ["10.213.0.10"], "conditions": {"ready": true}},
        ]));
        assert!(is_routable([&mixed]));
        assert!(is_routable([&unready, &ready]));
        // An endpoint without addresses routes nowhere.
        let empty = slice(json!([{"addresses": [], "conditions": {"ready": true}}]));
        assert!(!is_routable([&empty]));
        // The addresses the leader checks: the routable ones, once each.
        assert_eq!(
            routable_addresses([&mixed, &unready, &ready, &unknown]),
            ["10.213.0.10", "10.213.0.12"]
        );
    }
}
