#!/usr/bin/env bash
# Stops everything cluster-up started, by the pids it recorded, in reverse order; removes
# the bridge, leftover Pod network namespaces and etcd's data. Logs are kept (in
# e2e/.state/logs) unless the next cluster-up clears them.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
[[ "${1:-}" == --keep-logs ]] || true

# A real node first (kubelet, containers, containerd, kube-proxy, registry; a no-op without
# one): its teardown also undoes what a killed run left.
"$E2E/scripts/node.sh" down || say "the node's teardown failed; see above"

# The kubelet stand-in first: it stops the Pods' processes and removes their namespaces.
for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
  name=${COMPONENTS[$i]}
  if alive "$name"; then say "stopping $name"; fi
  stop_component "$name" 20
done

# Safety net if the stand-in died without cleaning up: its namespaces carry the sc- prefix.
# Processes still inside one are ours; stop them by pid before removing the namespace.
for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^sc-' || true); do
  for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null || true; done
  ip netns del "$ns" 2>/dev/null || true
done
if ip link show "$BRIDGE" >/dev/null 2>&1; then
  ip link del "$BRIDGE" 2>/dev/null || true
fi
rm -rf "$STATE/etcd" "$STATE/env" "$STATE/pods"
say "the local plane is stopped"
