#!/usr/bin/env bash
# Stops everything cluster-up started, by the pids it recorded, in reverse order; removes
# the bridge and etcd's data. Logs are kept in e2e/.state/logs (each run appends).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# The node first (kubelet, containers, containerd, kube-proxy, kube-scheduler, registry; a
# no-op when none runs): its teardown also undoes what a killed run left.
"$E2E/scripts/node.sh" down || say "the node's teardown failed; see above"

for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
  name=${COMPONENTS[$i]}
  if alive "$name"; then say "stopping $name"; fi
  stop_component "$name" 20
done
# Anything else with a pid file (a component an older checkout started, e.g. its localnode).
for f in "$PIDS"/*.pid; do
  [[ -e "$f" ]] || continue
  name=$(basename "$f" .pid)
  if alive "$name"; then say "stopping $name"; fi
  stop_component "$name" 20
done

if ip link show "$BRIDGE" >/dev/null 2>&1; then
  ip link del "$BRIDGE" 2>/dev/null || true
fi
rm -rf "$STATE/etcd" "$STATE/env" "$STATE/flexvolume" "$STATE/traefik" "$STATE/pebble-root.pem"
say "the local plane is stopped"
