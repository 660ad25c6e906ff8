#!/usr/bin/env bash
# `make demo`: the local plane, the sidecert webhook registered with the API server, and
# examples/ applied in a labelled namespace; waits (showing progress) until the Secret holds
# the certificate Pebble issued, then prints it. `make demo-down` (or Ctrl-C) stops it all.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
NS=demo
WEBHOOK_PORT=18443

interrupted() { say "interrupted: stopping the demo"; "$E2E/scripts/cluster-down.sh"; exit 130; }
trap interrupted INT TERM

"$E2E/scripts/cluster-up.sh"
source "$STATE/env"

# The webhook runs beside the plane as a host process, registered by URL; its serving
# certificate comes from the plane's CA.
if ! alive webhook; then
  (cd "$PKI" && [[ -f webhook.crt ]] || {
    openssl ecparam -name prime256v1 -genkey -noout -out webhook.key
    openssl req -new -key webhook.key -subj /CN=sidecert-webhook -out webhook.csr
    printf 'subjectAltName=IP:%s\nextendedKeyUsage=serverAuth\n' "$GATEWAY" >webhook.ext
    openssl x509 -req -in webhook.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 \
      -extfile webhook.ext -out webhook.crt 2>/dev/null
    rm -f webhook.csr webhook.ext
  })
  say "starting sidecert-webhook on $GATEWAY:$WEBHOOK_PORT"
  setsid "$REPO/target/debug/sidecert-webhook" serve \
    --listen "$GATEWAY:$WEBHOOK_PORT" --metrics-listen 127.0.0.1:19443 \
    --tls-cert-file "$PKI/webhook.crt" --tls-key-file "$PKI/webhook.key" \
    --acme-server "$PEBBLE_DIRECTORY" --acme-ca-bundle-file "$PEBBLE_CA_FILE" \
    --acme-email demo@sidecert.test >>"$LOGS/webhook.log" 2>&1 </dev/null &
  echo $! >"$PIDS/webhook.pid"
  for _ in $(seq 100); do curl -sf --cacert "$PKI/ca.crt" "https://$GATEWAY:$WEBHOOK_PORT/readyz" >/dev/null && break; sleep 0.2; done
fi
ca_bundle=$(base64 -w0 "$PKI/ca.crt")
kubectl apply -f - >/dev/null <<YAML
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata:
  name: sidecert-demo
webhooks:
$(for kind in pods ingresses; do
  ops='["CREATE"]'; group='""'; version=v1; policy=Fail
  [[ $kind == ingresses ]] && { ops='["CREATE","UPDATE"]'; group='"networking.k8s.io"'; policy=Ignore; }
  cat <<HOOK
  - name: $kind.sidecert.io
    admissionReviewVersions: [v1]
    sideEffects: NoneOnDryRun
    failurePolicy: $policy
    matchPolicy: Equivalent
    timeoutSeconds: 10
    reinvocationPolicy: Never
    clientConfig:
      url: https://$GATEWAY:$WEBHOOK_PORT/mutate
      caBundle: $ca_bundle
    namespaceSelector:
      matchLabels: {sidecert.io/injection: enabled}
    rules:
      - {apiGroups: [$group], apiVersions: [$version], operations: $ops, resources: [$kind], scope: Namespaced}
HOOK
done)
YAML

kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl label namespace "$NS" sidecert.io/injection=enabled --overwrite >/dev/null
say "applying examples/ in namespace $NS"
kubectl -n "$NS" apply -f "$REPO/examples/"

say "waiting for the certificate (Ctrl-C stops the demo)"
for i in $(seq 180); do
  temporary=$(kubectl -n "$NS" get secret web-tls -o jsonpath='{.metadata.annotations.sidecert\.io/temporary}' 2>/dev/null || echo missing)
  not_after=$(kubectl -n "$NS" get secret web-tls -o jsonpath='{.metadata.annotations.sidecert\.io/not-after}' 2>/dev/null || true)
  pods=$(kubectl -n "$NS" get pods -l app=web --no-headers 2>/dev/null | awk '{print $2"/"$3}' | paste -sd' ' -)
  printf '\r  %3ds  pods: %-40s secret web-tls: %s' "$i" "${pods:-none}" \
    "$([[ -n $not_after && $temporary != true ]] && echo "issued" || echo "temporary=$temporary")" >&2
  if [[ -n "$not_after" && "$temporary" != true ]]; then
    printf '\n' >&2
    say "the certificate Pebble issued, as stored in Secret $NS/web-tls:"
    kubectl -n "$NS" get secret web-tls -o jsonpath='{.data.tls\.crt}' | base64 -d |
      openssl x509 -noout -subject -ext subjectAltName -issuer -dates
    cat <<LOOK

Look around (source $STATE/env first):
  kubectl -n $NS get pods,svc,ingress,secrets,leases
  kubectl -n $NS get pod -l app=web -o jsonpath='{.items[0].spec.initContainers[*].name}'
  kubectl -n $NS get ingress web -o yaml        # the HTTP-01 route sidecert added
  kubectl -n $NS get events --sort-by=.lastTimestamp
  ls $LOGS/pods/                                # every container's log
Stop everything: make demo-down
LOOK
    exit 0
  fi
  sleep 1
done
printf '\n' >&2
kubectl -n "$NS" get pods,events >&2 || true
die "no certificate after 180 s; see $LOGS"
