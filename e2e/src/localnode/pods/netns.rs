//! A Pod's network: a netns attached to the bridge by a veth pair, driven with `ip`.

use std::net::Ipv4Addr;

use tokio::process::Command;
use tracing::{debug, info, warn};

use crate::{Error, Result};

/// Prefix of every netns the stand-in creates (`sc-<id>`).
pub const NETNS_PREFIX: &str = "sc-";
/// Prefix of the host side of every veth the stand-in creates (`scv<id>`).
pub const VETH_PREFIX: &str = "scv";
const PEER_PREFIX: &str = "scp";

/// Names and address of one Pod's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetwork {
    pub netns: String,
    pub host_veth: String,
    peer_veth: String,
    pub ip: Ipv4Addr,
}

impl PodNetwork {
    /// Names derived from the Pod's UID: interface names stay within Linux' 15 bytes.
    pub fn for_uid(uid: &str, ip: Ipv4Addr) -> Self {
        let id: String = uid
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .map(|c| c.to_ascii_lowercase())
            .take(10)
            .collect();
        Self {
            netns: format!("{NETNS_PREFIX}{id}"),
            host_veth: format!("{VETH_PREFIX}{id}"),
            peer_veth: format!("{PEER_PREFIX}{id}"),
            ip,
        }
    }

    /// Creates the netns and the veth pair, addresses `eth0` inside and routes via the
    /// gateway. On failure, removes what it made.
    pub async fn setup(&self, bridge: &str, gateway: Ipv4Addr, prefix_len: u8) -> Result<()> {
        // Leftovers with the same names (a crash mid-setup) would make `add` fail.
        self.teardown().await;
        let ns = self.netns.as_str();
        let addr = format!("{}/{prefix_len}", self.ip);
        let gw = gateway.to_string();
        let steps: [&[&str]; 9] = [
            &["netns", "add", ns],
            &[
                "link",
                "add",
                &self.host_veth,
                "type",
                "veth",
                "peer",
                "name",
                &self.peer_veth,
                "netns",
                ns,
            ],
            &["link", "set", &self.host_veth, "master", bridge],
            &["link", "set", &self.host_veth, "up"],
            &["-n", ns, "link", "set", &self.peer_veth, "name", "eth0"],
            &["-n", ns, "addr", "add", &addr, "dev", "eth0"],
            &["-n", ns, "link", "set", "eth0", "up"],
            &["-n", ns, "link", "set", "lo", "up"],
            &["-n", ns, "route", "add", "default", "via", &gw],
        ];
        for args in steps {
            if let Err(e) = ip(args).await {
                self.teardown().await;
                return Err(e);
            }
        }
        info!(netns = ns, ip = %self.ip, veth = self.host_veth, "pod network up");
        Ok(())
    }

    /// Removes the veth pair and the netns; missing ones are fine.
    pub async fn teardown(&self) {
        let _ = ip(&["link", "del", &self.host_veth]).await;
        let _ = ip(&["netns", "del", &self.netns]).await;
    }
}

/// Removes every netns and host veth with the stand-in's prefixes (left by a crashed run).
pub async fn cleanup_leftovers() {
    match ip_output(&["netns", "list"]).await {
        Ok(out) => {
            for ns in leftover_netns(&out) {
                info!(netns = ns, "removing leftover netns");
                if let Err(e) = ip(&["netns", "del", ns]).await {
                    warn!(netns = ns, error = %e, "could not remove leftover netns");
                }
            }
        }
        Err(e) => warn!(error = %e, "could not list netns"),
    }
    match ip_output(&["-o", "link", "show"]).await {
        Ok(out) => {
            for link in leftover_links(&out) {
                info!(link, "removing leftover veth");
                let _ = ip(&["link", "del", link]).await;
            }
        }
        Err(e) => warn!(error = %e, "could not list links"),
    }
}

/// Netns names with our prefix in `ip netns list` output (`name (id: 3)` lines).
fn leftover_netns(list: &str) -> Vec<&str> {
    list.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(NETNS_PREFIX))
        .collect()
}

/// Host veth names with our prefix in `ip -o link show` output (`7: scvab@if2: <...>`).
fn leftover_links(list: &str) -> Vec<&str> {
    list.lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or_default())
        .filter(|n| n.starts_with(VETH_PREFIX))
        .collect()
}

async fn ip(args: &[&str]) -> Result<()> {
    ip_output(args).await.map(drop)
}

