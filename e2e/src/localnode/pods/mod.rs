//! Pods bound to the node: one worker task per Pod (network, token, containers, status,
//! deletion).

pub mod container;
pub mod env;
pub mod netns;
pub mod probe;
pub mod process;
pub mod status;
pub mod token;

use std::{collections::HashMap, collections::HashSet, net::Ipv4Addr, sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::{api::core::v1::Pod, jiff::Timestamp};
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams, Preconditions},
    runtime::{WatchStreamExt, watcher},
};
use tokio::{sync::watch, task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::{
    container::{Handle, PodCtx},
    netns::PodNetwork,
    status::{Kind, Phase, PodState},
};
use super::Ctx;

struct Worker {
    pod: watch::Sender<Option<Arc<Pod>>>,
    shutdown: CancellationToken,
    join: JoinHandle<()>,
}

/// Watches the Pods bound to this node and runs one worker per Pod until `shutdown`; then
/// stops every container and removes every network it made.
pub async fn run(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let api: Api<Pod> = Api::all(ctx.client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", ctx.node_name));
    let mut events = watcher(api, config).default_backoff().boxed();
    let mut workers: HashMap<String, Worker> = HashMap::new();
    let mut listed: Option<HashSet<String>> = None;
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => break,
            e = events.next() => e,
        };
        match event {
            None => break,
            Some(Err(e)) => warn!(error = %e, "pod watch error"),
            Some(Ok(watcher::Event::Init)) => listed = Some(HashSet::new()),
            Some(Ok(watcher::Event::InitDone)) => {
                if let Some(seen) = listed.take() {
                    for (uid, w) in &workers {
                        if !seen.contains(uid) {
                            w.pod.send_replace(None);
                        }
                    }
                }
            }
            Some(Ok(watcher::Event::InitApply(pod) | watcher::Event::Apply(pod))) => {
                let Some(uid) = pod.metadata.uid.clone() else {
                    continue;
                };
                if let Some(seen) = listed.as_mut() {
                    seen.insert(uid.clone());
                }
                let pod = Arc::new(pod);
                match workers.get(&uid) {
                    Some(w) => {
                        w.pod.send_replace(Some(pod));
                    }
                    None => {
                        let (tx, rx) = watch::channel(Some(pod));
                        let stop = CancellationToken::new();
                        let join = tokio::spawn(run_pod(ctx.clone(), rx, stop.clone()));
                        workers.insert(
                            uid,
                            Worker {
                                pod: tx,
                                shutdown: stop,
                                join,
                            },
                        );
                    }
                }
            }
            Some(Ok(watcher::Event::Delete(pod))) => {
                if let Some(w) = pod.metadata.uid.as_ref().and_then(|uid| workers.get(uid)) {
                    w.pod.send_replace(None);
                }
            }
        }
        workers.retain(|_, w| !w.join.is_finished());
    }
    info!(pods = workers.len(), "stopping pod workers");
    for w in workers.values() {
        w.shutdown.cancel();
    }
    for (_, w) in workers {
        if tokio::time::timeout(Duration::from_secs(45), w.join)
            .await
            .is_err()
        {
            warn!("a pod worker did not stop in time");
        }
    }
}

enum End {
    /// `deletionTimestamp` set: stop with this grace, then delete the Pod object.
    Deleted(Duration),
    /// The Pod object is gone.
    Vanished,
    /// The stand-in is shutting down.
    Shutdown,
}

/// Waits for the Pod to be marked for deletion or to vanish.
async fn deletion(mut pod: watch::Receiver<Option<Arc<Pod>>>) -> End {
    loop {
        let end = match pod.borrow_and_update().as_ref() {
            None => Some(End::Vanished),
            Some(p) if p.metadata.deletion_timestamp.is_some() => {
                let secs = p
                    .metadata
                    .deletion_grace_period_seconds
                    .or_else(|| p.spec.as_ref().and_then(|s| s.termination_grace_period_seconds))
                    .unwrap_or(30)
                    .clamp(0, 30);
                Some(End::Deleted(Duration::from_secs(
                    u64::try_from(secs).unwrap_or(30),
                )))
            }
            Some(_) => None,
        };
        if let Some(end) = end {
            return end;
        }
        if pod.changed().await.is_err() {
            return End::Vanished;
        }
    }
}

fn pod_key(pod: &Pod) -> (String, String) {
    (
        pod.metadata.namespace.clone().unwrap_or_default(),
        pod.metadata.name.clone().unwrap_or_default(),
    )
}

