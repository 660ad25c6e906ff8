#!/usr/bin/env bash
# The plane's real node: a local OCI registry, containerd + runc + CNI (bridge, host-local),
# kube-scheduler, kube-proxy (nftables) and the kubelet, all pinned in e2e/versions.env and
# built by make tools.
#
#   e2e/scripts/node.sh up      (after the API server; cluster-up.sh calls it)
#   e2e/scripts/node.sh push    (a reused plane: this checkout's images and chart)
#   e2e/scripts/node.sh down    (cluster-down.sh calls it; also cleans up after a kill -9)
#
# Everything lives under e2e/.state/node and is removed again by `down`: processes (by the
# pids recorded here, and the shims' own pid files), mounts under the state folder, the Pod
# network namespaces (kept under containerd's state folder), the kubepods cgroups, the
# kube-proxy nftables tables, and the sysctls the kubelet and the bridge plugin change
# (saved once, before the first change, and restored).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Physical path: mountinfo lists mount points with symlinks resolved.
NODE="$(mkdir -p "$STATE" && cd "$STATE" && pwd -P)/node"
CD="$NODE/containerd"
CD_SOCK="$CD/containerd.sock"
CNI_BIN="$E2E/.cache/cni/bin"
REGISTRY_ADDR=127.0.0.1:5000
# The sysctls something here may change: the kubelet (protectKernelDefaults: false) sets
# the first six, the bridge plugin (isGateway) turns on forwarding.
SYSCTLS=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops kernel.keys.root_maxkeys
  kernel.keys.root_maxbytes net.ipv4.ip_forward net.bridge.bridge-nf-call-iptables)
# Ports the node's processes listen on (registry, kubelet healthz and API, kube-proxy
# metrics and healthz, kube-scheduler).
NODE_PORTS=("$REGISTRY_ADDR" 127.0.0.1:10248 "$GATEWAY:10250" 127.0.0.1:10249 127.0.0.1:10256 127.0.0.1:10259)
# Registries the Pods' images name; containerd pulls each from the local registry instead.
MIRRORED=(ghcr.io docker.io registry.k8s.io sidecert.test)
PAUSE_IMAGE=registry.k8s.io/pause:3.10.1
# Fixed paths: the kubelet's device-plugin socket and its container log links, libcni's
# result cache.
HOST_DIRS=(/var/lib/kubelet /var/log/containers /var/lib/cni)
CGROUP_ROOT=sidecert-node

ctr_() { "$BIN/ctr" --address "$CD_SOCK" -n k8s.io "$@"; }

start() { start_component "$@"; }

save_sysctls() {
  # Saved once: after a crash the file holds the values from before the plane, not ours.
  # A reboot resets them, so a file from an earlier boot is dropped, not restored.
  if [[ -f "$NODE/sysctls.saved" ]]; then
    [[ "$(head -n1 "$NODE/sysctls.saved")" == "boot=$BOOT_ID" ]] && return 0
    rm -f "$NODE/sysctls.saved"
  fi
  mkdir -p "$NODE"
  echo "boot=$BOOT_ID" >"$NODE/sysctls.saved.tmp"
  for k in "${SYSCTLS[@]}"; do
    local f="/proc/sys/${k//.//}"
    if [[ -f $f ]]; then printf '%s=%s\n' "$k" "$(cat "$f")"; fi
  done >>"$NODE/sysctls.saved.tmp"
  mv "$NODE/sysctls.saved.tmp" "$NODE/sysctls.saved"
}

