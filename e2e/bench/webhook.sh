#!/usr/bin/env bash
# Benchmark: sidecert-webhook vs nginx answering the same POST over TLS with a response of
# the same size. One worker each, pinned to CPU 0; the client (oha) pinned to CPU 1.
# Prints requests/s keep-alive, requests/s with a new TLS handshake per request, p99 latency
# at a fixed 500 requests/s, and the webhook's RSS idle and under load; then the ratios.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
source "$E2E/versions.env"
work="$STATE/bench/webhook"
rm -rf "$work"; mkdir -p "$work"
DURATION=${BENCH_DURATION:-10}
WEBHOOK_PORT=18443
NGINX_PORT=18444

# --- tools -----------------------------------------------------------------------------------
need_apt() { command -v "$1" >/dev/null || { apt-get update -qq && apt-get install -y -qq "$2"; }; }
need_apt nginx nginx
need_apt taskset util-linux
if [[ ! -x "$E2E/.cache/bin/oha" || "$(cat "$E2E/.cache/bin/.oha.version" 2>/dev/null)" != "$OHA_VERSION" ]]; then
  say "installing oha $OHA_VERSION (the load client) into e2e/.cache"
  cargo install --quiet --locked --root "$E2E/.cache" --version "$OHA_VERSION" oha
  echo "$OHA_VERSION" >"$E2E/.cache/bin/.oha.version"
fi
OHA="$E2E/.cache/bin/oha"
(cd "$REPO" && cargo build --quiet --release -p sidecert-webhook)
WEBHOOK="$REPO/target/release/sidecert-webhook"

# --- inputs: a realistic Pod review (~10 KB with managedFields) and its real response -------
# The review is marked dryRun, so the webhook skips its side effects (temporary Secret,
# RBAC): the figures measure the webhook's own work, not API-server round trips. The patch
# it answers with is the same as without dryRun.
source_review="$REPO/webhook/tests/data/pod-bench.json"
[[ -f "$source_review" ]] || die "missing $source_review"
review="$work/review.json"
python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); r["request"]["dryRun"]=True; json.dump(r,open(sys.argv[2],"w"))' \
  "$source_review" "$review"
"$WEBHOOK" review -f "$review" >"$work/response.json"
printf 'review %s bytes, response %s bytes\n' "$(wc -c <"$review")" "$(wc -c <"$work/response.json")"

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 -subj /CN=localhost \
  -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -keyout "$work/tls.key" -out "$work/tls.crt" 2>/dev/null

# nginx returns the webhook's own response body, byte for byte, to the same POST.
body=$(<"$work/response.json")
[[ "$body" != *"'"* ]] || die "response contains a single quote; cannot embed it in nginx.conf"
cat >"$work/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $work/nginx.pid;
error_log $work/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_buffer_size 64k;
  keepalive_requests 1000000;
  ssl_protocols TLSv1.3;
  server {
    listen 127.0.0.1:$NGINX_PORT ssl;
    ssl_certificate $work/tls.crt;
    ssl_certificate_key $work/tls.key;
    location /mutate { default_type application/json; return 200 '$body'; }
  }
}
NGINX

pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

taskset -c 0 nginx -c "$work/nginx.conf" -e "$work/nginx-error.log" & pids+=($!)
: "${KUBECONFIG:?the webhook watches Ingresses and Services: run through e2e/scripts/with-plane.sh}"
taskset -c 0 "$WEBHOOK" serve --workers 1 --reconcile=false --listen "127.0.0.1:$WEBHOOK_PORT" --metrics-listen 127.0.0.1:19443 \
  --tls-cert-file "$work/tls.crt" --tls-key-file "$work/tls.key" >"$work/webhook.log" 2>&1 &
webhook_pid=$!; pids+=($webhook_pid)
for _ in $(seq 50); do
  curl -skf -o /dev/null "https://127.0.0.1:$WEBHOOK_PORT/healthz" && curl -skf -o /dev/null -X POST "https://127.0.0.1:$NGINX_PORT/mutate" && break
  sleep 0.2
done

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }
idle_rss=$(rss_kib "$webhook_pid")

# oha prints JSON; we read requests/s and the p99 latency from it.
run() { # url extra-args... -> "rps p99_ms"
  local url=$1; shift
  taskset -c 1 "$OHA" --no-tui --output-format json -z "${DURATION}s" --insecure -m POST \
    -H 'Content-Type: application/json' -D "$review" "$@" "$url" >"$work/oha.json"
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["summary"]["requestsPerSec"], r["latencyPercentiles"]["p99"]*1000, r["summary"]["successRate"])' "$work/oha.json"
}
declare -A R
for target in webhook nginx; do
  port=$WEBHOOK_PORT; [[ $target == nginx ]] && port=$NGINX_PORT
  url="https://127.0.0.1:$port/mutate"
  say "$target: keep-alive"
  R[$target.ka]=$(run "$url" -c 64)
  say "$target: a new TLS handshake per request"
  R[$target.hs]=$(run "$url" -c 16 --disable-keepalive)
  say "$target: fixed 500 requests/s"
  R[$target.p99]=$(run "$url" -c 16 -q 500)
done
load_rss=$(hwm_kib "$webhook_pid")

python3 - "${R[webhook.ka]}" "${R[nginx.ka]}" "${R[webhook.hs]}" "${R[nginx.hs]}" \
  "${R[webhook.p99]}" "${R[nginx.p99]}" "$idle_rss" "$load_rss" <<'PY'
import sys
a = sys.argv[1:]
w_ka, n_ka, w_hs, n_hs, w_q, n_q = ([float(x) for x in s.split()] for s in a[:6])
idle, load = int(a[6]) / 1024, int(a[7]) / 1024
rows = [
    ("keep-alive requests/s", w_ka[0], n_ka[0], w_ka[0] / n_ka[0], ">= 0.2"),
    ("new-handshake requests/s", w_hs[0], n_hs[0], w_hs[0] / n_hs[0], ">= 1.0"),
    ("p99 ms at 500 requests/s", w_q[1], n_q[1], w_q[1] / n_q[1], "<= 4.0"),
]
print(f"{'':28}{'webhook':>12}{'nginx':>12}{'ratio':>8}  target")
for name, w, n, r, t in rows:
    print(f"{name:28}{w:12.1f}{n:12.1f}{r:8.2f}  {t}")
print(f"success rates: webhook {w_ka[2]:.3f}/{w_hs[2]:.3f}/{w_q[2]:.3f}, nginx {n_ka[2]:.3f}/{n_hs[2]:.3f}/{n_q[2]:.3f}")
print(f"webhook RSS idle {idle:.1f} MiB (target <= 15), peak under load {load:.1f} MiB (target <= 30)")
PY
