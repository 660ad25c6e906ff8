//! The watch caches of admission: reflector stores of all Ingresses and Services, and of the
//! Gateway API's Gateways, ListenerSets and HTTPRoutes when the cluster has those CRDs,
//! answering [`Lookup`] for the pure selection.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use futures::StreamExt;
use k8s_openapi::api::{core::v1::Service, networking::v1::Ingress};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject},
    runtime::{WatchStreamExt, reflector, reflector::Store, watcher},
};

use crate::mutate::{
    gateway::{GatewayObjects, ParentKind, http_route_resource},
    lookup::Lookup,
};

/// Reflector stores of all Ingresses and Services, and of the Gateway API objects, kept
/// current by watches.
#[derive(Clone)]
pub struct Cache {
    ingresses: Store<Ingress>,
    services: Store<Service>,
    gateways: Store<DynamicObject>,
    listener_sets: Store<DynamicObject>,
    routes: Store<DynamicObject>,
}

/// Whether "the Gateway API is absent" was said (once per process, for all three kinds).
static GATEWAY_API_ABSENT_SAID: AtomicBool = AtomicBool::new(false);
/// Whether a Gateway API watch has listed its kind: the CRDs are installed.
static GATEWAY_API_PRESENT: AtomicBool = AtomicBool::new(false);

/// Whether the cluster has the Gateway API CRDs (as far as the watches know).
pub fn gateway_api_present() -> bool {
    GATEWAY_API_PRESENT.load(Ordering::Relaxed)
}

/// Watches one Gateway API kind. Without its CRD the watch fails and backs off (up to a
/// minute between tries), so the kind is picked up once the CRDs are installed, without a
/// restart; that it is absent is logged once, and that it was found, once.
fn watch_gateway_api(client: &Client, ar: ApiResource) -> Store<DynamicObject> {
    let writer = reflector::store::Writer::new(ar.clone());
    let reader = writer.as_reader();
    let kind = ar.kind.clone();
    let found = Arc::new(AtomicBool::new(false));
    let stream = reflector(
        writer,
        watcher(Api::<DynamicObject>::all_with(client.clone(), &ar), watcher::Config::default()),
    )
    .default_backoff()
    .for_each(move |e| {
        let (kind, found) = (kind.clone(), found.clone());
        async move {
            match e {
                Ok(_) => {
                    GATEWAY_API_PRESENT.store(true, Ordering::Relaxed);
                    if !found.swap(true, Ordering::Relaxed) && GATEWAY_API_ABSENT_SAID.load(Ordering::Relaxed) {
                        tracing::info!(kind, "the Gateway API is installed now: serving its {kind}s");
                    }
                }
                Err(watcher::Error::InitialListFailed(kube::Error::Api(s)) | watcher::Error::WatchStartFailed(kube::Error::Api(s)))
                    if s.is_not_found() && !found.load(Ordering::Relaxed) =>
                {
                    if !GATEWAY_API_ABSENT_SAID.swap(true, Ordering::Relaxed) {
                        tracing::info!(
                            "the Gateway API (gateway.networking.k8s.io/v1) is not installed: serving Ingresses \
                             and Pods; Gateways and ListenerSets are picked up once its CRDs are installed"
                        );
                    }
                }
                Err(e) => tracing::warn!(kind, error = %e, "Gateway API watch"),
            }
        }
    });
    tokio::spawn(stream);
    reader
}

impl Cache {
    /// Starts the watches (tasks on the current runtime) and returns the cache at once; see
    /// [`Cache::wait_until_ready`].
    pub fn start(client: Client) -> Self {
        let (ingresses, iw) = reflector::store();
        let (services, sw) = reflector::store();
        let watch_i = reflector(
            iw,
            watcher(Api::<Ingress>::all(client.clone()), watcher::Config::default()),
        )
        .default_backoff()
        .for_each(|e| async move {
            if let Err(e) = e {
                tracing::warn!(error = %e, "Ingress watch");
            }
        });
        let watch_s = reflector(
            sw,
            watcher(Api::<Service>::all(client.clone()), watcher::Config::default()),
        )
        .default_backoff()
        .for_each(|e| async move {
            if let Err(e) = e {
                tracing::warn!(error = %e, "Service watch");
            }
        });
        tokio::spawn(watch_i);
        tokio::spawn(watch_s);
        Self {
            gateways: watch_gateway_api(&client, ParentKind::Gateway.api_resource()),
            listener_sets: watch_gateway_api(&client, ParentKind::ListenerSet.api_resource()),
            routes: watch_gateway_api(&client, http_route_resource()),
            ingresses,
            services,
        }
    }

    /// Resolves when both stores have their first full list.
    pub async fn wait_until_ready(&self) -> bool {
        self.ingresses.wait_until_ready().await.is_ok() && self.services.wait_until_ready().await.is_ok()
    }
}

impl Lookup for Cache {
    fn ingresses(&self, namespace: &str) -> Vec<Arc<Ingress>> {
        self.ingresses
            .state_filter(|i| i.metadata.namespace.as_deref() == Some(namespace))
    }

    fn service(&self, namespace: &str, name: &str) -> Option<Arc<Service>> {
        self.services
            .get(&reflector::ObjectRef::new(name).within(namespace))
    }

    fn services(&self, namespace: &str) -> Vec<Arc<Service>> {
        self.services
            .state_filter(|s| s.metadata.namespace.as_deref() == Some(namespace))
    }

    fn gateway_objects(&self) -> GatewayObjects {
        GatewayObjects {
            gateways: self.gateways.state(),
            listener_sets: self.listener_sets.state(),
            routes: self.routes.state(),
        }
    }

    fn gateway_ingresses(&self, namespace: &str) -> Vec<Arc<Ingress>> {
        let in_ns = |o: &DynamicObject| o.metadata.namespace.as_deref() == Some(namespace);
        let objects = GatewayObjects {
            gateways: self.gateways.state(),
            listener_sets: self.listener_sets.state_filter(in_ns),
            routes: self.routes.state_filter(in_ns),
        };
        if objects.is_empty() {
            return Vec::new();
        }
        objects.ingresses(namespace).into_iter().map(Arc::new).collect()
    }
}

#[cfg(test)]
mod tests {
    use kube::runtime::{reflector, watcher};

    use super::*;
    use crate::testing::ingress;

    #[test]
    fn a_stale_cache_keeps_answering_while_the_watch_relists() {
        // The admission caches are reflector stores: a watch error restarts the list, and the
        // store keeps the last complete state until the new list is complete.
        let (reader, mut writer) = reflector::store::<Ingress>();
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitApply(ingress(true, true)));
        writer.apply_watcher_event(&watcher::Event::InitDone);
        assert_eq!(reader.state().len(), 1);
        writer.apply_watcher_event(&watcher::Event::Init);
        assert_eq!(reader.state().len(), 1, "a relist in progress keeps serving");
    }
}