restore_sysctls() {
  [[ -f "$NODE/sysctls.saved" ]] || return 0
  if [[ "$(head -n1 "$NODE/sysctls.saved")" != "boot=$BOOT_ID" ]]; then
    rm -f "$NODE/sysctls.saved"
    return 0
  fi
  while IFS='=' read -r k v; do
    [[ $k == boot ]] && continue
    # Someone else changed it since the node set it: theirs now.
    local ours
    ours=$(sed -n "s/^$k=//p" "$NODE/sysctls.ours" 2>/dev/null || true)
    [[ -n $ours && -f "/proc/sys/${k//.//}" && "$(cat "/proc/sys/${k//.//}")" != "$ours" ]] && continue
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
volumePluginDir: $NODE/volume-plugins
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

# kube-proxy, whatever its mode, removes at start what other kube-proxies leave: the host's
# iptables KUBE-* chains, its IPVS services, nftables tables named kube-proxy. On a machine
# where another cluster's node runs, that would break it; so the node refuses to start
# there. (`down` deletes the kube-proxy tables only when this node made them.)
# Whether one of our binaries runs under this name (by executable path; no pattern match).
pgrep_ours() { # tool
  local d
  for d in /proc/[0-9]*; do
    runs_binary "${d#/proc/}" "$BIN/$1" && return 0
  done
  return 1
}

refuse_foreign_proxy_state() {
  local found=()
  for family in ip ip6; do
    nft list table "$family" kube-proxy >/dev/null 2>&1 && found+=("nftables table $family kube-proxy")
  done
  local save
  for save in iptables-save ip6tables-save iptables-legacy-save iptables-nft-save; do
    command -v "$save" >/dev/null || continue
    # Not `| grep -q`: under pipefail, grep quitting early fails the dump with SIGPIPE.
    grep -q '^:KUBE-' <<<"$("$save" 2>/dev/null || true)" && found+=("$save: KUBE-* chains")
  done
  [[ -s /proc/net/ip_vs ]] && grep -q '^[TU][CD]P' /proc/net/ip_vs 2>/dev/null && found+=("IPVS services")
  ((${#found[@]} == 0)) && return 0
  local hint="Stop that cluster first."
  if [[ ${found[*]} == *"nftables table"* ]] && ! pgrep_ours kube-proxy; then
    hint="$hint If they are this plane's, left by a run that was killed, delete them: nft delete table ip kube-proxy; nft delete table ip6 kube-proxy"
  fi
  die "another kube-proxy's rules are on this host (${found[*]}); the node's kube-proxy would remove them at start. $hint"
}

# ---- images ------------------------------------------------------------------------------
push_images() {
  local crane="$BIN/crane"
  "$E2E/scripts/images.sh"
  for name in webhook sidecar app traefik; do
    local ref repo
    ref=$(cut -d@ -f1 "$E2E/.cache/images/$name.ref")
    repo=${ref#*/}
    say "pushing $ref to the local registry"
    rm -rf "$NODE/push" && mkdir -p "$NODE/push"
    tar -xf "$E2E/.cache/images/$name.tar" -C "$NODE/push"
    "$crane" push --insecure "$NODE/push" "$REGISTRY_ADDR/$repo" >/dev/null 2>>"$LOGS/crane.log"
  done
  # examples/ and the scenarios name the test app example/app:1.0 (docker.io, mirrored here).
  "$crane" copy --insecure "$REGISTRY_ADDR/app:1.0" "$REGISTRY_ADDR/example/app:1.0" 2>>"$LOGS/crane.log" ||
    die "crane copy of the app image failed; see $LOGS/crane.log"
  # The sandbox image: Kubernetes' pause, built from its source by make tools.
  local rootfs="$NODE/pause.rootfs"
  rm -rf "$rootfs" && mkdir -p "$rootfs"
  install -m 0755 "$BIN/pause" "$rootfs/pause"
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf "$NODE/pause.tar" -C "$rootfs" .
  "$crane" append --insecure --oci-empty-base -f "$NODE/pause.tar" -t "$REGISTRY_ADDR/pause:tmp" >/dev/null 2>>"$LOGS/crane.log"
  "$crane" mutate --insecure "$REGISTRY_ADDR/pause:tmp" --entrypoint /pause -t "$REGISTRY_ADDR/${PAUSE_IMAGE#*/}" >/dev/null 2>>"$LOGS/crane.log"
  rm -rf "$NODE/push" "$rootfs" "$NODE/pause.tar"
  # The chart, as an OCI artifact: helm install oci://127.0.0.1:5000/charts/sidecert.
  rm -rf "$NODE/chart" && mkdir -p "$NODE/chart"
  "$BIN/helm" package "$REPO/charts/sidecert" -d "$NODE/chart" >/dev/null
  "$BIN/helm" push "$NODE/chart"/sidecert-*.tgz "oci://$REGISTRY_ADDR/charts" --plain-http >>"$LOGS/crane.log" 2>&1 ||
    die "helm push of the chart to the local registry failed; see $LOGS/crane.log"
  rm -rf "$NODE/chart"
}

up() {
  for tool in kubelet kube-scheduler kube-proxy containerd containerd-shim-runc-v2 ctr runc registry crane pause helm; do
    [[ -x "$BIN/$tool" ]] || die "$BIN/$tool is missing; build it with: make tools"
  done
  command -v nft >/dev/null || die "nft is missing (Debian's nftables): run make tools"
  refuse_foreign_proxy_state
  require_free_ports "${NODE_PORTS[@]}"
  mkdir -p "$NODE" "$PIDS" "$LOGS"
  echo "$BOOT_ID" >"$NODE/boot_id"
  save_sysctls
  [[ -e /run/containerd ]] || touch "$NODE/made-run-containerd"
  # Host folders the kubelet and libcni use whatever their configuration says: down removes
  # what the node put there, and the folders themselves if the node made them.
  local d
  for d in "${HOST_DIRS[@]}"; do
    [[ -e $d ]] || touch "$NODE/made-${d//\//_}"
  done
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

  touch "$NODE/made-kube-proxy-tables"
  start kube-scheduler "$BIN/kube-scheduler" --kubeconfig "$NODE/scheduler.kubeconfig" \
    --authentication-kubeconfig "$NODE/scheduler.kubeconfig" --authorization-kubeconfig "$NODE/scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port 10259 --leader-elect=false
  for h in /sys/fs/cgroup/*/; do
    [[ -L ${h%/} || ${h%/} == /sys/fs/cgroup/unified ]] && continue
    mkdir -p "$h$CGROUP_ROOT"
  done
  start kubelet "$BIN/kubelet" --config "$NODE/kubelet.yaml" --kubeconfig "$NODE/kubelet.kubeconfig" \
    --hostname-override "$NODE_NAME" --node-ip "$GATEWAY" --root-dir "$NODE/kubelet" --cert-dir "$NODE/kubelet-pki"
  # kube-proxy takes the node's addresses from its Node object, and exits when they change:
  # started before the kubelet has registered the Node, it assumes 127.0.0.1, then exits
  # once the Node appears with 10.213.0.1. So it starts only once the Node is there.
  wait_until "the kubelet's Node object" 60 kubectl_admin get node "$NODE_NAME"
  # nftables: its rules are two tables of its own, removed whole by `down`. --masquerade-all:
  # a Pod reaching a Service backed by a Pod on the same bridge gets the answer back
  # through the host, where the translation is undone.
  start kube-proxy "$BIN/kube-proxy" --kubeconfig "$NODE/kube-proxy.kubeconfig" \
    --proxy-mode nftables --masquerade-all --cluster-cidr "$POD_CIDR" --hostname-override "$NODE_NAME" \
    --metrics-bind-address 127.0.0.1:10249 --healthz-bind-address 127.0.0.1:10256 \
    --conntrack-max-per-core 0 --conntrack-tcp-timeout-established 0 --conntrack-tcp-timeout-close-wait 0
  wait_until kube-scheduler 30 curl -skf https://127.0.0.1:10259/healthz
  wait_until kube-proxy 30 curl -sf http://127.0.0.1:10256/healthz
  # What the kubelet and the bridge plugin set: down restores a sysctl only while it still
  # holds this value, so a change someone else made meanwhile stays.
  poll_until 30 sysctls_settled || true
  for k in "${SYSCTLS[@]}"; do
    local f="/proc/sys/${k//.//}"
    case $k in
      # Set to 1 with the first Pod, after this.
      net.*) echo "$k=1" ;;
      *) if [[ -f $f ]]; then printf '%s=%s\n' "$k" "$(cat "$f")"; fi ;;
    esac
  done >"$NODE/sysctls.ours"
}

# The kubelet sets its sysctls at start, the bridge plugin with the first Pod; wait for the
# kubelet's (kernel.panic is one of them).
sysctls_settled() { [[ "$(cat /proc/sys/kernel/panic)" == 10 ]]; }

# ---- down --------------------------------------------------------------------------------
# Kills the process a containerd pid file names, if it is still one of this node's: a
# container process in the node's cgroups, or one of our shims (by its executable). After a
# reboot (another boot id) nothing of the node can be running, so nothing is signalled.
kill_pidfile() { # file init|shim
  local p
  p=$(cat "$1" 2>/dev/null || true)
  [[ $p =~ ^[0-9]+$ && -d /proc/$p ]] || return 0
  [[ "$(cat "$NODE/boot_id" 2>/dev/null)" == "$BOOT_ID" ]] || return 0
  case $2 in
    init) grep -q "/$CGROUP_ROOT/" "/proc/$p/cgroup" 2>/dev/null || return 0 ;;
    shim) runs_binary "$p" "$BIN/containerd-shim-runc-v2" || return 0 ;;
  esac
  kill -KILL "$p" 2>/dev/null || true
}

# What the node left in the fixed host folders: libcni's cached results for its sandboxes
# (their ids are the 64-hex folders under containerd's state), the kubelet's device-plugin
# socket and checkpoint, container log links into the node's folder; then the folders the
# node made, if empty.
clean_host_dirs() {
  local id f
  if [[ -d /var/lib/cni/results ]]; then
    while IFS= read -r id; do
      rm -f /var/lib/cni/results/*-"$id"-*
    done < <(find "$CD" -type d -regextype posix-extended -regex '.*/[0-9a-f]{64}' -printf '%f\n' 2>/dev/null | sort -u)
  fi
  rm -f /var/lib/kubelet/device-plugins/kubelet.sock /var/lib/kubelet/device-plugins/kubelet_internal_checkpoint
  if [[ -d /var/log/containers ]]; then
    for f in /var/log/containers/*.log; do
      [[ -L $f && "$(readlink "$f")" == "$NODE"/* ]] && rm -f "$f"
    done
  fi
  for d in "${HOST_DIRS[@]}"; do
    [[ -f "$NODE/made-${d//\//_}" ]] || continue
    find "$d" -depth -type d -empty -delete 2>/dev/null || true
  done
}

down() {
  [[ -d $NODE ]] || return 0
  say "stopping the node (kubelet, containers, containerd, kube-proxy, kube-scheduler, registry)"
  stop_component kubelet 30
  # Every container's task through containerd (its shim then exits and removes its socket);
  # a containerd that died is started once more on the same state for this.
  if [[ -S $CD_SOCK ]] && ! alive containerd && [[ -x "$BIN/containerd" ]]; then
    PATH="$BIN:$PATH" start containerd "$BIN/containerd" --config "$CD/config.toml"
    poll_until 30 ctr_ version || say "containerd did not start for the cleanup; killing what its pid files name"
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
    while IFS= read -r -d '' f; do kill_pidfile "$f" init; done < <(find "$CD/state" -name init.pid -print0)
    while IFS= read -r -d '' f; do kill_pidfile "$f" shim; done < <(find "$CD/state" -name shim.pid -print0)
  fi
  stop_component kube-proxy 10
  if [[ -f "$NODE/made-kube-proxy-tables" ]]; then
    for family in ip ip6; do nft delete table "$family" kube-proxy 2>/dev/null || true; done
  fi
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
  clean_host_dirs
  restore_sysctls
  # The shims' sockets are under /run/containerd/s whatever the configuration says: remove
  # the folders if this node made them (and they are empty).
  if [[ -f "$NODE/made-run-containerd" ]]; then
    rmdir /run/containerd/s /run/containerd 2>/dev/null || true
  fi
  # Nothing is mounted under it any more; --one-file-system keeps rm from following one
  # that could not be unmounted.
  rm -rf --one-file-system "$NODE"
}

# A plane that is reused gets this checkout's images and chart, and containerd forgets the
# tags it had pulled, so the next Pod runs what the checkout builds (IfNotPresent).
push() {
  push_images
  local name ref
  for name in webhook sidecar app; do
    ref=$(cut -d@ -f1 "$E2E/.cache/images/$name.ref")
    ctr_ images rm "$ref" "${ref/#sidecert.test\/app/docker.io/example/app}" >/dev/null 2>&1 || true
  done
}

case "${1:-}" in
  up) up ;;
  push) push ;;
  down) down ;;
  *) die "usage: $0 up|push|down" ;;
esac
