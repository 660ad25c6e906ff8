#!/usr/bin/env bash
# Brings up the local plane: bridge, etcd, kube-apiserver, kube-controller-manager,
# pebble-challtestsrv, Pebble, the node (node.sh: registry, containerd, kube-scheduler,
# kube-proxy, kubelet), the ingress controller (ingress.sh: Traefik) and plane-dns
# (`sidecert-e2e plane-dns`, Pebble's DNS records).
# Idempotent: a running plane is reported and reused. On any failure everything this run
# started is stopped again, so there is never a half-started plane.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ $EUID -eq 0 ]] || die "the plane needs root (network namespaces, a bridge, bind mounts); run as root"

if plane_running; then
  say "the local plane is already running; reusing it (make cluster-down stops it)"
  "$E2E/scripts/node.sh" push
  exit 0
fi
if compgen -G "$PIDS/*.pid" >/dev/null; then
  say "found a partly running plane; stopping it first"
  "$E2E/scripts/cluster-down.sh"
fi

for tool in etcd kube-apiserver kube-controller-manager pebble pebble-challtestsrv; do
  [[ -x "$BIN/$tool" ]] || die "$BIN/$tool is missing; build it with: make tools"
done
plane_dns_bin="${SIDECERT_E2E_BIN:-$REPO/target/debug/sidecert-e2e}"
[[ -x "$plane_dns_bin" ]] || die "$plane_dns_bin is missing; build it with: cargo build --bins"
command -v kubectl >/dev/null || die "kubectl is not on PATH"
command -v ip >/dev/null || die "ip (iproute2) is not installed: apt-get install iproute2"

# Ports we are about to take must be free.
require_free_ports "$ETCD_CLIENT" "$ETCD_PEER" "$CHALLTESTSRV_DNS" "$CHALLTESTSRV_MGMT" "127.0.0.1:$KCM_PORT"

started=0
cleanup_on_failure() {
  local rc=$?
  trap '' INT TERM PIPE
  if [[ $rc -ne 0 && $started -eq 1 ]]; then
    say "cluster-up failed; stopping what it started (logs stay in $LOGS)"
    "$E2E/scripts/cluster-down.sh" || true
  fi
}
trap cleanup_on_failure EXIT

mkdir -p "$PIDS" "$LOGS" "$STATE/pebble"
"$E2E/scripts/pki.sh" || die "making certificates failed; retry with: make cluster-up"

# Starts a component (lib.sh) and notes that this run started something.
start() { # name command...
  start_component "$@"
  started=1
}

# The bridge the Pods' veths attach to; its address is where Pods reach the host.
if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
  say "creating bridge $BRIDGE ($GATEWAY)"
  ip link add "$BRIDGE" type bridge
  started=1
fi
ip addr replace "$GATEWAY/24" dev "$BRIDGE"
ip link set "$BRIDGE" up
# Service ClusterIPs are only ever translated by kube-proxy; the route makes the host send
# them to the bridge, not to its default route (there may be none).
ip route replace "$SERVICE_CIDR" dev "$BRIDGE"
# Only now is the gateway address this host's own, so a connection to it tells a taken port.
require_free_ports "$GATEWAY:$API_PORT" "$GATEWAY:$PEBBLE_PORT" "$GATEWAY:$PEBBLE_MGMT_PORT"

rm -rf "$STATE/etcd"
start etcd "$BIN/etcd" --name sidecert-local --data-dir "$STATE/etcd" \
  --listen-client-urls "http://$ETCD_CLIENT" --advertise-client-urls "http://$ETCD_CLIENT" \
  --listen-peer-urls "http://$ETCD_PEER" --initial-advertise-peer-urls "http://$ETCD_PEER" \
  --initial-cluster "sidecert-local=http://$ETCD_PEER" --log-level warn \
  --quota-backend-bytes 2147483648 --unsafe-no-fsync
wait_until etcd 30 curl -sf "http://$ETCD_CLIENT/health"

# The API server presents a client certificate to every admission webhook (as a cluster
# whose operator turned on webhook.clientCA would): the chart's install in the scenarios
# trusts its CA, and /mutate answers nothing else.
cat >"$STATE/webhook-client.kubeconfig" <<KCFG
apiVersion: v1
kind: Config
users:
- name: "*"
  user:
    client-certificate: $PKI/webhook-client.crt
    client-key: $PKI/webhook-client.key
