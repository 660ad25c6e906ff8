//! The watch caches of admission: reflector stores of all Ingresses and Services, answering
//! [`Lookup`] for the pure selection.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::{core::v1::Service, networking::v1::Ingress};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, reflector, reflector::Store, watcher},
};

use crate::mutate::lookup::Lookup;

/// Reflector stores of all Ingresses and Services, kept current by watches.
#[derive(Clone)]
pub struct Cache {
    ingresses: Store<Ingress>,
    services: Store<Service>,
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
            watcher(Api::<Service>::all(client), watcher::Config::default()),
        )
        .default_backoff()
        .for_each(|e| async move {
            if let Err(e) = e {
                tracing::warn!(error = %e, "Service watch");
            }
        });
        tokio::spawn(watch_i);
        tokio::spawn(watch_s);
        Self { ingresses, services }
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
