//! Probes: what to check (from the Pod spec), how to check it, and the threshold counting.
//!
//! `httpGet` (HTTP or HTTPS, certificates not verified, as the kubelet does) and `tcpSocket`
//! are checked against the Pod IP; `grpc` is checked as a TCP connect; `exec` probes are
//! treated as passing (there is no container filesystem to run them in).

use std::{net::Ipv4Addr, time::Duration};

use k8s_openapi::{
    api::core::v1::{Container, Probe},
    apimachinery::pkg::util::intstr::IntOrString,
};

/// A concrete check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    Http {
        https: bool,
        port: u16,
        path: String,
        headers: Vec<(String, String)>,
    },
    Tcp {
        port: u16,
    },
    /// `exec` probes (and probes with no handler): always pass.
    Pass,
}

/// Timing and thresholds of a probe, defaults filled in as the API server would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

impl Timing {
    pub fn of(probe: &Probe) -> Self {
        let secs = |v: Option<i32>, default: u64, min: u64| {
            Duration::from_secs(v.and_then(|v| u64::try_from(v).ok()).unwrap_or(default).max(min))
        };
        let count =
            |v: Option<i32>, default: u32| v.and_then(|v| u32::try_from(v).ok()).unwrap_or(default).max(1);
        Self {
            initial_delay: secs(probe.initial_delay_seconds, 0, 0),
            period: secs(probe.period_seconds, 10, 1),
            timeout: secs(probe.timeout_seconds, 1, 1),
            success_threshold: count(probe.success_threshold, 1),
            failure_threshold: count(probe.failure_threshold, 3),
        }
    }
}

/// Turns a probe of `container` into a [`Check`]; named ports are looked up in the
/// container's ports.
pub fn check_of(probe: &Probe, container: &Container) -> Result<Check, String> {
    if let Some(http) = &probe.http_get {
        let https = http
            .scheme
            .as_deref()
            .is_some_and(|s| s.eq_ignore_ascii_case("https"));
        let mut path = http.path.clone().unwrap_or_else(|| "/".into());
        if !path.starts_with('/') {
            path.insert(0, '/');
        }
        let headers = http
            .http_headers
            .iter()
            .flatten()
            .map(|h| (h.name.clone(), h.value.clone()))
            .collect();
        return Ok(Check::Http {
            https,
            port: resolve_port(&http.port, container)?,
            path,
            headers,
        });
    }
    if let Some(tcp) = &probe.tcp_socket {
        return Ok(Check::Tcp {
            port: resolve_port(&tcp.port, container)?,
        });
    }
    if let Some(grpc) = &probe.grpc {
        return u16::try_from(grpc.port)
            .map(|port| Check::Tcp { port })
            .map_err(|_| format!("invalid grpc port {}", grpc.port));
    }
    Ok(Check::Pass)
}

fn resolve_port(port: &IntOrString, container: &Container) -> Result<u16, String> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p).map_err(|_| format!("invalid port {p}")),
        IntOrString::String(name) => {
            if let Ok(p) = name.parse::<u16>() {
                return Ok(p);
            }
            container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok())
                .ok_or_else(|| format!("named port {name:?} not found in container {:?}", container.name))
        }
    }
}

/// Runs one check against the Pod IP; `true` on success.
pub async fn run(check: &Check, ip: Ipv4Addr, timeout: Duration, http: &reqwest::Client) -> bool {
    match check {
        Check::Pass => true,
        Check::Tcp { port } => matches!(
            tokio::time::timeout(timeout, tokio::net::TcpStream::connect((ip, *port))).await,
            Ok(Ok(_))
        ),
        Check::Http {
            https,
            port,
            path,
            headers,
        } => {
            let scheme = if *https { "https" } else { "http" };
            let mut req = http.get(format!("{scheme}://{ip}:{port}{path}")).timeout(timeout);
            for (k, v) in headers {
                req = req.header(k, v);
            }
            match req.send().await {
                Ok(rsp) => (200..400).contains(&rsp.status().as_u16()),
                Err(_) => false,
            }
        }
    }
}

