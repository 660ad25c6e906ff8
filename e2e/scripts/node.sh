#!/usr/bin/env bash
# The plane's real node: a local OCI registry, containerd + runc + CNI (bridge, host-local),
# kube-scheduler, kube-proxy (nftables) and the kubelet, all pinned in e2e/versions.env and
# built by make tools.
#
#   e2e/scripts/node.sh up      (after the API server; cluster-up.sh calls it)
#   e2e/scripts/node.sh down    (cluster-down.sh calls it; also cleans up after a kill -9)
#
# Everything lives under e2e/.state/node and is removed again by `down`: processes (by the
# pids recorded here, and the shims' own pid files), mounts under the state folder, the Pod
# network namespaces (kept under containerd's state folder), the kubepods cgroups, the
# kube-proxy nftables tables, and the sysctls the kubelet and the bridge plugin change
# (saved once, before the first change, and restored).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

NODE="$STATE/node"
CD="$NODE/containerd"
CD_SOCK="$CD/containerd.sock"
CNI_BIN="$E2E/.cache/cni/bin"
REGISTRY_ADDR=127.0.0.1:5000
# The sysctls something here may change: the kubelet (protectKernelDefaults: false) sets
# the first three, the bridge plugin (isGateway) turns on forwarding.
SYSCTLS=(vm.overcommit_memory kernel.panic kernel.panic_on_oops net.ipv4.ip_forward net.bridge.bridge-nf-call-iptables)
# Registries the Pods' images name; containerd pulls each from the local registry instead.
MIRRORED=(ghcr.io docker.io registry.k8s.io sidecert.test)
PAUSE_IMAGE=registry.k8s.io/pause:3.10.1
CGROUP_ROOT=sidecert-node

ctr_() { "$BIN/ctr" --address "$CD_SOCK" -n k8s.io "$@"; }

start() { start_component "$@"; }

save_sysctls() {
  # Saved once: after a crash the file holds the values from before the plane, not ours.
  [[ -f "$NODE/sysctls.saved" ]] && return 0
  mkdir -p "$NODE"
  for k in "${SYSCTLS[@]}"; do
    local f="/proc/sys/${k//.//}"
    [[ -f $f ]] && printf '%s=%s\n' "$k" "$(cat "$f")"
  done >"$NODE/sysctls.saved.tmp"
  mv "$NODE/sysctls.saved.tmp" "$NODE/sysctls.saved"
}

restore_sysctls() {
  [[ -f "$NODE/sysctls.saved" ]] || return 0
  while IFS='=' read -r k v; do
    local f="/proc/sys/${k//.//}"
    [[ -f $f && "$(cat "$f")" != "$v" ]] && { echo "$v" >"$f" || say "could not restore $k=$v"; }
  done <"$NODE/sysctls.saved"
  rm -f "$NODE/sysctls.saved"
}

kubeconfig_for() { # name cert
  cat >"$NODE/$1.kubeconfig" <<KCFG
apiVersion: v1
kind: Config
clusters:
- name: sidecert-local
  cluster:
    server: https://$GATEWAY:$API_PORT
    certificate-authority: $PKI/ca.crt
users:
- name: $1
  user:
    client-certificate: $PKI/$2.crt
    client-key: $PKI/$2.key
contexts:
- name: $1
  context: {cluster: sidecert-local, user: $1}
current-context: $1
KCFG
  chmod 600 "$NODE/$1.kubeconfig"
}

