//! Whether a namespace opted in, asked of the API server: a watch cache of the labelled
//! namespaces, and on a miss (a namespace labelled a moment ago) one live list by name and
//! label. Admission applies it before anything else, so a review forged for `kube-system`
//! or an unlabelled namespace, sent straight to the webhook's port, changes nothing.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client,
    api::ListParams,
    runtime::{WatchStreamExt, reflector, reflector::Store, watcher},
};
use tokio::task::JoinHandle;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use sidecert_contract::hosts::ALLOWED_DOMAINS;

use crate::{error::Error, mutate::namespace::may_serve};

/// A reflector store of the namespaces `selector` selects, kept current until the task is
/// aborted (admission's gate keeps it for the life of the process, the reconciler for a
/// term as leader).
pub fn namespace_store(client: Client, selector: &str) -> (Store<Namespace>, JoinHandle<()>) {
    let (store, writer) = reflector::store();
    let watch = reflector(
        writer,
        watcher(
            Api::<Namespace>::all(client),
            watcher::Config::default().labels(selector),
        ),
    )
    .default_backoff()
    .for_each(|e| async move {
        if let Err(e) = e {
            tracing::warn!(error = %e, "Namespace watch");
        }
    });
    (store, tokio::spawn(watch))
}

/// The labelled namespaces, from a watch, with a live fallback.
#[derive(Clone)]
pub struct NamespaceGate {
    store: Store<Namespace>,
    client: Client,
    selector: String,
    own: String,
}

impl NamespaceGate {
    /// Starts the watch of the namespaces `selector` selects (a task on the current runtime).
    /// `own` is the release namespace (empty when unknown), never served.
    pub fn start(client: Client, selector: &str, own: &str) -> Self {
        // Runs for the life of the process: the task is not kept.
        let (store, _watch) = namespace_store(client.clone(), selector);
        Self {
            store,
            client,
            selector: selector.to_owned(),
            own: own.to_owned(),
        }
    }

    /// Resolves when the watch has its first full list.
    pub async fn wait_until_ready(&self) -> bool {
        self.store.wait_until_ready().await.is_ok()
    }

    /// Whether sidecert serves `namespace` (`Some`, with the Namespace's
    /// `sidecert.io/allowed-domains`): never a system namespace or its own; else the watch
    /// cache, and on a miss the API server, within `budget`.
    pub async fn serves(&self, namespace: &str, budget: Duration) -> Result<Option<Served>, Error> {
        if !may_serve(namespace, &self.own) {
            return Ok(None);
        }
        if let Some(ns) = self.store.get(&reflector::ObjectRef::new(namespace)) {
            return Ok(Some(Served::of(&ns.metadata)));
        }
        let params = ListParams::default()
            .labels(&self.selector)
            .fields(&format!("metadata.name={namespace}"));
        let api = Api::<Namespace>::all(self.client.clone());
        match tokio::time::timeout(budget, api.list_metadata(&params)).await {
            Ok(list) => Ok(list?.items.first().map(|ns| Served::of(&ns.metadata))),
            Err(_) => Err(Error::Timeout(budget)),
        }
    }
}

/// A namespace sidecert serves, as the API server has it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Served {
    /// Its `sidecert.io/allowed-domains` annotation, if it has one.
    pub allowed_domains: Option<String>,
    /// Its uid (a host claim is the namespace's, not its name's).
    pub uid: Option<String>,
}

impl Served {
    /// What a Namespace's metadata says.
    pub fn of(meta: &ObjectMeta) -> Self {
        Self {
            allowed_domains: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(ALLOWED_DOMAINS))
                .cloned(),
            uid: meta.uid.clone(),
        }
    }
}
