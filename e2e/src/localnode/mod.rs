//! The kubelet stand-in: one Node, no container runtime.
//!
//! It registers the Node and keeps it Ready ([`node`]), binds unscheduled Pods to it
//! ([`binder`]), runs the Pods bound to it ([`pods`]): each in its own network namespace on
//! the harness' bridge, each container whose image maps to a local binary ([`images`]) as a
//! process with exactly the Pod's command, args and env and a bound ServiceAccount token;
//! and keeps pebble-challtestsrv's DNS in line with the cluster ([`dns`]).

pub mod binder;
pub mod dns;
pub mod images;
pub mod ipam;
pub mod node;
pub mod pods;

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use kube::{
    Client,
    config::{KubeConfigOptions, Kubeconfig},
};
use tokio_util::sync::CancellationToken;
use tracing::info;

use self::{
    images::ImageTable,
    ipam::{IpPool, Ipv4Cidr},
};
use crate::{Error, Result};

/// `sidecert-e2e localnode` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Admin kubeconfig of the plane.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: PathBuf,
    /// Name of the Node to register.
    #[arg(long, default_value = "sidecert-local")]
    pub node_name: String,
    /// Bridge the Pods' veths attach to (created by cluster-up.sh).
    #[arg(long, default_value = "scbr0")]
    pub bridge: String,
    /// The bridge's host address: the Pods' default route, the Node's InternalIP and the
    /// API server address handed to processes.
    #[arg(long, default_value = "10.213.0.1")]
    pub gateway: Ipv4Addr,
    /// The Pod network; Pods get .10 to .250.
    #[arg(long, default_value = "10.213.0.0/24")]
    pub pod_cidr: Ipv4Cidr,
    /// The API server's port on the gateway address.
    #[arg(long, default_value_t = 6443)]
    pub api_server_port: u16,
    /// pebble-challtestsrv's management URL.
    #[arg(long, default_value = "http://127.0.0.1:8055")]
    pub challtestsrv: String,
    /// Where Pod directories (tokens) and container logs go.
    #[arg(long, default_value = "e2e/.state")]
    pub state_dir: PathBuf,
    /// The image → binary table.
    #[arg(long, default_value = "e2e/images.txt")]
    pub images: PathBuf,
    /// Binary paths in the table are relative to this directory [default: the repository
    /// this binary was built from].
    #[arg(long)]
    pub repo_root: Option<PathBuf>,
    /// Only keep pebble-challtestsrv's DNS in line with the cluster: a real kubelet runs the
    /// node (e2e/scripts/node.sh), and no real component gives Pebble these records.
    #[arg(long)]
    pub dns_only: bool,
}

/// What the node offers (reported as capacity and used as default resource limits).
#[derive(Debug, Clone, Copy)]
pub struct Capacity {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub pods: u32,
}

/// Shared by every part of the stand-in.
pub struct Ctx {
    pub client: Client,
    pub node_name: String,
    pub bridge: String,
    pub gateway: Ipv4Addr,
    pub cidr: Ipv4Cidr,
    pub api_port: u16,
    pub state_dir: PathBuf,
    pub images: ImageTable,
    pub http: reqwest::Client,
    pub capacity: Capacity,
    pub boot_id: String,
    pub kernel_version: String,
    ipam: Mutex<IpPool>,
}

impl Ctx {
    pub fn allocate_ip(&self, preferred: Option<Ipv4Addr>) -> Option<Ipv4Addr> {
        self.ipam
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .allocate(preferred)
    }

    pub fn release_ip(&self, ip: Ipv4Addr) {
        self.ipam
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .release(ip);
    }
}

/// A kube client from a kubeconfig file.
pub async fn client_from_kubeconfig(path: &Path) -> Result<Client> {
    let kubeconfig = Kubeconfig::read_from(path)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(p)
        .or_else(|_| std::path::absolute(p))
        .map_err(|e| Error::io(p, e))
}

/// Runs the stand-in until `shutdown` is cancelled, then stops every container it started
/// and removes every network it made.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    let built_from = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let repo_root = absolute(config.repo_root.as_deref().unwrap_or(&built_from))?;
    let state_dir = absolute(&config.state_dir)?;
    let images = ImageTable::load(&config.images, &repo_root).await?;
    info!(
        images = images.len(),
        node = config.node_name,
        "starting localnode"
    );
    let client = client_from_kubeconfig(&config.kubeconfig).await?;
    let http = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::limited(10))
        .build()?;
    let challtestsrv = dns::Challtestsrv::new(&config.challtestsrv)?;
    let ctx = Arc::new(Ctx {
        client,
        node_name: config.node_name.clone(),
        bridge: config.bridge.clone(),
        gateway: config.gateway,
        cidr: config.pod_cidr,
        api_port: config.api_server_port,
        state_dir: state_dir.clone(),
        images,
        http,
        capacity: capacity().await,
        boot_id: read_trimmed("/proc/sys/kernel/random/boot_id").await,
        kernel_version: read_trimmed("/proc/sys/kernel/osrelease").await,
        ipam: Mutex::new(IpPool::new(config.pod_cidr)),
    });
    for dir in [state_dir.join("pods"), state_dir.join("logs").join("pods")] {
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| Error::io(&dir, e))?;
    }
    if config.dns_only {
        info!("DNS only: a real kubelet runs the node");
        dns::run(ctx, challtestsrv, shutdown).await;
        info!("localnode stopped");
        return Ok(());
    }
    pods::netns::cleanup_leftovers().await;

    let tasks = [
        tokio::spawn(node::run(ctx.clone(), shutdown.clone())),
        tokio::spawn(binder::run(ctx.clone(), shutdown.clone())),
        tokio::spawn(dns::run(ctx.clone(), challtestsrv, shutdown.clone())),
        tokio::spawn(pods::run(ctx.clone(), shutdown.clone())),
    ];
    shutdown.cancelled().await;
    info!("shutting down");
    for t in tasks {
        let _ = t.await;
    }
    // Best effort, and never a reason to hang: the API server may be gone already.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(3), node::mark_not_ready(&ctx)).await;
    pods::netns::cleanup_leftovers().await;
    info!("localnode stopped");
    Ok(())
}

async fn read_trimmed(path: &str) -> String {
    tokio::fs::read_to_string(path)
        .await
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

async fn capacity() -> Capacity {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    let meminfo = tokio::fs::read_to_string("/proc/meminfo")
        .await
        .unwrap_or_default();
    let memory_kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(4 * 1024 * 1024);
    Capacity {
        cpu_millis: cpus * 1000,
        memory_bytes: memory_kib * 1024,
        pods: 110,
    }
}
