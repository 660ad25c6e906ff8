#!/usr/bin/env bash
# `make demo`: the local plane (API server, controller-manager, a kubelet on containerd, Pebble),
# sidecert installed with helm from charts/sidecert, pushed to the local registry as an OCI
# artifact (the webhook runs from its image as the chart's Deployment, reached by the API
# server through its Service), and examples/ applied in the labelled namespace `demo`. Waits, showing progress, until the Secret holds the certificate
# Pebble issued, prints it, then the `curl` through the ingress controller (Traefik) that gets
# the app over HTTPS with it. `make demo-down` (or Ctrl-C while it waits) stops it all.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
NS=demo
SECRET=web-tls
RELEASE=sidecert
RELEASE_NS=sidecert-system
HELM="$BIN/helm"
TIMEOUT=${DEMO_TIMEOUT:-180}

interrupted() {
  printf '\n' >&2
  say "interrupted: stopping the demo and the local plane"
  "$E2E/scripts/cluster-down.sh"
  exit 130
}
trap interrupted INT TERM

# `make demo` has built these already; when run on its own, build what is missing.
[[ -x "$HELM" ]] || "$E2E/tools/build.sh"
for binary in sidecert-webhook sidecert-sidecar sidecert-e2e; do
  if [[ ! -x "$REPO/target/debug/$binary" ]]; then
    say "building the binaries (cargo build --workspace --bins)"
    (cd "$REPO" && cargo build --workspace --bins)
    break
  fi
done

"$E2E/scripts/cluster-up.sh"
source "$STATE/env"

# An earlier version of this demo registered a host-process webhook by URL; a plane that
# still runs from then must not keep calling it.
kubectl delete mutatingwebhookconfiguration sidecert-demo --ignore-not-found >/dev/null

