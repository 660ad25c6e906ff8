//! The Node object and its heartbeat (status + Lease in kube-node-lease).

use std::{sync::Arc, time::Duration};

use k8s_openapi::{
    api::{
        coordination::v1::{Lease, LeaseSpec},
        core::v1::{
            DaemonEndpoint, Node, NodeAddress, NodeCondition, NodeDaemonEndpoints, NodeStatus, NodeSystemInfo,
        },
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time},
    },
    jiff::Timestamp,
};
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Ctx;
use crate::Result;

const FIELD_MANAGER: &str = "sidecert-localnode";
/// How often the Node status and Lease are renewed.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
const LEASE_NAMESPACE: &str = "kube-node-lease";

/// Registers the Node, then keeps it Ready until `shutdown`.
pub async fn run(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let since = Timestamp::now();
    let kubelet_version = match ctx.client.apiserver_version().await {
        Ok(v) => v.git_version,
        Err(e) => {
            warn!(error = %e, "could not read the API server version");
            "v0.0.0".into()
        }
    };
    loop {
        match beat(&ctx, since, &kubelet_version).await {
            Ok(()) => {}
            Err(e) => warn!(error = %e, "node heartbeat failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(HEARTBEAT) => {}
        }
    }
}

async fn beat(ctx: &Ctx, since: Timestamp, kubelet_version: &str) -> Result<()> {
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let node = nodes
        .patch(&ctx.node_name, &pp, &Patch::Apply(node_object(ctx)))
        .await?;
    let now = Timestamp::now();
    let status = Node {
        metadata: ObjectMeta {
            name: Some(ctx.node_name.clone()),
            ..Default::default()
        },
        status: Some(node_status(ctx, since, now, kubelet_version)),
        ..Default::default()
    };
    nodes
        .patch_status(&ctx.node_name, &pp, &Patch::Apply(status))
        .await?;

    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), LEASE_NAMESPACE);
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(ctx.node_name.clone()),
            namespace: Some(LEASE_NAMESPACE.into()),
            owner_references: node.metadata.uid.map(|uid| {
                vec![OwnerReference {
                    api_version: "v1".into(),
                    kind: "Node".into(),
                    name: ctx.node_name.clone(),
                    uid,
                    ..Default::default()
                }]
            }),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(ctx.node_name.clone()),
            lease_duration_seconds: Some(40),
            renew_time: Some(MicroTime(now)),
            ..Default::default()
        }),
    };
    leases.patch(&ctx.node_name, &pp, &Patch::Apply(lease)).await?;
    Ok(())
}

fn node_object(ctx: &Ctx) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(ctx.node_name.clone()),
            labels: Some(
                [
                    ("kubernetes.io/hostname", ctx.node_name.as_str()),
                    ("kubernetes.io/os", "linux"),
                    ("kubernetes.io/arch", std::env::consts::ARCH),
                    ("sidecert.io/localnode", "true"),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            ),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn node_status(ctx: &Ctx, since: Timestamp, now: Timestamp, kubelet_version: &str) -> NodeStatus {
    let condition = |type_: &str, status: &str, reason: &str, message: &str| NodeCondition {
        type_: type_.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_heartbeat_time: Some(Time(now)),
        last_transition_time: Some(Time(since)),
    };
    let resources = [
        ("cpu", Quantity(format!("{}m", ctx.capacity.cpu_millis))),
        ("memory", Quantity(ctx.capacity.memory_bytes.to_string())),
        ("pods", Quantity(ctx.capacity.pods.to_string())),
        ("ephemeral-storage", Quantity("10Gi".into())),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect::<std::collections::BTreeMap<_, _>>();
    NodeStatus {
        conditions: Some(vec![
            condition(
                "Ready",
                "True",
                "KubeletReady",
                "sidecert localnode is posting ready status",
            ),
            condition(
                "MemoryPressure",
                "False",
                "KubeletHasSufficientMemory",
                "no memory pressure",
            ),
            condition(
                "DiskPressure",
                "False",
                "KubeletHasNoDiskPressure",
                "no disk pressure",
            ),
            condition(
                "PIDPressure",
                "False",
                "KubeletHasSufficientPID",
                "no PID pressure",
            ),
        ]),
        addresses: Some(vec![
            NodeAddress {
                type_: "InternalIP".into(),
                address: ctx.gateway.to_string(),
            },
            NodeAddress {
                type_: "Hostname".into(),
                address: ctx.node_name.clone(),
            },
        ]),
        capacity: Some(resources.clone()),
        allocatable: Some(resources),
        daemon_endpoints: Some(NodeDaemonEndpoints {
            kubelet_endpoint: Some(DaemonEndpoint { port: 10250 }),
        }),
        node_info: Some(NodeSystemInfo {
            architecture: std::env::consts::ARCH
                .replace("x86_64", "amd64")
                .replace("aarch64", "arm64"),
            boot_id: ctx.boot_id.clone(),
            container_runtime_version: format!("sidecert-localnode://{}", env!("CARGO_PKG_VERSION")),
            kernel_version: ctx.kernel_version.clone(),
            kube_proxy_version: String::new(),
            kubelet_version: kubelet_version.to_owned(),
            machine_id: ctx.boot_id.clone(),
            operating_system: "linux".into(),
            os_image: "sidecert localnode (no container runtime)".into(),
            system_uuid: ctx.boot_id.clone(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Marks the Node not ready on shutdown (best effort), so nothing mistakes a stopped
/// stand-in for a live node.
pub async fn mark_not_ready(ctx: &Ctx) {
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let now = Time(Timestamp::now());
    let patch = serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "status": {"conditions": [{
            "type": "Ready", "status": "False", "reason": "KubeletStopped",
            "message": "sidecert localnode stopped",
            "lastHeartbeatTime": now, "lastTransitionTime": now,
        }]}
    });
    match nodes
        .patch_status(
            &ctx.node_name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(patch),
        )
        .await
    {
        Ok(_) => info!("node marked not ready"),
        Err(e) => warn!(error = %e, "could not mark the node not ready"),
    }
}
