//! One container's life: resolve its config, start its process, probe it, restart it with
//! backoff per the restart policy, stop it on request.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::{
    api::core::v1::{ConfigMap, Container as Spec, Pod, Secret},
    jiff::Timestamp,
};
use kube::Api;
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use tracing::{info, warn};

use super::{
    env::{self, PodFacts, Sources},
    netns::PodNetwork,
    probe::{self, Check, Timing, Tracker},
    process::{Exit, Process, ProcessSpec},
    status::{Kind, PodState, State, Terminated},
};
use crate::localnode::Ctx;

/// Restart backoff: 1 s, doubling, capped at 30 s (the real kubelet: 10 s, capped at 5 min).
pub const BACKOFF_START: Duration = Duration::from_secs(1);
pub const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// A container whose ConfigMap/Secret is missing is retried this often.
const CONFIG_RETRY: Duration = Duration::from_secs(2);

/// Shared by every container of one Pod.
pub struct PodCtx {
    pub ctx: Arc<Ctx>,
    pub pod: watch::Receiver<Option<Arc<Pod>>>,
    pub initial: Arc<Pod>,
    pub state: Arc<watch::Sender<PodState>>,
    pub net: PodNetwork,
    pub serviceaccount_dir: Option<PathBuf>,
    pub pod_dir: PathBuf,
    pub log_dir: PathBuf,
}

impl PodCtx {
    /// The latest Pod object.
    pub fn pod(&self) -> Arc<Pod> {
        self.pod.borrow().clone().unwrap_or_else(|| self.initial.clone())
    }

    pub fn restart_policy(&self) -> String {
        self.initial
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into())
    }

    /// `terminationGracePeriodSeconds`, capped at 30 s.
    pub fn grace(&self) -> Duration {
        let secs = self
            .initial
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .unwrap_or(30)
            .clamp(0, 30);
        Duration::from_secs(u64::try_from(secs).unwrap_or(30))
    }

    fn update(&self, init: bool, index: usize, f: impl FnOnce(&mut super::status::Container)) {
        self.state.send_modify(|s| {
            if let Some(c) = s.container_mut(init, index) {
                f(c);
            }
        });
    }
}

/// The handle of a running container task.
#[derive(Clone)]
pub struct Handle {
    pub name: String,
    pub kind: Kind,
    stop: watch::Sender<Option<Instant>>,
    done: watch::Receiver<bool>,
}

impl Handle {
    /// Asks the container to stop: SIGTERM now, SIGKILL at `deadline`.
    pub fn stop(&self, deadline: Instant) {
        self.stop.send_if_modified(|d| {
            if d.is_none() {
                *d = Some(deadline);
                true
            } else {
                false
            }
        });
    }

    /// A receiver that turns `true` when the container task has ended.
    pub fn done(&self) -> watch::Receiver<bool> {
        self.done.clone()
    }
}

/// Waits for a container task to end.
pub async fn wait_done(mut done: watch::Receiver<bool>) {
    let _ = done.wait_for(|d| *d).await;
}

struct DoneGuard(watch::Sender<bool>);

impl Drop for DoneGuard {
    fn drop(&mut self) {
        self.0.send_replace(true);
    }
}

/// Starts the task that runs container `index` (of the init list when `init`).
pub fn start(pc: Arc<PodCtx>, init: bool, index: usize, spec: Spec, kind: Kind) -> Handle {
    let (stop_tx, stop_rx) = watch::channel(None);
    let (done_tx, done_rx) = watch::channel(false);
    let name = spec.name.clone();
    tokio::spawn(async move {
        let _guard = DoneGuard(done_tx);
        run(pc, init, index, spec, kind, stop_rx).await;
    });
    Handle {
        name,
        kind,
        stop: stop_tx,
        done: done_rx,
    }
}

enum ProbeEvent {
    Started,
    Ready(bool),
    Unhealthy(String),
}

/// Sleeps for `d` unless a stop is requested first; `true` when stopped.
async fn sleep_or_stop(d: Duration, stop: &mut watch::Receiver<Option<Instant>>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stop.wait_for(Option::is_some) => true,
    }
}