async fn run_pod(ctx: Arc<Ctx>, pod_rx: watch::Receiver<Option<Arc<Pod>>>, shutdown: CancellationToken) {
    let Some(pod) = pod_rx.borrow().clone() else {
        return;
    };
    let (ns, name) = pod_key(&pod);
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending");
    if matches!(phase, "Succeeded" | "Failed") || pod.metadata.deletion_timestamp.is_some() {
        // Finished in an earlier run, or already being deleted: nothing to run.
        let end = tokio::select! {
            _ = shutdown.cancelled() => End::Shutdown,
            e = deletion(pod_rx.clone()) => e,
        };
        if let End::Deleted(_) = end {
            delete_pod(&ctx, &ns, &name, &uid).await;
        }
        return;
    }

    let preferred = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .and_then(|ip| ip.parse::<Ipv4Addr>().ok());
    let Some(ip) = ctx.allocate_ip(preferred) else {
        warn!(
            pod = format!("{ns}/{name}"),
            "no Pod IP left; the Pod will not start"
        );
        let end = tokio::select! {
            _ = shutdown.cancelled() => End::Shutdown,
            e = deletion(pod_rx.clone()) => e,
        };
        if let End::Deleted(_) = end {
            delete_pod(&ctx, &ns, &name, &uid).await;
        }
        return;
    };
    info!(pod = format!("{ns}/{name}"), %ip, "pod assigned");
    let pod_dir = ctx.state_dir.join("pods").join(format!("{ns}_{name}"));
    let state = Arc::new(watch::Sender::new(PodState::new(
        &pod,
        ctx.gateway,
        Timestamp::now(),
    )));
    let pc = Arc::new(PodCtx {
        ctx: ctx.clone(),
        pod: pod_rx.clone(),
        initial: pod.clone(),
        state: state.clone(),
        net: PodNetwork::for_uid(&uid, ip),
        serviceaccount_dir: token::wants_token(&pod).then(|| pod_dir.join("serviceaccount")),
        pod_dir: pod_dir.clone(),
        log_dir: ctx.state_dir.join("logs").join("pods"),
    });
    let reporter = tokio::spawn(report_status(ctx.clone(), pc.clone()));
    let handles: Arc<std::sync::Mutex<Vec<Handle>>> = Arc::default();
    let token_stop = CancellationToken::new();

    let end = tokio::select! {
        biased;
        _ = shutdown.cancelled() => End::Shutdown,
        e = deletion(pod_rx.clone()) => e,
        () = lifecycle(pc.clone(), handles.clone(), token_stop.clone()) => tokio::select! {
            _ = shutdown.cancelled() => End::Shutdown,
            e = deletion(pod_rx.clone()) => e,
        },
    };
    let grace = match end {
        End::Deleted(g) => g,
        End::Vanished => Duration::from_secs(2),
        End::Shutdown => pc.grace().min(Duration::from_secs(5)),
    };
    info!(pod = format!("{ns}/{name}"), ?grace, "stopping pod");
    stop_containers(&handles, Instant::now() + grace).await;
    token_stop.cancel();
    reporter.abort();
    pc.net.teardown().await;
    ctx.release_ip(ip);
    let _ = tokio::fs::remove_dir_all(&pod_dir).await;
    if let End::Deleted(_) = end {
        delete_pod(&ctx, &ns, &name, &uid).await;
    }
    info!(pod = format!("{ns}/{name}"), "pod cleaned up");
}

/// Regular containers first (all at once), then init containers and sidecars in reverse
/// order; SIGKILL for whatever is left at `deadline`.
async fn stop_containers(handles: &std::sync::Mutex<Vec<Handle>>, deadline: Instant) {
    let (regular, init): (Vec<_>, Vec<Handle>) = {
        let handles = handles.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let regular = handles
            .iter()
            .filter(|h| h.kind == Kind::Regular)
            .map(|h| {
                h.stop(deadline);
                h.done()
            })
            .collect();
        let init = handles
            .iter()
            .filter(|h| h.kind != Kind::Regular)
            .rev()
            .cloned()
            .collect();
        (regular, init)
    };
    futures::future::join_all(regular.into_iter().map(container::wait_done)).await;
    for h in init {
        h.stop(deadline);
        container::wait_done(h.done()).await;
    }
}