write_configs() {
  mkdir -p "$CD" "$NODE/cni/net.d" "$NODE/kubelet" "$NODE/pod-logs"
  for host in "${MIRRORED[@]}"; do
    mkdir -p "$CD/certs.d/$host"
    # server: where a pull goes if no mirror answers; the local registry too, so no pull
    # ever leaves this machine.
    cat >"$CD/certs.d/$host/hosts.toml" <<HOSTS
server = "http://$REGISTRY_ADDR"
[host."http://$REGISTRY_ADDR"]
  capabilities = ["pull", "resolve"]
HOSTS
  done
  cat >"$CD/config.toml" <<TOML
version = 3
root = "$CD/root"
state = "$CD/state"
disabled_plugins = ["io.containerd.nri.v1.nri", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "$CD_SOCK"
[ttrpc]
  address = "$CD_SOCK.ttrpc"
[debug]
  address = "$CD/debug.sock"
[plugins]
  [plugins.'io.containerd.internal.v1.opt']
    path = "$CD/opt"
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = "overlayfs"
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = "$PAUSE_IMAGE"
    [plugins.'io.containerd.cri.v1.images'.registry]
      config_path = "$CD/certs.d"
  [plugins.'io.containerd.cri.v1.runtime']
    # Root here lacks CAP_SYS_RESOURCE: the CRI's oom_score_adj of -998 for the sandbox
    # fails in runc init ("can't get final child's PID from pipe: EOF").
    restrict_oom_score_adj = true
    disable_apparmor = true
    # Pod network namespaces under containerd's state folder, not /run/netns.
    netns_mounts_under_state_dir = true
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = "runc"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
          BinaryName = "$BIN/runc"
          Root = "$CD/runc"
          SystemdCgroup = false
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = ["$CNI_BIN"]
      conf_dir = "$NODE/cni/net.d"
  [plugins.'io.containerd.grpc.v1.cri']
    # kubectl logs/exec: API server -> kubelet -> this streaming server.
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
TOML
  cat >"$NODE/cni/net.d/10-sidecert.conflist" <<CNI
{
  "cniVersion": "1.0.0",
  "name": "sidecert",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$NODE/cni/ipam",
        "ranges": [[{"subnet": "$POD_CIDR", "rangeStart": "${GATEWAY%.*}.10", "rangeEnd": "${GATEWAY%.*}.250", "gateway": "$GATEWAY"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "loopback"}
  ]
}
CNI
  cat >"$NODE/kubelet.yaml" <<KUBELET
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This machine has cgroup v1; kubelets from 1.35 on refuse it unless told.
failCgroupV1: false
cgroupDriver: cgroupfs
# Its own parent in every hierarchy, so down removes exactly what the node made.
cgroupRoot: /$CGROUP_ROOT
containerRuntimeEndpoint: unix://$CD_SOCK
failSwapOn: false
makeIPTablesUtilChains: false
# true: the kubelet exits on vm.overcommit_memory, kernel.panic, kernel.panic_on_oops;
# false: it sets them (saved before and restored by node.sh down).
protectKernelDefaults: false
address: $GATEWAY
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
tlsCertFile: $PKI/kubelet.crt
tlsPrivateKeyFile: $PKI/kubelet.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: AlwaysAllow}
podLogsDir: $NODE/pod-logs
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
# Secret volumes refresh within ~10 s of a change (the default, 1 min, is slow for tests).
syncFrequency: 10s
serializeImagePulls: false
maxPods: 200
resolvConf: /etc/resolv.conf
KUBELET
  kubeconfig_for kubelet kubelet-client
  kubeconfig_for scheduler scheduler
  kubeconfig_for kube-proxy kube-proxy
}

# ---- images ------------------------------------------------------------------------------
push_images() {
  local crane="$BIN/crane"
  "$E2E/scripts/images.sh"
  for name in webhook sidecar app; do
    local ref repo
    ref=$(cut -d@ -f1 "$E2E/.cache/images/$name.ref")
    repo=${ref#*/}
    say "pushing $ref to the local registry"
    rm -rf "$NODE/push" && mkdir -p "$NODE/push"
    tar -xf "$E2E/.cache/images/$name.tar" -C "$NODE/push"
    "$crane" push --insecure "$NODE/push" "$REGISTRY_ADDR/$repo" >/dev/null 2>>"$LOGS/crane.log"
  done
  # examples/ and the scenarios name the test app example/app:1.0 (docker.io, mirrored here).
  "$crane" copy --insecure "$REGISTRY_ADDR/app:1.0" "$REGISTRY_ADDR/example/app:1.0" 2>/dev/null
  # The sandbox image: Kubernetes' pause, built from its source by make tools.
  local rootfs="$NODE/pause.rootfs"
  rm -rf "$rootfs" && mkdir -p "$rootfs"
  install -m 0755 "$BIN/pause" "$rootfs/pause"
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf "$NODE/pause.tar" -C "$rootfs" .
  "$crane" append --insecure --oci-empty-base -f "$NODE/pause.tar" -t "$REGISTRY_ADDR/pause:tmp" >/dev/null 2>>"$LOGS/crane.log"
  "$crane" mutate --insecure "$REGISTRY_ADDR/pause:tmp" --entrypoint /pause -t "$REGISTRY_ADDR/${PAUSE_IMAGE#*/}" >/dev/null 2>>"$LOGS/crane.log"
  rm -rf "$NODE/push" "$rootfs" "$NODE/pause.tar"
}

up() {
  for tool in kubelet kube-scheduler kube-proxy containerd containerd-shim-runc-v2 ctr runc registry crane pause; do
    [[ -x "$BIN/$tool" ]] || die "$BIN/$tool is missing; build it with: make tools"
  done
  command -v nft >/dev/null || die "nft is missing (Debian's nftables): run make tools"
  mkdir -p "$NODE" "$PIDS" "$LOGS"
  save_sysctls
  [[ -e /run/containerd ]] || touch "$NODE/made-run-containerd"
  write_configs

  cat >"$NODE/registry.yaml" <<REG
version: 0.1
log: {level: warn}
storage:
  filesystem: {rootdirectory: $NODE/registry}
  delete: {enabled: true}
http:
  addr: $REGISTRY_ADDR
REG
  OTEL_TRACES_EXPORTER=none start registry "$BIN/registry" serve "$NODE/registry.yaml"
  wait_until registry 20 curl -sf "http://$REGISTRY_ADDR/v2/"
  push_images

  PATH="$BIN:$PATH" start containerd "$BIN/containerd" --config "$CD/config.toml"
  wait_until containerd 30 ctr_ version

  start kube-scheduler "$BIN/kube-scheduler" --kubeconfig "$NODE/scheduler.kubeconfig" \
    --authentication-kubeconfig "$NODE/scheduler.kubeconfig" --authorization-kubeconfig "$NODE/scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port 10259 --leader-elect=false
  # nftables: its rules are two tables of its own, removed whole by `down`. --masquerade-all:
  # a Pod reaching a Service backed by a Pod on the same bridge gets the answer back
  # through the host, where the translation is undone.
  start kube-proxy "$BIN/kube-proxy" --kubeconfig "$NODE/kube-proxy.kubeconfig" \
    --proxy-mode nftables --masquerade-all --cluster-cidr "$POD_CIDR" --hostname-override "$NODE_NAME" \
    --metrics-bind-address 127.0.0.1:10249 --healthz-bind-address 127.0.0.1:10256 \
    --conntrack-max-per-core 0 --conntrack-tcp-timeout-established 0 --conntrack-tcp-timeout-close-wait 0
  for h in /sys/fs/cgroup/*/; do
    [[ -L ${h%/} || ${h%/} == /sys/fs/cgroup/unified ]] && continue
    mkdir -p "$h$CGROUP_ROOT"
  done
  start kubelet "$BIN/kubelet" --config "$NODE/kubelet.yaml" --kubeconfig "$NODE/kubelet.kubeconfig" \
    --hostname-override "$NODE_NAME" --node-ip "$GATEWAY" --root-dir "$NODE/kubelet" --cert-dir "$NODE/kubelet-pki"
}

# ---- down --------------------------------------------------------------------------------
kill_pidfile() { # file
  local p
  p=$(cat "$1" 2>/dev/null || true)
  [[ $p =~ ^[0-9]+$ ]] && kill -KILL "$p" 2>/dev/null || true
}

down() {
  [[ -d $NODE ]] || return 0
  say "stopping the node (kubelet, containers, containerd, kube-proxy, kube-scheduler, registry)"
  stop_component kubelet 30
  # Every container's task through containerd (its shim then exits and removes its socket);
  # a containerd that died is started once more on the same state for this.
  if [[ -S $CD_SOCK ]] && ! alive containerd && [[ -x "$BIN/containerd" ]]; then
    PATH="$BIN:$PATH" start containerd "$BIN/containerd" --config "$CD/config.toml"
    wait_until "containerd (for cleanup)" 30 ctr_ version || true
  fi
  if alive containerd; then
    say "removing the node's containers"
    # delete -f kills the task and waits for it; the shim then exits and removes its socket.
    for c in $(ctr_ containers ls -q 2>/dev/null); do
      ctr_ tasks delete -f "$c" >/dev/null 2>&1 || true
      ctr_ containers delete "$c" >/dev/null 2>&1 || true
    done
  fi
  stop_component containerd 20
  # Safety net: processes whose pid files containerd's shims left.
  if [[ -d "$CD/state" ]]; then
    while IFS= read -r -d '' f; do kill_pidfile "$f"; done < <(find "$CD/state" -name init.pid -print0)
    while IFS= read -r -d '' f; do kill_pidfile "$f"; done < <(find "$CD/state" -name shim.pid -print0)
  fi
  stop_component kube-proxy 10
  for family in ip ip6; do nft delete table "$family" kube-proxy 2>/dev/null || true; done
  stop_component kube-scheduler 10
  stop_component registry 10
  # Mounts under the state folder (the kubelet's root-dir bind, Secret tmpfs, overlay
  # rootfs, shm, network namespaces), deepest first.
  local m
  for _ in 1 2 3; do
    m=$(awk -v p="$NODE/" 'index($5, p) == 1 || $5 == substr(p, 1, length(p) - 1) {print $5}' /proc/self/mountinfo | sort -r)
    [[ -z $m ]] && break
    while IFS= read -r path; do umount -l "$path" 2>/dev/null || true; done <<<"$m"
  done
  # The kubelet's cgroups (cgroupfs driver: under the node's root in every hierarchy),
  # leaves first.
  for h in /sys/fs/cgroup/*/; do
    [[ -d "$h$CGROUP_ROOT" ]] || continue
    find "$h$CGROUP_ROOT" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
  restore_sysctls
  # The shims' sockets are under /run/containerd/s whatever the configuration says: remove
  # the folders if this node made them (and they are empty).
  if [[ -f "$NODE/made-run-containerd" ]]; then
    rmdir /run/containerd/s /run/containerd 2>/dev/null || true
  fi
  rm -rf "$NODE"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) die "usage: $0 up|down" ;;
esac