KCFG
cat >"$STATE/admission.yaml" <<ADM
apiVersion: apiserver.config.k8s.io/v1
kind: AdmissionConfiguration
plugins:
- name: MutatingAdmissionWebhook
  configuration:
    apiVersion: apiserver.config.k8s.io/v1
    kind: WebhookAdmissionConfiguration
    kubeConfigFile: $STATE/webhook-client.kubeconfig
- name: ValidatingAdmissionWebhook
  configuration:
    apiVersion: apiserver.config.k8s.io/v1
    kind: WebhookAdmissionConfiguration
    kubeConfigFile: $STATE/webhook-client.kubeconfig
ADM
start kube-apiserver "$BIN/kube-apiserver" \
  --admission-control-config-file "$STATE/admission.yaml" \
  --etcd-servers "http://$ETCD_CLIENT" \
  --bind-address "$GATEWAY" --advertise-address "$GATEWAY" --secure-port "$API_PORT" \
  --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
  --client-ca-file "$PKI/ca.crt" \
  --service-account-issuer https://kubernetes.default.svc.cluster.local \
  --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
  --authorization-mode Node,RBAC \
  --service-cluster-ip-range "$SERVICE_CIDR" \
  --enable-aggregator-routing=true \
  --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt" --kubelet-client-key "$PKI/apiserver-kubelet-client.key" \
  --kubelet-certificate-authority "$PKI/ca.crt" --kubelet-preferred-address-types InternalIP \
  --allow-privileged=true \
  --profiling=false \
  --event-ttl 30m
cat >"$STATE/kubeconfig" <<KCFG
apiVersion: v1
kind: Config
clusters:
- name: sidecert-local
  cluster:
    server: https://$GATEWAY:$API_PORT
    certificate-authority-data: $(base64 -w0 "$PKI/ca.crt")
users:
- name: admin
  user:
    client-certificate-data: $(base64 -w0 "$PKI/admin.crt")
    client-key-data: $(base64 -w0 "$PKI/admin.key")
- name: controller-manager
  user:
    client-certificate-data: $(base64 -w0 "$PKI/controller-manager.crt")
    client-key-data: $(base64 -w0 "$PKI/controller-manager.key")
contexts:
- name: sidecert-local
  context: {cluster: sidecert-local, user: admin}
- name: controller-manager
  context: {cluster: sidecert-local, user: controller-manager}
current-context: sidecert-local
KCFG
chmod 600 "$STATE/kubeconfig"
sed 's/^current-context: .*/current-context: controller-manager/' "$STATE/kubeconfig" >"$STATE/controller-manager.kubeconfig"
wait_until kube-apiserver 90 kubectl_admin get --raw /readyz

# --flex-volume-plugin-dir: it would make /usr/libexec/kubernetes on the host otherwise.
start kube-controller-manager "$BIN/kube-controller-manager" \
  --kubeconfig "$STATE/controller-manager.kubeconfig" \
  --authentication-kubeconfig "$STATE/controller-manager.kubeconfig" \
  --authorization-kubeconfig "$STATE/controller-manager.kubeconfig" \
  --bind-address 127.0.0.1 --secure-port "$KCM_PORT" \
  --leader-elect=false \
  --use-service-account-credentials=true \
  --service-account-private-key-file "$PKI/sa.key" \
  --root-ca-file "$PKI/ca.crt" \
  --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key" \
  --service-cluster-ip-range "$SERVICE_CIDR" \
  --allocate-node-cidrs=false \
  --concurrent-deployment-syncs 5 --concurrent-replicaset-syncs 5 \
  --flex-volume-plugin-dir "$STATE/flexvolume"
wait_until kube-controller-manager 60 curl -skf "https://127.0.0.1:$KCM_PORT/healthz"

start pebble-challtestsrv "$BIN/pebble-challtestsrv" \
  -dnsserver "$CHALLTESTSRV_DNS" -management "$CHALLTESTSRV_MGMT" \
  -http01 "" -https01 "" -tlsalpn01 "" -doh "" -defaultIPv4 127.0.0.1 -defaultIPv6 ""
