//! A container process: spawned inside the Pod's netns, its output appended to a log file,
//! stopped with SIGTERM then SIGKILL.

use std::{
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    time::Duration,
};

use nix::{sys::signal::Signal, unistd::Pid};
use tokio::{io::AsyncWriteExt, process::Child, time::Instant};
use tracing::{debug, warn};

use crate::{Error, Result};

/// Shell snippet run by `ip netns exec` when the Pod gets a ServiceAccount token: bind
/// mounts the token directory (`$0`) in the process's own mount namespace, then execs the
/// container's argv (`$@`).
const MOUNT_SA: &str = "mkdir -p /var/run/secrets/kubernetes.io/serviceaccount && \
     mount --bind \"$0\" /var/run/secrets/kubernetes.io/serviceaccount && exec \"$@\"";

/// The `ip` binary by absolute path: the container's env (and so its `PATH`) is the
/// process environment from the start.
fn ip_binary() -> &'static str {
    ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("ip")
}

/// Everything needed to start one container process.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    pub netns: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub serviceaccount_dir: Option<PathBuf>,
    pub log_path: PathBuf,
    pub cwd: PathBuf,
}

impl ProcessSpec {
    /// The full command line: `ip netns exec <ns> [sh -c <mount> <dir>] <argv...>`.
    pub fn command_line(&self) -> Vec<String> {
        let mut cmd = vec![
            ip_binary().into(),
            "netns".into(),
            "exec".into(),
            self.netns.clone(),
        ];
        if let Some(dir) = &self.serviceaccount_dir {
            cmd.extend([
                "/bin/sh".into(),
                "-c".into(),
                MOUNT_SA.into(),
                dir.display().to_string(),
            ]);
        }
        cmd.extend(self.argv.iter().cloned());
        cmd
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The exit code; `128 + signal` when killed by a signal, as container runtimes report.
    pub code: i32,
    pub signal: Option<i32>,
}

impl Exit {
    fn from_status(status: ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(code), _) => Self { code, signal: None },
            (None, Some(sig)) => Self {
                code: 128 + sig,
                signal: Some(sig),
            },
            (None, None) => Self {
                code: 1,
                signal: None,
            },
        }
    }

    /// The `reason` of a terminated container state.
    pub fn reason(&self) -> &'static str {
        if self.code == 0 { "Completed" } else { "Error" }
    }
}

/// A running container process (the leader of its own process group).
#[derive(Debug)]
pub struct Process {
    child: Child,
    pid: Option<i32>,
}

impl Process {
    pub async fn spawn(spec: &ProcessSpec) -> Result<Self> {
        Self::spawn_command_line(&spec.command_line(), spec).await
    }