/// Consecutive-result counting: flips to success after `success_threshold` successes in a
/// row and to failure after `failure_threshold` failures in a row.
#[derive(Debug, Clone)]
pub struct Tracker {
    timing: Timing,
    result: bool,
    successes: u32,
    failures: u32,
}

impl Tracker {
    pub fn new(timing: Timing, initial: bool) -> Self {
        Self {
            timing,
            result: initial,
            successes: 0,
            failures: 0,
        }
    }

    /// Records one check; returns the (possibly unchanged) result.
    pub fn record(&mut self, ok: bool) -> bool {
        if ok {
            self.successes += 1;
            self.failures = 0;
            if self.successes >= self.timing.success_threshold {
                self.result = true;
            }
        } else {
            self.failures += 1;
            self.successes = 0;
            if self.failures >= self.timing.failure_threshold {
                self.result = false;
            }
        }
        self.result
    }

    pub fn result(&self) -> bool {
        self.result
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use k8s_openapi::api::core::v1::{ContainerPort, ExecAction, HTTPGetAction, TCPSocketAction};

    use super::*;

    fn container() -> Container {
        Container {
            name: "app".into(),
            ports: Some(vec![ContainerPort {
                name: Some("http".into()),
                container_port: 8080,
                ..Default::default()
            }]),
            ..Default::default()
        }
    }

    #[test]
    fn http_probe_with_named_port() {
        let probe = Probe {
            http_get: Some(HTTPGetAction {
                port: IntOrString::String("http".into()),
                path: Some("healthz".into()),
                scheme: Some("HTTPS".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            check_of(&probe, &container()),
            Ok(Check::Http {
                https: true,
                port: 8080,
                path: "/healthz".into(),
                headers: vec![]
            })
        );
    }

    #[test]
    fn tcp_exec_and_missing_port() {
        let tcp = Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(9000),
                host: None,
            }),
            ..Default::default()
        };
        assert_eq!(check_of(&tcp, &container()), Ok(Check::Tcp { port: 9000 }));
        let exec = Probe {
            exec: Some(ExecAction { command: None }),
            ..Default::default()
        };
        assert_eq!(check_of(&exec, &container()), Ok(Check::Pass));
        let missing = Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::String("nope".into()),
                host: None,
            }),
            ..Default::default()
        };
        assert!(check_of(&missing, &container()).is_err());
    }

    #[test]
    fn timing_defaults() {
        let t = Timing::of(&Probe::default());
        assert_eq!(t.period, Duration::from_secs(10));
        assert_eq!(t.timeout, Duration::from_secs(1));
        assert_eq!((t.success_threshold, t.failure_threshold), (1, 3));
    }

    #[test]
    fn thresholds() {
        let timing = Timing {
            success_threshold: 2,
            failure_threshold: 3,
            ..Timing::of(&Probe::default())
        };
        let mut t = Tracker::new(timing, false);
        assert!(!t.record(true));
        assert!(t.record(true));
        assert!(t.record(false));
        assert!(t.record(false));
        assert!(!t.record(false));
        assert!(!t.record(true));
        assert!(t.record(true));
    }

    #[tokio::test]
    async fn tcp_and_http_checks_against_a_local_listener() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let ok = String::from_utf8_lossy(&buf[..n]).starts_with("GET /ok ");
                let status = if ok { "200 OK" } else { "500 Internal Server Error" };
                let _ = s
                    .write_all(
                        format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                            .as_bytes(),
                    )
                    .await;
            }
        });
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let ip = Ipv4Addr::LOCALHOST;
        let t = Duration::from_secs(2);
        assert!(run(&Check::Tcp { port }, ip, t, &http).await);
        let get = |path: &str| Check::Http {
            https: false,
            port,
            path: path.into(),
            headers: vec![],
        };
        assert!(run(&get("/ok"), ip, t, &http).await);
        assert!(!run(&get("/bad"), ip, t, &http).await);
    }
}