wait_until pebble-challtestsrv 20 curl -sf -X POST -d '{"host":"probe.sidecert.test"}' "http://$CHALLTESTSRV_MGMT/clear-a"

cat >"$STATE/pebble/config.json" <<PCFG
{
  "pebble": {
    "listenAddress": "$GATEWAY:$PEBBLE_PORT",
    "managementListenAddress": "$GATEWAY:$PEBBLE_MGMT_PORT",
    "certificate": "$PKI/pebble.crt",
    "privateKey": "$PKI/pebble.key",
    "httpPort": $PEBBLE_HTTP01_PORT,
    "tlsPort": 5001,
    "ocspResponderURL": "",
    "externalAccountBindingRequired": false,
    "retryAfter": {"authz": 1, "order": 1},
    "keyAlgorithm": "ecdsa",
    "profiles": {
      "default": {"description": "90-day certificates", "validityPeriod": 7776000},
      "shortlived": {"description": "120-second certificates, for renewal tests", "validityPeriod": 120}
    }
  }
}
PCFG
PEBBLE_VA_NOSLEEP=1 start pebble "$BIN/pebble" -config "$STATE/pebble/config.json" -dnsserver "$CHALLTESTSRV_DNS"
wait_until pebble 30 curl -sf --cacert "$PKI/pebble-ca.crt" "https://$GATEWAY:$PEBBLE_PORT/dir"

cat >"$STATE/env" <<ENV
# Written by e2e/scripts/cluster-up.sh: source it to use the local plane.
export KUBECONFIG="$STATE/kubeconfig"
export PEBBLE_DIRECTORY="https://$GATEWAY:$PEBBLE_PORT/dir"
export PEBBLE_CA_FILE="$PKI/pebble-ca.crt"
export WEBHOOK_CLIENT_CA_FILE="$PKI/webhook-client-ca.crt"
export PEBBLE_MANAGEMENT="https://$GATEWAY:$PEBBLE_MGMT_PORT"
export PEBBLE_HTTP_PORT=$PEBBLE_HTTP01_PORT
export CHALLTESTSRV_URL="http://$CHALLTESTSRV_MGMT"
export SIDECERT_PLANE_GATEWAY=$GATEWAY
# The ingress controller (Traefik): curl --resolve HOST:\$INGRESS_HTTPS_PORT:\$INGRESS_IP https://HOST:\$INGRESS_HTTPS_PORT/
export INGRESS_IP=$GATEWAY
export INGRESS_HTTP_PORT=$INGRESS_HTTP_PORT
export INGRESS_HTTPS_PORT=$INGRESS_HTTPS_PORT
export INGRESS_CLASS=traefik
# Gateway API (standard channel $GATEWAY_API_VERSION): a Gateway of this class, listeners on these ports.
export GATEWAY_CLASS=traefik
export GATEWAY_HTTP_PORT=$INGRESS_HTTP_PORT
export GATEWAY_HTTPS_PORT=$INGRESS_HTTPS_PORT
ENV

# The node: a real kubelet on containerd, with kube-scheduler and kube-proxy (node.sh).
"$E2E/scripts/node.sh" up
# No real component gives Pebble the records for Ingress hosts and Pod domains: plane-dns.
start plane-dns "$plane_dns_bin" plane-dns --kubeconfig "$STATE/kubeconfig" --challtestsrv "http://$CHALLTESTSRV_MGMT"
node_ready() {
  [[ "$(kubectl_admin get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" == True ]]
}
wait_until "the node (kubelet on containerd)" "${SIDECERT_NODE_WAIT:-60}" node_ready
# Every namespace gets its default ServiceAccount from the controller-manager.
wait_until "the default ServiceAccount" 60 kubectl_admin -n default get serviceaccount default
# The ingress controller every Ingress host resolves to (ingress.sh).
"$E2E/scripts/ingress.sh" up

trap - EXIT
cat >&2 <<DONE
==> the local plane is up
    source $STATE/env        # KUBECONFIG, PEBBLE_DIRECTORY, PEBBLE_CA_FILE, PEBBLE_MANAGEMENT
    kubectl get nodes,pods -A
    logs: $LOGS        stop: make cluster-down
DONE