    async fn spawn_command_line(cmdline: &[String], spec: &ProcessSpec) -> Result<Self> {
        let log = open_log(&spec.log_path).await?;
        let mut header = log.try_clone().await.map_err(|e| Error::io(&spec.log_path, e))?;
        let line = format!(
            "--- sidecert-localnode: starting {:?} at {}\n",
            spec.argv,
            k8s_openapi::jiff::Timestamp::now()
        );
        let _ = header.write_all(line.as_bytes()).await;
        let stdout = log.try_clone().await.map_err(|e| Error::io(&spec.log_path, e))?;
        let (program, args) = cmdline.split_first().ok_or_else(|| Error::Command {
            command: String::new(),
            reason: "empty command line".into(),
        })?;
        debug!(?cmdline, "spawning container process");
        let child = tokio::process::Command::new(program)
            .args(args)
            .env_clear()
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&spec.cwd)
            .stdin(Stdio::null())
            .stdout(stdout.into_std().await)
            .stderr(log.into_std().await)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Error::Command {
                command: cmdline.join(" "),
                reason: e.to_string(),
            })?;
        let pid = child.id().and_then(|p| i32::try_from(p).ok());
        Ok(Self { child, pid })
    }

    pub fn pid(&self) -> Option<i32> {
        self.pid
    }

    /// Waits for the process to end.
    pub async fn wait(&mut self) -> Exit {
        match self.child.wait().await {
            Ok(status) => Exit::from_status(status),
            Err(e) => {
                warn!(error = %e, "waiting for container process failed");
                Exit {
                    code: 1,
                    signal: None,
                }
            }
        }
    }

    /// SIGTERM to the process group, SIGKILL at `deadline` if it is still running.
    pub async fn terminate(&mut self, deadline: Instant) -> Exit {
        self.signal(Signal::SIGTERM);
        match tokio::time::timeout_at(deadline, self.child.wait()).await {
            Ok(Ok(status)) => Exit::from_status(status),
            _ => {
                self.signal(Signal::SIGKILL);
                let _ = self.child.start_kill();
                match tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await {
                    Ok(Ok(status)) => Exit::from_status(status),
                    _ => Exit {
                        code: 137,
                        signal: Some(9),
                    },
                }
            }
        }
    }

    fn signal(&self, sig: Signal) {
        if let Some(pid) = self.pid {
            // The process group first (children of the container); then the process.
            let _ = nix::sys::signal::killpg(Pid::from_raw(pid), sig);
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), sig);
        }
    }
}

async fn open_log(path: &Path) -> Result<tokio::fs::File> {
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| Error::io(dir, e))?;
    }
    tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await
        .map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn spec(sa: Option<&str>) -> ProcessSpec {
        ProcessSpec {
            netns: "sc-abc".into(),
            argv: vec!["/bin/app".into(), "--x".into()],
            env: vec![],
            serviceaccount_dir: sa.map(PathBuf::from),
            log_path: PathBuf::from("/tmp/x.log"),
            cwd: PathBuf::from("/"),
        }
    }

    #[test]
    fn command_line_without_token() {
        let cmd = spec(None).command_line();
        assert!(cmd[0].ends_with("ip"));
        assert_eq!(&cmd[1..], ["netns", "exec", "sc-abc", "/bin/app", "--x"]);
    }

    #[test]
    fn command_line_with_token_mount() {
        let cmd = spec(Some("/state/sa")).command_line();
        assert_eq!(&cmd[1..6], ["netns", "exec", "sc-abc", "/bin/sh", "-c"]);
        assert!(cmd[6].contains("mount --bind \"$0\" /var/run/secrets/kubernetes.io/serviceaccount"));
        assert_eq!(&cmd[7..], ["/state/sa", "/bin/app", "--x"]);
    }

    #[tokio::test]
    async fn logs_and_terminates_a_process_group() {
        let dir = std::env::temp_dir().join(format!("sidecert-e2e-proc-{}", std::process::id()));
        let log = dir.join("c.log");
        let spec = ProcessSpec {
            netns: String::new(),
            argv: vec![],
            env: vec![
                ("PATH".into(), "/usr/bin:/bin".into()),
                ("GREETING".into(), "hello".into()),
            ],
            serviceaccount_dir: None,
            log_path: log.clone(),
            cwd: std::env::temp_dir(),
        };
        let cmd = ["sh", "-c", "echo $GREETING; echo oops >&2; exec sleep 30"].map(String::from);
        let mut p = Process::spawn_command_line(&cmd, &spec).await.unwrap();
        assert!(p.pid().is_some());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let exit = p.terminate(Instant::now() + Duration::from_secs(5)).await;
        assert_eq!(
            exit,
            Exit {
                code: 143,
                signal: Some(15)
            }
        );
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("hello\n") && text.contains("oops\n"), "{text}");

        let cmd = ["sh", "-c", "exit 3"].map(String::from);
        let mut p = Process::spawn_command_line(&cmd, &spec).await.unwrap();
        assert_eq!(
            p.wait().await,
            Exit {
                code: 3,
                signal: None
            }
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