async fn ip_output(args: &[&str]) -> Result<String> {
    let command = format!("ip {}", args.join(" "));
    debug!(command, "running");
    let out = Command::new("ip")
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| Error::Command {
            command: command.clone(),
            reason: e.to_string(),
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Command {
            command,
            reason: format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::path::Path;

    use super::*;

    #[test]
    fn names_fit_in_ifnamsiz() {
        let n = PodNetwork::for_uid(
            "3f1c9a2e-77b0-4c1d-9e2f-0123456789ab",
            Ipv4Addr::new(10, 213, 0, 10),
        );
        assert_eq!(n.netns, "sc-3f1c9a2e77");
        assert_eq!(n.host_veth, "scv3f1c9a2e77");
        assert!(n.host_veth.len() <= 15 && n.peer_veth.len() <= 15);
    }

    #[test]
    fn finds_leftovers() {
        let ns = "sc-abc (id: 3)\nother\nsc-def\n";
        assert_eq!(leftover_netns(ns), ["sc-abc", "sc-def"]);
        let links = "1: lo: <LOOPBACK,UP> mtu 65536\n5: scbr0: <BROADCAST> mtu 1500\n\
                     7: scvabc@if2: <BROADCAST> mtu 1500\n";
        assert_eq!(leftover_links(links), ["scvabc"]);
    }

    /// Needs root and `ip`: run with `cargo test -p sidecert-e2e --lib -- --ignored netns`.
    #[tokio::test]
    #[ignore = "needs root; creates a bridge, a netns and a veth"]
    async fn netns_setup_reaches_the_gateway_and_tears_down() {
        let bridge = "sctest0";
        let gw = Ipv4Addr::new(10, 219, 0, 1);
        let _ = ip(&["link", "del", bridge]).await;
        ip(&["link", "add", bridge, "type", "bridge"]).await.unwrap();
        ip(&["addr", "add", "10.219.0.1/24", "dev", bridge])
            .await
            .unwrap();
        ip(&["link", "set", bridge, "up"]).await.unwrap();
        let net = PodNetwork::for_uid("test0000-1111", Ipv4Addr::new(10, 219, 0, 10));
        let result = net.setup(bridge, gw, 24).await;
        let listener = tokio::net::TcpListener::bind((gw, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accept = tokio::spawn(async move { listener.accept().await.map(|(_, peer)| peer) });
        let connect = tokio::process::Command::new("ip")
            .args(["netns", "exec", &net.netns, "bash", "-c"])
            .arg(format!("echo > /dev/tcp/10.219.0.1/{port}"))
            .output()
            .await;
        let peer = tokio::time::timeout(std::time::Duration::from_secs(5), accept).await;
        // A container process in the netns sees the token directory at the usual path.
        let dir = std::env::temp_dir().join(format!("sidecert-netns-test-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sa")).unwrap();
        std::fs::write(dir.join("sa/namespace"), "shop").unwrap();
        let spec = super::super::process::ProcessSpec {
            netns: net.netns.clone(),
            argv: ["/bin/sh", "-c", "cat /var/run/secrets/kubernetes.io/serviceaccount/namespace; echo \" $X\"; ip -4 -o addr show eth0"]
                .map(String::from)
                .to_vec(),
            env: vec![("X".into(), "from-env".into())],
            serviceaccount_dir: Some(dir.join("sa")),
            log_path: dir.join("c.log"),
            cwd: dir.clone(),
        };
        let mut process = super::super::process::Process::spawn(&spec).await.unwrap();
        let exit = process.wait().await;
        let log = std::fs::read_to_string(dir.join("c.log")).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&dir);
        net.teardown().await;
        let list = ip_output(&["netns", "list"]).await.unwrap();
        let links = ip_output(&["-o", "link", "show"]).await.unwrap();
        let _ = ip(&["link", "del", bridge]).await;
        result.unwrap();
        assert!(
            connect.unwrap().status.success(),
            "connect from the netns to the gateway"
        );
        assert_eq!(exit.code, 0, "{log}");
        assert!(
            log.contains("shop from-env") && log.contains("10.219.0.10/24"),
            "{log}"
        );
        assert!(!Path::new("/var/run/secrets/kubernetes.io/serviceaccount/namespace").exists());
        let peer = peer.unwrap().unwrap().unwrap();
        assert_eq!(peer.ip(), std::net::IpAddr::V4(Ipv4Addr::new(10, 219, 0, 10)));
        assert!(!list.contains(&net.netns));
        assert!(!links.contains(&net.host_veth));
    }
}
