#!/usr/bin/env bash
# Runs a command with the local plane up and its env sourced. A plane this script brings up
# is stopped again afterwards (whatever the command's result); one that was already running
# is left running.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ours=0
if ! plane_running; then
  ours=1
fi
finish() {
  local rc=$?
  # Ctrl-C reaches every process in the group: the teardown still runs to its end, and a
  # closed stderr (the reader gone) does not stop it.
  trap '' INT TERM PIPE
  if [[ $rc -ne 0 ]]; then
    say "failed (exit $rc); last lines of the plane's logs:"
    for f in "$LOGS"/*.log; do
      [[ -f "$f" ]] || continue
      printf -- '--- %s\n' "$f" >&2
      tail -n 15 "$f" >&2
    done
  fi
  if [[ $ours -eq 1 ]]; then
    local t=$SECONDS
    "$E2E/scripts/cluster-down.sh" || true
    record "plane down" "$t"
  fi
  exit "$rc"
}
# The plane's start and stop times, in the output stream (make test's filter files them
# among the test groups, in the order they happened).
record() { # name start
  say "timing: $1 $((SECONDS - $2))s"
}
trap finish EXIT
t=$SECONDS
"$E2E/scripts/cluster-up.sh"
record "plane up" "$t"
# shellcheck disable=SC1091
source "$STATE/env"
"$@"
