//! Where the decisions look Ingresses and Services up: the [`Lookup`] trait, answered by the
//! watch caches in the server ([`crate::kube::cache::Cache`]) and by a fixed [`Snapshot`]
//! elsewhere (tests, the offline commands, and the live re-check's fresh objects).

use std::sync::Arc;

use k8s_openapi::api::{core::v1::Service, networking::v1::Ingress};

use crate::mutate::gateway::GatewayObjects;

/// Where Ingresses and Services are looked up. The server uses a watch-backed cache
/// ([`crate::kube::cache::Cache`]); tests, the offline commands and the live re-check use a
/// [`Snapshot`].
pub trait Lookup: Send + Sync {
    /// The Ingresses of a namespace.
    fn ingresses(&self, namespace: &str) -> Vec<Arc<Ingress>>;
    /// One Service.
    fn service(&self, namespace: &str, name: &str) -> Option<Arc<Service>>;
    /// The Services of a namespace.
    fn services(&self, namespace: &str) -> Vec<Arc<Service>>;
    /// The Gateway API objects (none without the CRDs).
    fn gateway_objects(&self) -> GatewayObjects {
        GatewayObjects::default()
    }
    /// The annotated Gateways and ListenerSets of a namespace, each as the Ingress that asks
    /// for the same certificates through the same Services
    /// ([`crate::mutate::gateway::GatewayPlan::as_ingress`]).
    fn gateway_ingresses(&self, namespace: &str) -> Vec<Arc<Ingress>> {
        self.gateway_objects()
            .ingresses(namespace)
            .into_iter()
            .map(Arc::new)
            .collect()
    }
}

/// A fixed set of objects (possibly empty: no cluster).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub ingresses: Vec<Arc<Ingress>>,
    pub services: Vec<Arc<Service>>,
    pub gateway: GatewayObjects,
}

/// The objects of `items` in `namespace`.
fn in_namespace<K: kube::Resource>(items: &[Arc<K>], namespace: &str) -> Vec<Arc<K>> {
    items
        .iter()
        .filter(|o| o.meta().namespace.as_deref() == Some(namespace))
        .cloned()
        .collect()
}

impl Lookup for Snapshot {
    fn ingresses(&self, namespace: &str) -> Vec<Arc<Ingress>> {
        in_namespace(&self.ingresses, namespace)
    }

    fn service(&self, namespace: &str, name: &str) -> Option<Arc<Service>> {
        self.services
            .iter()
            .find(|s| {
                s.metadata.namespace.as_deref() == Some(namespace) && s.metadata.name.as_deref() == Some(name)
            })
            .cloned()
    }

    fn services(&self, namespace: &str) -> Vec<Arc<Service>> {
        in_namespace(&self.services, namespace)
    }

    fn gateway_objects(&self) -> GatewayObjects {
        self.gateway.clone()
    }
}
