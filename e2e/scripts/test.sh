#!/usr/bin/env bash
# `make test`: every phase in order, each timed: tools, lint, the Rust build, the images,
# the chart, the manifests, then the plane and every cargo test on it (each test binary is a
# group, timed by libtest). The phases and their times are printed at the end, also when a
# phase fails; the first failing phase stops the run, except the tests, which all run
# (--no-fail-fast).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO"
MAKE=${MAKE:-make}
CARGO=${CARGO:-cargo}
export SIDECERT_PHASES="$REPO/target/phases.txt"
mkdir -p "$REPO/target"
: >"$SIDECERT_PHASES"
total=$SECONDS

summary() {
  local rc=$?
  {
    printf '\n==> make test: phases (%s)\n' "$( ((rc == 0)) && echo passed || echo "failed, exit $rc")"
    cat "$SIDECERT_PHASES"
    printf '  %-44s %6ss\n' "total" "$((SECONDS - total))"
  } >&2
  exit "$rc"
}
trap summary EXIT

phase() { # name command...
  local name=$1 start=$SECONDS rc=0
  shift
  say "phase: $name"
  "$@" || rc=$?
  printf '  %-44s %6ss%s\n' "$name" "$((SECONDS - start))" "$( ((rc)) && echo "  FAILED (exit $rc)")" >>"$SIDECERT_PHASES"
  return "$rc"
}

# libtest prints one "test result: ... finished in Ns" line per binary, after cargo's
# "Running <file> (<binary>)": each pair is a test group's time. Unit tests come first in
# each crate, so the crate of an integration test is the last crate seen. The filter ignores
# Ctrl-C, so it reads on while the plane is taken down and the teardown's output is not cut.
groups() {
  trap '' INT
  awk -v out="$SIDECERT_PHASES" '
    { print; fflush() }
    /^ *Running / {
      bin = $NF; gsub(/[()]/, "", bin); sub(/.*\//, "", bin); sub(/-[0-9a-f]+$/, "", bin)
      if ($2 == "unittests") { crate = bin; name = crate " " $3 } else { name = crate " " $2 }
    }
    /^ *Doc-tests / { name = "doc-tests " $2 }
    /^==> timing: / {
      t = $NF; label = $0; sub(/^==> timing: /, "", label); sub(/ [0-9]+s$/, "", label)
      printf "    %-42s %6s\n", label, t >> out
      close(out)
    }
    /^test result: / && name != "" {
      t = $NF; sub(/s$/, "", t)
      printf "    %-42s %6.0fs  %s\n", name, t, $3 >> out
      close(out)
      name = ""
    }'
}
tests() {
  "$E2E/scripts/with-plane.sh" "$CARGO" test --workspace --no-fail-fast 2>&1 | groups
}

phase "tools (make tools)" "$MAKE" --no-print-directory tools
phase "lint (rustfmt, clippy, cargo deny)" "$MAKE" --no-print-directory lint
phase "Rust build (debug, bins and tests)" "$CARGO" build --workspace --all-targets
phase "images (musl release builds, crane)" "$MAKE" --no-print-directory images
phase "chart (helm lint, chart tests)" "$MAKE" --no-print-directory chart-test
phase "manifests (rendered = committed)" "$MAKE" --no-print-directory manifests-check
phase "plane up, every cargo test, plane down" tests
