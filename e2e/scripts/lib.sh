# Shared settings and helpers for the local plane scripts. Sourced, not run.
# shellcheck shell=bash
E2E="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REPO="$(dirname "$E2E")"
BIN="$E2E/.cache/bin"
STATE="$E2E/.state"
PIDS="$STATE/pids"
LOGS="$STATE/logs"
PKI="$STATE/pki"

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
CHALLTESTSRV_DNS=127.0.0.1:8053
CHALLTESTSRV_MGMT=127.0.0.1:8055
KCM_PORT=10257
NODE_NAME=sidecert-local
# Process order: started in this order, stopped in reverse.
COMPONENTS=(etcd kube-apiserver kube-controller-manager pebble-challtestsrv pebble localnode webhook)

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

pid_of() { cat "$PIDS/$1.pid" 2>/dev/null || true; }
alive() { local p; p="$(pid_of "$1")"; [[ -n "$p" ]] && kill -0 "$p" 2>/dev/null; }

# Stops one component by the pid it was started with: SIGTERM, then SIGKILL after $2 s.
stop_component() {
  local name=$1 grace=${2:-10} p
  p="$(pid_of "$name")"
  rm -f "$PIDS/$name.pid"
  [[ -n "$p" ]] && kill -0 "$p" 2>/dev/null || return 0
  kill -TERM "$p" 2>/dev/null || true
  for _ in $(seq $((grace * 10))); do
    kill -0 "$p" 2>/dev/null || return 0
    sleep 0.1
  done
  say "$name (pid $p) did not stop in ${grace}s; killing it"
  kill -KILL "$p" 2>/dev/null || true
}

# Starts a component in its own session, output to its log, pid to its pid file.
start_component() { # name command...
  local name=$1; shift
  say "starting $name"
  setsid "$@" >>"$LOGS/$name.log" 2>&1 </dev/null &
  echo $! >"$PIDS/$name.pid"
}

wait_until() { # what seconds command...
  local what=$1 secs=$2; shift 2
  for _ in $(seq $((secs * 5))); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  die "$what did not become ready within ${secs}s; see $LOGS"
}

kubectl_admin() { kubectl --kubeconfig "$STATE/kubeconfig" "$@"; }
