//! What the stand-in knows about a Pod, and the Pod status it reports (pure).

use std::{collections::BTreeMap, net::Ipv4Addr};

use k8s_openapi::{
    api::core::v1::{
        ContainerState as K8sState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
        ContainerStatus, HostIP, Pod, PodCondition, PodIP, PodStatus,
    },
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};

/// Where a container sits in the Pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular init container: must exit 0 before the next one starts.
    Init,
    /// An init container with `restartPolicy: Always` (native sidecar).
    Sidecar,
    Regular,
}

/// A terminated container instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Terminated {
    pub exit_code: i32,
    pub signal: Option<i32>,
    pub reason: String,
    pub message: Option<String>,
    pub started_at: Option<Timestamp>,
    pub finished_at: Timestamp,
}

/// A container's current state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Waiting { reason: String, message: Option<String> },
    Running { started_at: Timestamp },
    Terminated(Terminated),
}

/// One container as the stand-in tracks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    pub name: String,
    pub image: String,
    pub kind: Kind,
    pub state: State,
    pub last: Option<Terminated>,
    pub restart_count: i32,
    pub ready: bool,
    pub started: bool,
    pub container_id: Option<String>,
}

impl Container {
    fn new(name: &str, image: &str, kind: Kind, waiting_reason: &str) -> Self {
        Self {
            name: name.to_owned(),
            image: image.to_owned(),
            kind,
            state: State::Waiting {
                reason: waiting_reason.to_owned(),
                message: None,
            },
            last: None,
            restart_count: 0,
            ready: false,
            started: false,
            container_id: None,
        }
    }

    /// Waiting with a reason (`CreateContainerConfigError`, `CrashLoopBackOff`, ...).
    pub fn wait(&mut self, reason: &str, message: Option<String>) {
        self.state = State::Waiting {
            reason: reason.to_owned(),
            message,
        };
        self.ready = false;
        self.started = false;
    }

    pub fn terminated(&self) -> Option<&Terminated> {
        match &self.state {
            State::Terminated(t) => Some(t),
            _ => None,
        }
    }

    fn to_k8s(&self) -> ContainerStatus {
        ContainerStatus {
            name: self.name.clone(),
            image: self.image.clone(),
            image_id: String::new(),
            container_id: self.container_id.clone(),
            ready: self.ready,
            started: Some(self.started),
            restart_count: self.restart_count,
            state: Some(state_to_k8s(&self.state)),
            last_state: self.last.clone().map(|t| state_to_k8s(&State::Terminated(t))),
            ..Default::default()
        }
    }
}

fn state_to_k8s(s: &State) -> K8sState {
    match s {
        State::Waiting { reason, message } => K8sState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.clone()),
                message: message.clone(),
            }),
            ..Default::default()
        },
        State::Running { started_at } => K8sState {
            running: Some(ContainerStateRunning {
                started_at: Some(Time(*started_at)),
            }),
            ..Default::default()
        },
        State::Terminated(t) => K8sState {
            terminated: Some(ContainerStateTerminated {
                exit_code: t.exit_code,
                signal: t.signal,
                reason: Some(t.reason.clone()),
                message: t.message.clone(),
                started_at: t.started_at.map(Time),
                finished_at: Some(Time(t.finished_at)),
                container_id: None,
            }),
            ..Default::default()
        },
    }
}

/// Pod phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Running,
    Succeeded,
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Running => "Running",
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }
}

/// Everything the stand-in reports about one Pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodState {
    pub phase: Phase,
    pub reason: Option<String>,
    pub pod_ip: Option<Ipv4Addr>,
    pub host_ip: Ipv4Addr,
    pub start_time: Timestamp,
    pub initialized: bool,
    /// Init containers (regular and sidecars), in spec order.
    pub init: Vec<Container>,
    pub regular: Vec<Container>,
    /// Last transition of each condition this stand-in owns.
    transitions: BTreeMap<&'static str, (bool, Timestamp)>,
}

/// A condition's reason and message.
type ReasonMessage = (Option<String>, Option<String>);

const OWN_CONDITIONS: [&str; 5] = [
    "PodScheduled",
    "PodReadyToStartContainers",
    "Initialized",
    "ContainersReady",
    "Ready",
];

