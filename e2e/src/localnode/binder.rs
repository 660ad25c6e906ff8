//! Binds unscheduled Pods to the node (there is no scheduler).

use std::{collections::HashMap, sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::{
    api::core::v1::{Binding, ObjectReference, Pod},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api,
    api::PostParams,
    runtime::{WatchStreamExt, reflector, watcher},
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Ctx;

/// A failed binding is retried after this long.
const RETRY: Duration = Duration::from_secs(2);

pub async fn run(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let api: Api<Pod> = Api::all(ctx.client.clone());
    let (reader, writer) = reflector::store();
    let mut events = reflector(
        writer,
        watcher(api, watcher::Config::default().fields("spec.nodeName=")),
    )
    .default_backoff()
    .boxed();
    let mut attempted: HashMap<String, Instant> = HashMap::new();
    let mut tick = tokio::time::interval(RETRY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            e = events.next() => match e {
                None => return,
                Some(Err(e)) => warn!(error = %e, "unscheduled pod watch error"),
                Some(Ok(_)) => {}
            },
            _ = tick.tick() => {}
        }
        let pods = reader.state();
        attempted.retain(|uid, _| pods.iter().any(|p| p.metadata.uid.as_ref() == Some(uid)));
        for pod in pods {
            let unbound = pod
                .spec
                .as_ref()
                .is_some_and(|s| s.node_name.as_deref().unwrap_or_default().is_empty());
            let Some(uid) = pod.metadata.uid.clone() else {
                continue;
            };
            if !unbound || pod.metadata.deletion_timestamp.is_some() {
                continue;
            }
            if attempted.get(&uid).is_some_and(|at| at.elapsed() < RETRY) {
                continue;
            }
            attempted.insert(uid, Instant::now());
            bind(&ctx, &pod).await;
        }
    }
}

async fn bind(ctx: &Ctx, pod: &Pod) {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let binding = Binding {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(ns.clone()),
            uid: pod.metadata.uid.clone(),
            ..Default::default()
        },
        target: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(ctx.node_name.clone()),
            ..Default::default()
        },
    };
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    match api
        .create_subresource::<_, serde_json::Value>("binding", &name, &PostParams::default(), &binding)
        .await
    {
        Ok(_) => info!(pod = format!("{ns}/{name}"), node = ctx.node_name, "bound"),
        Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {}
        Err(e) => warn!(pod = format!("{ns}/{name}"), error = %e, "binding failed; will retry"),
    }
}