async fn run(
    pc: Arc<PodCtx>,
    init: bool,
    index: usize,
    spec: Spec,
    kind: Kind,
    mut stop: watch::Receiver<Option<Instant>>,
) {
    let pod = pc.pod();
    let pod_key = format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    );
    let image = spec.image.clone().unwrap_or_default();
    let Some(binary) = pc.ctx.images.binary_for(&image).map(Path::to_path_buf) else {
        // No local binary: reported running (and ready) without a process.
        let now = Timestamp::now();
        pc.update(init, index, |c| {
            c.state = State::Running { started_at: now };
            c.started = true;
            c.ready = kind != Kind::Init;
        });
        if kind == Kind::Init {
            pc.update(init, index, |c| {
                c.state = State::Terminated(Terminated {
                    exit_code: 0,
                    signal: None,
                    reason: "Completed".into(),
                    message: Some("no local binary for this image: nothing was run".into()),
                    started_at: Some(now),
                    finished_at: Timestamp::now(),
                });
                c.ready = true;
                c.started = false;
            });
            return;
        }
        let _ = stop.wait_for(Option::is_some).await;
        pc.update(init, index, |c| {
            c.state = State::Terminated(Terminated {
                exit_code: 0,
                signal: None,
                reason: "Completed".into(),
                message: None,
                started_at: Some(now),
                finished_at: Timestamp::now(),
            });
            c.ready = false;
            c.started = false;
        });
        return;
    };

    let policy = pc.restart_policy();
    let log_path = pc.log_dir.join(format!(
        "{}_{}_{}.log",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default(),
        spec.name
    ));
    let mut backoff = BACKOFF_START;
    loop {
        if stop.borrow().is_some() {
            return;
        }
        let pod = pc.pod();
        let env = match resolve_env(&pc, &pod, &spec).await {
            Ok(env) => env,
            Err(message) => {
                warn!(
                    pod = pod_key,
                    container = spec.name,
                    message,
                    "CreateContainerConfigError"
                );
                pc.update(init, index, |c| {
                    c.wait("CreateContainerConfigError", Some(message))
                });
                if sleep_or_stop(CONFIG_RETRY, &mut stop).await {
                    return;
                }
                continue;
            }
        };
        let process_spec = ProcessSpec {
            netns: pc.net.netns.clone(),
            argv: env::argv(&binary, &spec, &env),
            env,
            serviceaccount_dir: pc.serviceaccount_dir.clone(),
            log_path: log_path.clone(),
            cwd: pc.pod_dir.clone(),
        };
        let mut process = match Process::spawn(&process_spec).await {
            Ok(p) => p,
            Err(e) => {
                warn!(pod = pod_key, container = spec.name, error = %e, "could not start container process");
                pc.update(init, index, |c| c.wait("RunContainerError", Some(e.to_string())));
                if sleep_or_stop(backoff, &mut stop).await {
                    return;
                }
                backoff = (backoff * 2).min(BACKOFF_CAP);
                continue;
            }
        };
        let started_at = Timestamp::now();
        let started_instant = Instant::now();
        info!(pod = pod_key, container = spec.name, pid = ?process.pid(), "container started");
        pc.update(init, index, |c| {
            c.state = State::Running { started_at };
            c.container_id = Some(format!("localnode://{}", process.pid().unwrap_or_default()));
            c.ready = false;
            c.started = false;
        });

        let (probe_tx, mut probe_rx) = mpsc::channel(8);
        let probes = tokio::spawn(run_probes(
            pc.ctx.clone(),
            spec.clone(),
            kind,
            pc.net.ip,
            probe_tx,
        ));
        let mut unhealthy = None;
        let exit: Exit = loop {
            tokio::select! {
                exit = process.wait() => break exit,
                deadline = async { stop.wait_for(Option::is_some).await.ok().and_then(|d| *d) } => {
                    break process.terminate(deadline.unwrap_or_else(Instant::now)).await;
                }
                Some(event) = probe_rx.recv() => match event {
                    ProbeEvent::Started => pc.update(init, index, |c| c.started = true),
                    ProbeEvent::Ready(ready) => pc.update(init, index, |c| c.ready = ready && c.started && kind != Kind::Init),
                    ProbeEvent::Unhealthy(message) => {
                        warn!(pod = pod_key, container = spec.name, message, "container unhealthy, restarting");
                        unhealthy = Some(message);
                        break process.terminate(Instant::now() + pc.grace()).await;
                    }
                },
            }
        };
        probes.abort();
        let finished_at = Timestamp::now();
        info!(
            pod = pod_key,
            container = spec.name,
            code = exit.code,
            "container exited"
        );
        let term = Terminated {
            exit_code: exit.code,
            signal: exit.signal,
            reason: exit.reason().into(),
            message: unhealthy,
            started_at: Some(started_at),
            finished_at,
        };
        let stopping = stop.borrow().is_some();
        let restart = !stopping
            && match kind {
                Kind::Sidecar => true,
                Kind::Init => exit.code != 0 && policy != "Never",
                Kind::Regular => policy == "Always" || (policy == "OnFailure" && exit.code != 0),
            };
        if !restart {
            pc.update(init, index, |c| {
                c.ready = kind == Kind::Init && term.exit_code == 0;
                c.started = false;
                c.state = State::Terminated(term);
            });
            return;
        }
        if started_instant.elapsed() > BACKOFF_CAP * 2 {
            backoff = BACKOFF_START;
        }
        let message = format!(
            "back-off {}s restarting failed container={}",
            backoff.as_secs(),
            spec.name
        );
        pc.update(init, index, |c| {
            c.last = Some(term);
            c.restart_count += 1;
            c.container_id = None;
            c.wait("CrashLoopBackOff", Some(message));
        });
        if sleep_or_stop(backoff, &mut stop).await {
            return;
        }
        backoff = (backoff * 2).min(BACKOFF_CAP);
    }
}