impl PodState {
    pub fn new(pod: &Pod, host_ip: Ipv4Addr, now: Timestamp) -> Self {
        let spec = pod.spec.clone().unwrap_or_default();
        let init: Vec<Container> = spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| {
                let kind = if c.restart_policy.as_deref() == Some("Always") {
                    Kind::Sidecar
                } else {
                    Kind::Init
                };
                Container::new(
                    &c.name,
                    c.image.as_deref().unwrap_or_default(),
                    kind,
                    "PodInitializing",
                )
            })
            .collect();
        let waiting = if init.is_empty() {
            "ContainerCreating"
        } else {
            "PodInitializing"
        };
        let mut regular: Vec<Container> = spec
            .containers
            .iter()
            .map(|c| {
                Container::new(
                    &c.name,
                    c.image.as_deref().unwrap_or_default(),
                    Kind::Regular,
                    waiting,
                )
            })
            .collect();
        // Restart counts survive a restart of the stand-in (the kubelet keeps them too).
        let mut init = init;
        if let Some(status) = &pod.status {
            for (containers, reported) in [
                (&mut init, &status.init_container_statuses),
                (&mut regular, &status.container_statuses),
            ] {
                for c in containers.iter_mut() {
                    if let Some(r) = reported.iter().flatten().find(|r| r.name == c.name) {
                        c.restart_count = r.restart_count.max(0);
                    }
                }
            }
        }
        Self {
            phase: Phase::Pending,
            reason: None,
            pod_ip: None,
            host_ip,
            start_time: now,
            initialized: false,
            init,
            regular,
            transitions: BTreeMap::new(),
        }
    }

    /// The container at `(init, index)`.
    pub fn container_mut(&mut self, init: bool, index: usize) -> Option<&mut Container> {
        if init {
            self.init.get_mut(index)
        } else {
            self.regular.get_mut(index)
        }
    }

    pub fn container(&self, init: bool, index: usize) -> Option<&Container> {
        if init {
            self.init.get(index)
        } else {
            self.regular.get(index)
        }
    }

    fn containers_ready(&self) -> bool {
        self.regular.iter().all(|c| c.ready)
            && self
                .init
                .iter()
                .filter(|c| c.kind == Kind::Sidecar)
                .all(|c| c.ready)
    }

    fn unready(&self) -> Vec<&str> {
        self.init
            .iter()
            .filter(|c| c.kind == Kind::Sidecar)
            .chain(&self.regular)
            .filter(|c| !c.ready)
            .map(|c| c.name.as_str())
            .collect()
    }

    /// The status to report. Conditions of other owners in `pod`'s current status are kept;
    /// transition times of ours change only when a condition flips (so an unchanged state
    /// yields an identical status).
    pub fn to_status(&mut self, pod: &Pod, now: Timestamp) -> PodStatus {
        let completed = self.phase.is_terminal();
        let ready_to_start = self.pod_ip.is_some();
        let containers_ready = !completed && self.phase == Phase::Running && self.containers_ready();
        let gates_ok = pod
            .spec
            .as_ref()
            .and_then(|s| s.readiness_gates.as_ref())
            .into_iter()
            .flatten()
            .all(|g| {
                pod.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .into_iter()
                    .flatten()
                    .any(|c| c.type_ == g.condition_type && c.status == "True")
            });
        let unready = self.unready().join(" ");
        let not_ready = |reason: &str| {
            if completed {
                (Some("PodCompleted".to_owned()), None)
            } else {
                (
                    Some(reason.to_owned()),
                    Some(format!("containers with unready status: [{unready}]")),
                )
            }
        };
        let wanted: [(&'static str, bool, ReasonMessage); 5] = [
            ("PodScheduled", true, (None, None)),
            ("PodReadyToStartContainers", ready_to_start, (None, None)),
            (
                "Initialized",
                self.initialized,
                if self.initialized {
                    (None, None)
                } else {
                    (Some("ContainersNotInitialized".into()), None)
                },
            ),
            (
                "ContainersReady",
                containers_ready,
                if containers_ready {
                    (None, None)
                } else {
                    not_ready("ContainersNotReady")
                },
            ),
            (
                "Ready",
                containers_ready && gates_ok,
                if containers_ready && gates_ok {
                    (None, None)
                } else {
                    not_ready(if containers_ready {
                        "ReadinessGatesNotReady"
                    } else {
                        "ContainersNotReady"
                    })
                },
            ),
        ];
        let mut conditions: Vec<PodCondition> = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default()
            .into_iter()
            .filter(|c| !OWN_CONDITIONS.contains(&c.type_.as_str()))
            .collect();
        for (type_, status, (reason, message)) in wanted {
            let at = match self.transitions.get(type_) {
                Some((s, at)) if *s == status => *at,
                _ => {
                    self.transitions.insert(type_, (status, now));
                    now
                }
            };
            conditions.push(PodCondition {
                type_: type_.to_owned(),
                status: if status { "True" } else { "False" }.to_owned(),
                last_transition_time: Some(Time(at)),
                reason,
                message,
                ..Default::default()
            });
        }
        let pod_ip = self.pod_ip.map(|ip| ip.to_string());
        PodStatus {
            phase: Some(self.phase.as_str().to_owned()),
            reason: self.reason.clone(),
            host_ip: Some(self.host_ip.to_string()),
            host_ips: Some(vec![HostIP {
                ip: self.host_ip.to_string(),
            }]),
            pod_ip: pod_ip.clone(),
            pod_ips: pod_ip.map(|ip| vec![PodIP { ip }]),
            start_time: Some(Time(self.start_time)),
            conditions: Some(conditions),
            init_container_statuses: Some(self.init.iter().map(Container::to_k8s).collect()),
            container_statuses: Some(self.regular.iter().map(Container::to_k8s).collect()),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use serde_json::json;

    use super::*;

    fn pod() -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "n", "uid": "u"},
            "spec": {
                "initContainers": [
                    {"name": "setup", "image": "busybox"},
                    {"name": "sidecar", "image": "ghcr.io/sidecert/sidecar:1", "restartPolicy": "Always"}
                ],
                "containers": [{"name": "app", "image": "example/app"}]
            },
            "status": {"conditions": [{"type": "example.com/gate", "status": "True"}]}
        }))
        .unwrap()
    }

    fn cond<'a>(s: &'a PodStatus, t: &str) -> &'a PodCondition {
        s.conditions.iter().flatten().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn initial_state_is_pending_and_waiting() {
        let now = Timestamp::now();
        let mut st = PodState::new(&pod(), Ipv4Addr::new(10, 213, 0, 1), now);
        assert_eq!(st.init[0].kind, Kind::Init);
        assert_eq!(st.init[1].kind, Kind::Sidecar);
        let s = st.to_status(&pod(), now);
        assert_eq!(s.phase.as_deref(), Some("Pending"));
        assert_eq!(cond(&s, "Ready").status, "False");
        assert_eq!(cond(&s, "PodScheduled").status, "True");
        assert_eq!(cond(&s, "example.com/gate").status, "True");
        let app = &s.container_statuses.as_ref().unwrap()[0];
        assert_eq!(
            app.state
                .as_ref()
                .unwrap()
                .waiting
                .as_ref()
                .unwrap()
                .reason
                .as_deref(),
            Some("PodInitializing")
        );
        assert_eq!(s.pod_ip, None);
    }

    #[test]
    fn running_ready_pod_and_stable_transitions() {
        let t0 = Timestamp::now();
        let p = pod();
        let mut st = PodState::new(&p, Ipv4Addr::new(10, 213, 0, 1), t0);
        let first = st.to_status(&p, t0);
        st.pod_ip = Some(Ipv4Addr::new(10, 213, 0, 10));
        st.phase = Phase::Running;
        st.initialized = true;
        for c in st.init.iter_mut().chain(st.regular.iter_mut()) {
            c.state = State::Running { started_at: t0 };
            c.started = true;
            c.ready = true;
        }
        let t1 = t0 + k8s_openapi::jiff::SignedDuration::from_secs(5);
        let s = st.to_status(&p, t1);
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert_eq!(s.pod_ip.as_deref(), Some("10.213.0.10"));
        assert_eq!(cond(&s, "Ready").status, "True");
        assert_eq!(cond(&s, "Ready").last_transition_time, Some(Time(t1)));
        assert_eq!(cond(&first, "PodScheduled").last_transition_time, Some(Time(t0)));
        // Same state later: identical status.
        let t2 = t1 + k8s_openapi::jiff::SignedDuration::from_secs(5);
        assert_eq!(st.to_status(&p, t2), s);
        // A sidecar going unready makes the Pod unready.
        st.init[1].ready = false;
        let s = st.to_status(&p, t2);
        assert_eq!(cond(&s, "Ready").status, "False");
        assert_eq!(
            cond(&s, "Ready").message.as_deref(),
            Some("containers with unready status: [sidecar]")
        );
    }

    #[test]
    fn completed_pod_is_not_ready() {
        let now = Timestamp::now();
        let p = pod();
        let mut st = PodState::new(&p, Ipv4Addr::new(10, 213, 0, 1), now);
        st.phase = Phase::Succeeded;
        st.regular[0].state = State::Terminated(Terminated {
            exit_code: 0,
            signal: None,
            reason: "Completed".into(),
            message: None,
            started_at: Some(now),
            finished_at: now,
        });
        let s = st.to_status(&p, now);
        assert_eq!(s.phase.as_deref(), Some("Succeeded"));
        assert_eq!(cond(&s, "Ready").reason.as_deref(), Some("PodCompleted"));
        let term = s.container_statuses.as_ref().unwrap()[0]
            .state
            .as_ref()
            .unwrap()
            .terminated
            .clone()
            .unwrap();
        assert_eq!(term.exit_code, 0);
    }

    #[test]
    fn restart_counts_carry_over_from_the_reported_status() {
        let mut p = pod();
        p.status = Some(
            serde_json::from_value(json!({
                "containerStatuses": [{"name": "app", "image": "example/app", "imageID": "",
                                        "ready": false, "restartCount": 7}]
            }))
            .unwrap(),
        );
        let st = PodState::new(&p, Ipv4Addr::new(10, 213, 0, 1), Timestamp::now());
        assert_eq!(st.regular[0].restart_count, 7);
        assert_eq!(st.init[0].restart_count, 0);
    }
}