/// Network, token, init containers in order, then the regular containers; returns when the
/// Pod has completed (never for `restartPolicy: Always`).
async fn lifecycle(
    pc: Arc<PodCtx>,
    handles: Arc<std::sync::Mutex<Vec<Handle>>>,
    token_stop: CancellationToken,
) {
    let ctx = &pc.ctx;
    let pod = pc.initial.clone();
    let (ns, name) = pod_key(&pod);
    loop {
        match pc.net.setup(&ctx.bridge, ctx.gateway, ctx.cidr.prefix_len).await {
            Ok(()) => break,
            Err(e) => {
                warn!(pod = format!("{ns}/{name}"), error = %e, "pod network setup failed; retrying");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
    pc.state.send_modify(|s| s.pod_ip = Some(pc.net.ip));
    // The processes' working directory.
    if let Err(e) = tokio::fs::create_dir_all(&pc.pod_dir).await {
        warn!(pod = format!("{ns}/{name}"), dir = %pc.pod_dir.display(), error = %e, "cannot create pod directory");
    }

    if let Some(dir) = &pc.serviceaccount_dir {
        let expiry = loop {
            match token::write(ctx, &pod, dir).await {
                Ok(expiry) => break expiry,
                Err(e) => {
                    warn!(pod = format!("{ns}/{name}"), error = %e, "ServiceAccount token not ready; retrying");
                    tokio::time::sleep(Duration::from_secs(3)).await;
                }
            }
        };
        tokio::spawn(token::refresh(
            ctx.clone(),
            pod.clone(),
            dir.clone(),
            expiry,
            token_stop,
        ));
    }

    let spec = pod.spec.clone().unwrap_or_default();
    let mut state_rx = pc.state.subscribe();
    for (i, c) in spec.init_containers.iter().flatten().enumerate() {
        let kind = if c.restart_policy.as_deref() == Some("Always") {
            Kind::Sidecar
        } else {
            Kind::Init
        };
        let handle = container::start(pc.clone(), true, i, c.clone(), kind);
        let done = handle.done();
        push(&handles, handle);
        match kind {
            Kind::Sidecar => {
                let _ = state_rx
                    .wait_for(|s| s.init.get(i).is_none_or(|c| c.started))
                    .await;
            }
            _ => {
                container::wait_done(done).await;
                let ok = pc
                    .state
                    .borrow()
                    .container(true, i)
                    .and_then(|c| c.terminated())
                    .is_some_and(|t| t.exit_code == 0);
                if !ok {
                    info!(
                        pod = format!("{ns}/{name}"),
                        container = c.name,
                        "init container failed; pod failed"
                    );
                    pc.state.send_modify(|s| {
                        s.phase = Phase::Failed;
                        s.reason = Some("InitContainerFailed".into());
                    });
                    return;
                }
            }
        }
    }
    pc.state.send_modify(|s| {
        s.initialized = true;
        s.phase = Phase::Running;
    });
    let mut done = Vec::new();
    for (i, c) in spec.containers.iter().enumerate() {
        let handle = container::start(pc.clone(), false, i, c.clone(), Kind::Regular);
        done.push(handle.done());
        push(&handles, handle);
    }
    futures::future::join_all(done.into_iter().map(container::wait_done)).await;
    let succeeded = pc
        .state
        .borrow()
        .regular
        .iter()
        .all(|c| c.terminated().is_some_and(|t| t.exit_code == 0));
    // The main containers are done: stop the sidecars, then report the phase.
    stop_containers(&handles, Instant::now() + pc.grace()).await;
    info!(pod = format!("{ns}/{name}"), succeeded, "pod completed");
    pc.state.send_modify(|s| {
        s.phase = if succeeded {
            Phase::Succeeded
        } else {
            Phase::Failed
        };
    });
}

fn push(handles: &std::sync::Mutex<Vec<Handle>>, h: Handle) {
    handles
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(h);
}

/// Patches the Pod's status whenever what the stand-in reports changes.
async fn report_status(ctx: Arc<Ctx>, pc: Arc<PodCtx>) {
    let (ns, name) = pod_key(&pc.initial);
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let mut rx = pc.state.subscribe();
    let mut last: Option<serde_json::Value> = None;
    loop {
        let pod = pc.pod();
        let mut status = None;
        pc.state.send_if_modified(|s| {
            status = Some(s.to_status(&pod, Timestamp::now()));
            false
        });
        let value = status.and_then(|s| serde_json::to_value(s).ok());
        if value.is_some() && value != last {
            let patch = serde_json::json!({ "status": value });
            match api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    debug!(pod = format!("{ns}/{name}"), "status patched");
                    last = value;
                }
                Err(e) => {
                    warn!(pod = format!("{ns}/{name}"), error = %e, "status patch failed; retrying");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    continue;
                }
            }
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
        // Let a burst of changes settle into one patch.
        tokio::time::sleep(Duration::from_millis(100)).await;
        rx.borrow_and_update();
    }
}

/// Deletes the Pod object with grace period 0, as the kubelet does once its containers
/// are gone.
async fn delete_pod(ctx: &Ctx, ns: &str, name: &str, uid: &str) {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: Some(uid.to_owned()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(name, &dp).await {
        Ok(_) => info!(pod = format!("{ns}/{name}"), "pod deleted"),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
        Err(e) => warn!(pod = format!("{ns}/{name}"), error = %e, "pod delete failed"),
    }
}
