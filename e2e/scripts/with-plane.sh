#!/usr/bin/env bash
# Runs a command with the local plane up and its env sourced. A plane this script brings up
# is stopped again afterwards (whatever the command's result); one that was already running
# is left running.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ours=0
if ! { alive kube-apiserver && alive localnode && kubectl_admin get --raw /readyz >/dev/null 2>&1; }; then
  ours=1
fi
finish() {
  local rc=$?
  if [[ $rc -ne 0 ]]; then
    say "failed (exit $rc); last lines of the plane's logs:"
    for f in "$LOGS"/*.log; do
      [[ -f "$f" ]] || continue
      printf -- '--- %s\n' "$f" >&2
      tail -n 15 "$f" >&2
    done
  fi
  if [[ $ours -eq 1 ]]; then "$E2E/scripts/cluster-down.sh" || true; fi
  exit "$rc"
}
trap finish EXIT
"$E2E/scripts/cluster-up.sh"
# shellcheck disable=SC1091
source "$STATE/env"
"$@"
