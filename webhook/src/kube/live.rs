//! The live re-check of a Pod the watch caches did not select (the I/O half of
//! [`crate::mutate::select::recheck`]): the namespace read from the API server, fed back into
//! the same pure Pod decision as a [`Snapshot`]. After a failed check, the cached answer
//! stands and further checks pause for [`LIVE_LOOKUP_PAUSE`].

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    core::v1::{Pod, Service},
    networking::v1::Ingress,
};
use kube::{
    Api, Client,
    api::{DynamicObject, ListParams},
    core::admission::AdmissionRequest,
};

use crate::{
    error::{Error, Result},
    kube::cache::gateway_api_present,
    metrics::Metrics,
    mutate::{
        context::Context,
        gateway::{GatewayObjects, ParentKind, http_route_resource},
        ingress::is_annotated,
        lookup::Snapshot,
        outcome::Outcome,
        pod::mutate_pod,
        select::{Recheck, annotated_versions},
    },
};

/// How long live checks pause after one failed.
pub const LIVE_LOOKUP_PAUSE: Duration = Duration::from_secs(30);

/// The live re-check, with its pause after a failure (shared by the clones of a reviewer).
#[derive(Debug, Clone, Default)]
pub struct LiveCheck {
    paused_until: Arc<Mutex<Option<Instant>>>,
}

impl LiveCheck {
    /// Decides the Pod again over the namespace as the API server has it: one list of its
    /// Ingresses, and a list of its Services only if its annotated Ingresses differ from the
    /// cached ones. The live answer is at least as fresh, so it wins over `cached`.
    #[allow(clippy::too_many_arguments)]
    pub async fn recheck(
        &self,
        req: &AdmissionRequest<Pod>,
        ctx: &Context,
        client: &Client,
        metrics: &Metrics,
        recheck: Recheck,
        budget: Duration,
        cached: Outcome,
    ) -> Outcome {
        let count = |result: &str| metrics.live_lookups.with_label_values(&[result]).inc();
        if self
            .paused_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|until| Instant::now() < until)
        {
            count("paused");
            return cached;
        }
        let namespace = recheck.namespace.as_str();
        match live_snapshot(client, namespace, &recheck.known, budget).await {
            Ok(None) => {
                count("cache_current");
                cached
            }
            Ok(Some(snapshot)) => {
                let live = mutate_pod(req, &ctx.with_lookup(Arc::new(snapshot)));
                if live.patch.is_empty() {
                    count("not_selected");
                } else {
                    tracing::info!(
                        uid = req.uid,
                        namespace,
                        "Pod selected by an Ingress the watch cache had not seen yet"
                    );
                    count("selected");
                }
                live
            }
            Err(e) => {
                tracing::warn!(
                    uid = req.uid,
                    namespace,
                    error = %e,
                    pause = ?LIVE_LOOKUP_PAUSE,
                    "could not read the namespace from the API server; answering from the watch cache"
                );
                *self.paused_until.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(Instant::now() + LIVE_LOOKUP_PAUSE);
                count(e.metric_label());
                cached
            }
        }
    }
}

/// The namespace read from the API server rather than the watch caches: its annotated
/// Ingresses (and its Gateway API objects, when the cluster has them) and its Services. `None` when the annotated Ingresses are exactly the ones
/// the cache holds (`cached`: uid → resourceVersion, see
/// [`crate::mutate::select::annotated_versions`]); then no Service list is made.
pub async fn live_snapshot(
    client: &Client,
    namespace: &str,
    cached: &BTreeMap<String, String>,
    budget: Duration,
) -> Result<Option<Snapshot>> {
    let read = async {
        let ingresses: Vec<Arc<Ingress>> = Api::<Ingress>::namespaced(client.clone(), namespace)
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(is_annotated)
            .map(Arc::new)
            .collect();
        let gateway = if gateway_api_present() {
            live_gateway_objects(client, namespace).await?
        } else {
            GatewayObjects::default()
        };
        let mut all = ingresses.clone();
        all.extend(gateway.ingresses(namespace).into_iter().map(Arc::new));
        if annotated_versions(&all) == *cached {
            return Ok(None);
        }
        let services = Api::<Service>::namespaced(client.clone(), namespace)
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .map(Arc::new)
            .collect();
        Ok(Some(Snapshot {
            ingresses,
            services,
            gateway,
        }))
    };
    tokio::time::timeout(budget, read)
        .await
        .unwrap_or(Err(Error::Timeout(budget)))
}

/// The Gateways, ListenerSets and HTTPRoutes of `namespace`, from the API server (a kind
/// whose CRD is missing has none).
async fn live_gateway_objects(client: &Client, namespace: &str) -> Result<GatewayObjects> {
    let list = |ar: kube::api::ApiResource| async move {
        let api = Api::<DynamicObject>::namespaced_with(client.clone(), namespace, &ar);
        match api.list(&ListParams::default()).await {
            Ok(list) => Ok(list.items.into_iter().map(Arc::new).collect()),
            Err(kube::Error::Api(s)) if s.is_not_found() => Ok(Vec::new()),
            Err(e) => Err(Error::from(e)),
        }
    };
    let (gateways, listener_sets, routes) = futures::try_join!(
        list(ParentKind::Gateway.api_resource()),
        list(ParentKind::ListenerSet.api_resource()),
        list(http_route_resource()),
    )?;
    Ok(GatewayObjects {
        gateways,
        listener_sets,
        routes,
    })
}