# Pebble's CA goes in the chart's ConfigMap (acme.caBundle), which the kubelet mounts.
# Pebble picks a random profile for orders that name none: ask for its 90-day `default`.
say "installing sidecert with helm from oci://127.0.0.1:5000/charts/sidecert: release $RELEASE in namespace $RELEASE_NS, ACME server $PEBBLE_DIRECTORY"
# The chart comes from the local registry as an OCI artifact (node.sh pushed charts/sidecert).
CHART_VERSION=$(sed -n 's/^version: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$REPO/charts/sidecert/Chart.yaml")
"$HELM" upgrade --install "$RELEASE" "oci://127.0.0.1:5000/charts/sidecert" --version "$CHART_VERSION" --plain-http \
  -n "$RELEASE_NS" --create-namespace \
  --wait --timeout 120s \
  --set acme.server="$PEBBLE_DIRECTORY" \
  --set-file acme.caBundle="$PEBBLE_CA_FILE" \
  --set-file webhook.clientCA="${WEBHOOK_CLIENT_CA_FILE:?the plane predates webhook client auth: make cluster-down && make cluster-up}" \
  --set acme.profile=default \
  --set acme.email=demo@sidecert.test >/dev/null
kubectl -n "$RELEASE_NS" get pods -o wide >&2

kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl label namespace "$NS" sidecert.io/injection=enabled --overwrite >/dev/null
say "applying examples/ in namespace $NS (labelled sidecert.io/injection=enabled)"
kubectl -n "$NS" apply -f "$REPO/examples/"

say "waiting for the certificate (up to ${TIMEOUT}s; Ctrl-C stops the demo)"
started=$SECONDS
while ((SECONDS - started < TIMEOUT)); do
  temporary=$(kubectl -n "$NS" get secret "$SECRET" -o jsonpath='{.metadata.annotations.sidecert\.io/temporary}' 2>/dev/null || echo missing)
  not_after=$(kubectl -n "$NS" get secret "$SECRET" -o jsonpath='{.metadata.annotations.sidecert\.io/not-after}' 2>/dev/null || true)
  pods=$(kubectl -n "$NS" get pods -l app=web --no-headers 2>/dev/null | awk '{print $2"/"$3}' | paste -sd' ' -)
  # The sidecars' latest Event (Issued, Renewed, Failed with the CA's reason and the retry).
  event=$(kubectl -n "$NS" get events --field-selector involvedObject.kind=Pod --sort-by=.lastTimestamp \
    -o jsonpath='{range .items[*]}{.reason}{"\n"}{end}' 2>/dev/null | grep -vE '^(Scheduled|Pulled|Created|Started)$' | tail -n1 || true)
  issued=0
  [[ -n "$not_after" && "$temporary" != true && "$temporary" != missing ]] && issued=1
  printf '\r  %3ds  pods (ready/status): %-42s secret %s: %-22s last event: %-10s' "$((SECONDS - started))" \
    "${pods:-none}" "$SECRET" "$( ((issued)) && echo issued || echo "temporary=$temporary")" "${event:-none}" >&2
  if ((issued)); then
    printf '\n' >&2
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    kubectl -n "$NS" get secret "$SECRET" -o jsonpath='{.data.tls\.crt}' | base64 -d >"$work/chain.pem"
    awk -v dir="$work" '/BEGIN CERTIFICATE/{n++} {print > (dir "/" (n == 1 ? "leaf" : "intermediates") ".pem")}' "$work/chain.pem"
    curl -sf --cacert "$PEBBLE_CA_FILE" "$PEBBLE_MANAGEMENT/roots/0" >"$work/root.pem"
    say "the certificate Pebble issued, as stored in Secret $NS/$SECRET:"
    openssl x509 -in "$work/leaf.pem" -noout -subject -ext subjectAltName -issuer -dates
    if openssl verify -CAfile "$work/root.pem" -untrusted "$work/intermediates.pem" "$work/leaf.pem" >/dev/null 2>&1; then
      echo "chain: verifies against Pebble's root (GET $PEBBLE_MANAGEMENT/roots/0)"
    else
      echo "chain: does NOT verify against Pebble's root" >&2
    fi
    # What a browser sees: the app over HTTPS through the ingress controller (Traefik), with
    # that certificate. Traefik follows the Secret (1-2 s after it changed).
    host=$(kubectl -n "$NS" get ingress web -o jsonpath='{.spec.tls[0].hosts[0]}')
    serial=$(openssl x509 -in "$work/leaf.pem" -noout -serial | cut -d= -f2)
    cp "$work/root.pem" "$STATE/pebble-root.pem"
    curl_cmd=(curl -fsS --resolve "$host:$INGRESS_HTTPS_PORT:$INGRESS_IP" --cacert "$STATE/pebble-root.pem" "https://$host:$INGRESS_HTTPS_PORT/")
    served_serial() {
      { openssl s_client -connect "$INGRESS_IP:$INGRESS_HTTPS_PORT" -servername "$host" </dev/null 2>/dev/null |
        openssl x509 -noout -serial 2>/dev/null | cut -d= -f2; } || true
    }
    served=""
    for _ in $(seq 1 30); do
      served=$(served_serial)
      [[ "$served" == "$serial" ]] && break
      sleep 1
    done
    say "through the ingress controller (Traefik at $INGRESS_IP:$INGRESS_HTTPS_PORT), trusting only Pebble's root:"
    echo "\$ ${curl_cmd[*]}"
    https_ok=1
    "${curl_cmd[@]}" || https_ok=0
    echo "the certificate the ingress served for $host:"
    { openssl s_client -connect "$INGRESS_IP:$INGRESS_HTTPS_PORT" -servername "$host" </dev/null 2>/dev/null |
      openssl x509 -noout -subject -issuer -serial -dates; } || echo "  (none: the TLS handshake failed)"
    if [[ "$served" == "$serial" ]]; then
      echo "(the same certificate as in Secret $NS/$SECRET)"
    else
      echo "(NOT the certificate in Secret $NS/$SECRET: serial ${served:-none}, want $serial)" >&2
      https_ok=0
    fi
    rm -rf "$work"
    cat <<LOOK

Look around (source $STATE/env first):
  kubectl -n $NS get pods,svc,ingress,secrets,leases
  kubectl -n $NS get pod -l app=web -o jsonpath='{.items[0].spec.initContainers[*].name}'   # the injected sidecar
  kubectl -n $NS get ingress web -o yaml                     # the HTTP-01 route sidecert added
  kubectl -n $NS get secret $SECRET -o yaml                  # certificate, key and sidecert.io/ annotations
  kubectl -n $NS get events --sort-by=.lastTimestamp
  kubectl -n $RELEASE_NS get pods,svc,endpointslices         # the webhook, as the chart runs it
  $HELM -n $RELEASE_NS status $RELEASE
  kubectl -n $NS logs deploy/web -c sidecert               # the sidecar's log
  kubectl get node -o wide                                   # the kubelet and containerd that run it all
  curl --resolve $host:$INGRESS_HTTPS_PORT:$INGRESS_IP --cacert $STATE/pebble-root.pem https://$host:$INGRESS_HTTPS_PORT/
  kubectl -n $INGRESS_NAMESPACE logs deploy/traefik             # the ingress controller's access log
Stop everything: make demo-down
LOOK
    ((https_ok)) || die "HTTPS through the ingress controller did not serve the issued certificate; see: kubectl -n $INGRESS_NAMESPACE logs deploy/traefik (make demo-down stops the plane)"
    exit 0
  fi
  sleep 1
done
printf '\n' >&2
kubectl -n "$NS" get pods,secrets,events >&2 || true
kubectl -n "$RELEASE_NS" get pods >&2 || true
kubectl -n "$NS" logs deploy/web -c sidecert --tail=30 >&2 || true
die "no certificate after ${TIMEOUT}s; kubectl -n $NS logs shows the containers' logs (make demo-down stops the plane)"
