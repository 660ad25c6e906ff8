# Shared settings and helpers for the local plane scripts. Sourced, not run.
# shellcheck shell=bash
E2E="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REPO="$(dirname "$E2E")"
BIN="$E2E/.cache/bin"
STATE="$E2E/.state"
PIDS="$STATE/pids"
LOGS="$STATE/logs"
PKI="$STATE/pki"
# shellcheck source=../versions.env
source "$E2E/versions.env"

# Network of the plane. Pods get addresses on the bridge; the host end is the gateway,
# where the API server and Pebble listen. No traffic leaves this machine.
BRIDGE=scbr0
GATEWAY=10.213.0.1
POD_CIDR=10.213.0.0/24
SERVICE_CIDR=10.214.0.0/24
API_PORT=6443
ETCD_CLIENT=127.0.0.1:2379
ETCD_PEER=127.0.0.1:2380
PEBBLE_PORT=14000
PEBBLE_MGMT_PORT=15000
PEBBLE_HTTP01_PORT=8089
# The ingress controller (Traefik, on the node's network): Pebble validates HTTP-01 on one
# port for every name, so its HTTP entrypoint is that port; HTTPS on 8443, ping on 8082.
INGRESS_HTTP_PORT=$PEBBLE_HTTP01_PORT
INGRESS_HTTPS_PORT=8443
INGRESS_PING_PORT=8082
INGRESS_NAMESPACE=sidecert-ingress
CHALLTESTSRV_DNS=127.0.0.1:8053
CHALLTESTSRV_MGMT=127.0.0.1:8055
KCM_PORT=10257
NODE_NAME=sidecert-local
# Process order: started in this order, stopped in reverse.
COMPONENTS=(etcd kube-apiserver kube-controller-manager pebble-challtestsrv pebble plane-dns webhook)

# Never fails: a teardown must go on when stderr is a closed pipe (Ctrl-C of `make test`).
say() { printf '==> %s\n' "$*" >&2 || true; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# A pid file holds "pid start-time boot-id": a pid is only ours while the same boot runs a
# process with that pid and that start time (field 22 of /proc/PID/stat), so a pid file left
# from an earlier boot, or whose pid was reused, never gets an unrelated process signalled.
BOOT_ID="$(cat /proc/sys/kernel/random/boot_id 2>/dev/null || true)"
start_time_of() { # pid -> its start time in clock ticks since boot, or nothing
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0
  # The command name (field 2) may hold spaces and parentheses: cut after the last ')'.
  stat="${stat##*) }"
  awk '{print $20}' <<<"$stat"
}
# The executable a process runs, as the kernel names it (symlinks resolved), or nothing.
exe_of() { readlink "/proc/$1/exe" 2>/dev/null || true; }
# Whether process $1 runs the binary at path $2 (compared with symlinks resolved).
runs_binary() { [[ -n "$(exe_of "$1")" && "$(exe_of "$1")" == "$(readlink -f "$2")" ]]; }
pid_record() { printf '%s %s %s\n' "$1" "$(start_time_of "$1")" "$BOOT_ID"; }
pid_of() {
  local p t b
  [[ -f "$PIDS/$1.pid" ]] || return 0
  read -r p t b <"$PIDS/$1.pid" || true
  [[ $p =~ ^[0-9]+$ ]] || return 0
  if [[ -z "$t" ]]; then
    # A pid file of an older checkout (the pid alone): ours only if it runs one of our
    # binaries (the tools under e2e/.cache, or this repository's builds).
    [[ "$(exe_of "$p")" == "$(readlink -f "$REPO")"/* ]] && echo "$p"
    return 0
  fi
  [[ "$b" == "$BOOT_ID" && "$(start_time_of "$p")" == "$t" ]] && echo "$p"
  return 0
}
alive() { local p; p="$(pid_of "$1")"; [[ -n "$p" ]] && kill -0 "$p" 2>/dev/null; }

# Stops one component by the pid it was started with: SIGTERM, then SIGKILL after $2 s. The
# pid file goes only once the process is gone, so an interrupted stop can be run again.
stop_component() {
  local name=$1 grace=${2:-10} p
  p="$(pid_of "$name")"
  if [[ -n "$p" ]] && kill -0 "$p" 2>/dev/null; then
    kill -TERM "$p" 2>/dev/null || true
    for _ in $(seq $((grace * 10))); do
      kill -0 "$p" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$p" 2>/dev/null; then
      say "$name (pid $p) did not stop in ${grace}s; killing it"
      kill -KILL "$p" 2>/dev/null || true
      for _ in $(seq 50); do
        kill -0 "$p" 2>/dev/null || break
        sleep 0.1
      done
    fi
  fi
  rm -f "$PIDS/$name.pid"
}

# Starts a component in its own session, output to its log, pid to its pid file.
start_component() { # name command...
  local name=$1; shift
  say "starting $name"
  setsid "$@" >>"$LOGS/$name.log" 2>&1 </dev/null &
  pid_record $! >"$PIDS/$name.pid"
}

# Polls a command every 0.2 s until it succeeds (0) or $2 seconds pass (1).
poll_until() { # seconds command...
  local secs=$1; shift
  for _ in $(seq $((secs * 5))); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  return 1
}

wait_until() { # what seconds command...
  local what=$1 secs=$2; shift 2
  poll_until "$secs" "$@" || die "$what did not become ready within ${secs}s; see $LOGS"
}

# Fails when something already listens on one of these host:port pairs.
require_free_ports() { # host:port...
  local hp
  for hp in "$@"; do
    if (exec 3<>"/dev/tcp/${hp%:*}/${hp#*:}") 2>/dev/null; then
      die "port $hp is already in use by another program; free it and retry: make cluster-up"
    fi
  done
}

kubectl_admin() { kubectl --kubeconfig "$STATE/kubeconfig" "$@"; }

# Whether a whole plane runs: its long-running processes and a ready API server.
plane_running() {
  local c
  for c in etcd kube-apiserver kube-controller-manager pebble-challtestsrv pebble registry containerd \
    kube-scheduler kubelet kube-proxy plane-dns; do
    alive "$c" || return 1
  done
  kubectl_admin get --raw /readyz >/dev/null 2>&1 || return 1
  # A plane of an older checkout (no ingress controller), or one whose Traefik is not ready,
  # is not reused: cluster-up takes it down and starts afresh.
  grep -q '^export INGRESS_IP=' "$STATE/env" 2>/dev/null || return 1
  [[ "$(kubectl_admin -n "$INGRESS_NAMESPACE" get deployment traefik -o jsonpath='{.status.readyReplicas}' 2>/dev/null)" == 1 ]]
}