/// Fetches the ConfigMaps and Secrets the container refers to and resolves its env.
async fn resolve_env(pc: &PodCtx, pod: &Pod, spec: &Spec) -> Result<Vec<(String, String)>, String> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let (cm_names, secret_names) = env::referenced(spec);
    let mut sources = Sources::default();
    let cms: Api<ConfigMap> = Api::namespaced(pc.ctx.client.clone(), &ns);
    for name in cm_names {
        if let Some(cm) = cms
            .get_opt(&name)
            .await
            .map_err(|e| format!("configmap {name:?}: {e}"))?
        {
            sources.config_maps.insert(name, cm.data.unwrap_or_default());
        }
    }
    let secrets: Api<Secret> = Api::namespaced(pc.ctx.client.clone(), &ns);
    for name in secret_names {
        if let Some(s) = secrets
            .get_opt(&name)
            .await
            .map_err(|e| format!("secret {name:?}: {e}"))?
        {
            let data = s
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
                .collect();
            sources.secrets.insert(name, data);
        }
    }
    let facts = PodFacts {
        pod_ip: pc.net.ip.to_string(),
        host_ip: pc.ctx.gateway.to_string(),
        node_name: pc.ctx.node_name.clone(),
        api_host: pc.ctx.gateway.to_string(),
        api_port: pc.ctx.api_port,
        node_cpu_millis: pc.ctx.capacity.cpu_millis,
        node_memory_bytes: pc.ctx.capacity.memory_bytes,
    };
    env::resolve(pod, spec, &facts, &sources).map_err(|e| e.to_string())
}

/// Startup probe first; then readiness and liveness side by side. Sends `Started` once the
/// startup probe passes (at once without one), `Ready` on every readiness change (at once
/// `Ready(true)` without a readiness probe), `Unhealthy` when startup or liveness fails.
async fn run_probes(
    ctx: Arc<Ctx>,
    spec: Spec,
    kind: Kind,
    ip: std::net::Ipv4Addr,
    tx: mpsc::Sender<ProbeEvent>,
) {
    let probes_allowed = kind != Kind::Init;
    let prepared = |p: Option<&k8s_openapi::api::core::v1::Probe>| {
        p.filter(|_| probes_allowed)
            .map(|p| (check_or_failing(p, &spec), Timing::of(p)))
    };
    if let Some((check, timing)) = prepared(spec.startup_probe.as_ref()) {
        tokio::time::sleep(timing.initial_delay).await;
        let mut failures = 0;
        loop {
            if probe::run(&check, ip, timing.timeout, &ctx.http).await {
                break;
            }
            failures += 1;
            if failures >= timing.failure_threshold {
                let _ = tx
                    .send(ProbeEvent::Unhealthy("Startup probe failed".into()))
                    .await;
                return std::future::pending().await;
            }
            tokio::time::sleep(timing.period).await;
        }
    }
    if tx.send(ProbeEvent::Started).await.is_err() {
        return;
    }
    let readiness = async {
        let Some((check, timing)) = prepared(spec.readiness_probe.as_ref()) else {
            let _ = tx.send(ProbeEvent::Ready(true)).await;
            return std::future::pending::<()>().await;
        };
        tokio::time::sleep(timing.initial_delay).await;
        let mut tracker = Tracker::new(timing, false);
        let mut reported = None;
        loop {
            let ok = probe::run(&check, ip, timing.timeout, &ctx.http).await;
            let result = tracker.record(ok);
            if reported != Some(result) {
                reported = Some(result);
                let _ = tx.send(ProbeEvent::Ready(result)).await;
            }
            tokio::time::sleep(timing.period).await;
        }
    };
    let liveness = async {
        let Some((check, timing)) = prepared(spec.liveness_probe.as_ref()) else {
            return std::future::pending::<()>().await;
        };
        tokio::time::sleep(timing.initial_delay).await;
        let mut tracker = Tracker::new(timing, true);
        loop {
            let ok = probe::run(&check, ip, timing.timeout, &ctx.http).await;
            if !tracker.record(ok) {
                let _ = tx
                    .send(ProbeEvent::Unhealthy("Liveness probe failed".into()))
                    .await;
                return std::future::pending::<()>().await;
            }
            tokio::time::sleep(timing.period).await;
        }
    };
    tokio::join!(readiness, liveness);
}

/// A probe that cannot be turned into a check (e.g. an unknown named port) always fails,
/// as the kubelet's does.
fn check_or_failing(p: &k8s_openapi::api::core::v1::Probe, spec: &Spec) -> Check {
    probe::check_of(p, spec).unwrap_or_else(|e| {
        warn!(container = spec.name, error = e, "probe cannot run; it will fail");
        Check::Tcp { port: 0 }
    })
}
