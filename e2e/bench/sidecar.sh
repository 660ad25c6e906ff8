#!/usr/bin/env bash
# Benchmark: `sidecert-sidecar issue` vs lego (Debian) for one domain against the same
# Pebble (PEBBLE_VA_NOSLEEP=1), wall time from start to files written; then the sidecar's
# stripped binary size (as the image ships it), its steady-state RSS with one certificate and its idle CPU.
# Runs inside e2e/scripts/with-plane.sh (needs Pebble and challtestsrv).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
: "${PEBBLE_DIRECTORY:?run through e2e/scripts/with-plane.sh}"
work="$STATE/bench/sidecar"
rm -rf "$work"; mkdir -p "$work"
RUNS=${BENCH_RUNS:-7}
command -v lego >/dev/null || { apt-get update -qq && apt-get install -y -qq lego; }
# The binary the image ships (sidecar/Dockerfile): static musl, profile release-small.
TARGET=x86_64-unknown-linux-musl
rustup target list --installed | grep -qx "$TARGET" || rustup target add "$TARGET"
command -v musl-gcc >/dev/null || { apt-get update -qq && apt-get install -y -qq musl-tools; }
(cd "$REPO" && CC_x86_64_unknown_linux_musl=musl-gcc \
  cargo build --quiet --profile release-small --target "$TARGET" -p sidecert-sidecar --bin sidecert-sidecar)
SIDECAR="$REPO/target/$TARGET/release-small/sidecert-sidecar"

# Each run gets its own name and loopback address, pointed at by challtestsrv's DNS, so no
# authorization is reused and each client answers HTTP-01 on its own address.
point() { curl -sf -X POST -d "{\"host\":\"$1\",\"addresses\":[\"$2\"]}" "$CHALLTESTSRV_URL/add-a" >/dev/null; }
now_ms() { date +%s%3N; }

declare -a T_SIDECAR T_LEGO
for i in $(seq "$RUNS"); do
  d="s$i-$RANDOM.bench.sidecert.test"; ip="127.0.5.$i"; point "$d" "$ip"
  t0=$(now_ms)
  "$SIDECAR" issue --domains "$d" --acme-server "$PEBBLE_DIRECTORY" --acme-ca-file "$PEBBLE_CA_FILE" \
    --cert-dir "$work/sidecar-$i" --http01-listen "$ip:$PEBBLE_HTTP_PORT" >"$work/sidecar-$i.log" 2>&1 \
    || die "sidecert-sidecar issue failed; see $work/sidecar-$i.log"
  T_SIDECAR+=($(($(now_ms) - t0)))

  d="l$i-$RANDOM.bench.sidecert.test"; ip="127.0.6.$i"; point "$d" "$ip"
  t0=$(now_ms)
  LEGO_CA_CERTIFICATES="$PEBBLE_CA_FILE" lego --accept-tos --email bench@sidecert.test --server "$PEBBLE_DIRECTORY" \
    --path "$work/lego-$i" --domains "$d" --http --http.port "$ip:$PEBBLE_HTTP_PORT" run >"$work/lego-$i.log" 2>&1 \
    || die "lego failed; see $work/lego-$i.log"
  T_LEGO+=($(($(now_ms) - t0)))
done

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
ms=$(median "${T_SIDECAR[@]}"); ml=$(median "${T_LEGO[@]}")
size=$(stat -c %s "$SIDECAR")

# Steady state: `run` with one certificate that its Secret already holds (so it orders
# nothing), measured after it settles: RSS, and CPU time used over an idle window. The
# certificate has Pebble's 90-day profile: with none named, Pebble may pick its 120 s one,
# and the window would measure a renewal.
ns="bench-$RANDOM"
kubectl create namespace "$ns" >/dev/null
d="steady-$RANDOM.bench.sidecert.test"; ip="127.0.7.1"; point "$d" "$ip"
"$SIDECAR" issue --domains "$d" --acme-server "$PEBBLE_DIRECTORY" --acme-ca-file "$PEBBLE_CA_FILE" \
  --acme-profile default --cert-dir "$work/steady" --http01-listen "$ip:$PEBBLE_HTTP_PORT" >"$work/steady-issue.log" 2>&1
kubectl -n "$ns" create secret tls steady-tls --cert "$work/steady/tls.crt" --key "$work/steady/tls.key" >/dev/null
SIDECERT_CERTIFICATES="[{\"secretName\":\"steady-tls\",\"domains\":[\"$d\"]}]" \
SIDECERT_ACME_PROFILE=default SIDECERT_ACME_SERVER="$PEBBLE_DIRECTORY" SIDECERT_ACME_CA_BUNDLE="$(cat "$PEBBLE_CA_FILE")" \
SIDECERT_POD_NAMESPACE="$ns" SIDECERT_POD_NAME=bench SIDECERT_POD_IP="$ip" \
  "$SIDECAR" run >"$work/steady-run.log" 2>&1 &
run_pid=$!
trap 'kill -TERM $run_pid 2>/dev/null || true; kubectl delete namespace "$ns" --wait=false >/dev/null 2>&1 || true' EXIT
sleep 5
cpu() { awk '{print $14 + $15}' "/proc/$run_pid/stat"; }
c0=$(cpu); sleep 20; c1=$(cpu)
rss=$(awk '/^VmRSS/ {print $2}' "/proc/$run_pid/status")
ticks=$(getconf CLK_TCK)

python3 - "$ms" "$ml" "$size" "$rss" "$((c1 - c0))" "$ticks" "${T_SIDECAR[*]}" "${T_LEGO[*]}" <<'PY'
import sys
ms, ml, size, rss, cpu, tck = (float(x) for x in sys.argv[1:7])
print(f"issue one domain, median of runs: sidecert-sidecar {ms:.0f} ms, lego {ml:.0f} ms, ratio {ms/ml:.2f} (target <= 0.2)")
print(f"  sidecert runs (ms): {sys.argv[7]}\n  lego runs (ms):     {sys.argv[8]}")
print(f"stripped binary as shipped (musl, release-small) {size/2**20:.1f} MiB (target <= 12)")
print(f"steady-state RSS with one certificate {rss/1024:.1f} MiB (target <= 8)")
print(f"idle CPU over 20 s: {cpu/tck*1000:.0f} ms ({cpu/tck/20*100:.2f}% of a core; target: near zero)")
PY
