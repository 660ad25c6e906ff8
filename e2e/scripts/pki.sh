#!/usr/bin/env bash
# Makes the plane's certificates (once): the cluster CA, the API server's serving
# certificate, client certificates for the admin, the controller-manager, the scheduler,
# kube-proxy, the kubelet (system:node:*) and the API server's calls to the kubelet, the
# kubelet's serving certificate, the service-account signing key, a separate CA + serving
# certificate for Pebble's HTTPS, and a CA of its own for the client certificate the API
# server presents to admission webhooks (the chart's webhook.clientCA).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
mkdir -p "$PKI"
cd "$PKI"
command -v openssl >/dev/null || die "openssl is needed to make the plane's certificates (apt-get install openssl)"

ca() { # name cn
  openssl ecparam -name prime256v1 -genkey -noout -out "$1.key"
  openssl req -x509 -new -key "$1.key" -subj "/CN=$2" -days 3650 -sha256 \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign -out "$1.crt"
}
leaf() { # name ca subject ext...
  local name=$1 ca=$2 subj=$3; shift 3
  openssl ecparam -name prime256v1 -genkey -noout -out "$name.key"
  openssl req -new -key "$name.key" -subj "$subj" -out "$name.csr"
  printf '%s\n' "$@" >"$name.ext"
  openssl x509 -req -in "$name.csr" -CA "$ca.crt" -CAkey "$ca.key" -CAcreateserial -days 3650 -sha256 \
    -extfile "$name.ext" -out "$name.crt" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
}

webhook_client() {
  ca webhook-client-ca "sidecert-local webhook client ca"
  leaf webhook-client webhook-client-ca "/CN=kube-apiserver-webhook-client" "keyUsage=critical,digitalSignature" "extendedKeyUsage=clientAuth"
  chmod 600 webhook-client-ca.key webhook-client.key
}

# The marker names the set: a plane state from before a certificate was added is remade.
# The webhook client pair came later and stands apart (only the API server's flags read
# it), so a plane state that lacks it gets it without the rest being remade.
if [[ -f .complete.2 ]]; then
  [[ -f webhook-client.crt ]] || webhook_client
  exit 0
fi
rm -f ./*.crt ./*.key ./*.srl .complete

ca ca "sidecert-local-ca"
leaf apiserver ca "/CN=kube-apiserver" "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" \
  "subjectAltName=IP:$GATEWAY,IP:127.0.0.1,IP:10.214.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
leaf admin ca "/O=system:masters/CN=sidecert-admin" "keyUsage=critical,digitalSignature" "extendedKeyUsage=clientAuth"
leaf controller-manager ca "/CN=system:kube-controller-manager" "keyUsage=critical,digitalSignature" "extendedKeyUsage=clientAuth"
leaf scheduler ca "/CN=system:kube-scheduler" "keyUsage=critical,digitalSignature" "extendedKeyUsage=clientAuth"
leaf kube-proxy ca "/CN=system:kube-proxy" "keyUsage=critical,digitalSignature" "extendedKeyUsage=clientAuth"
leaf kubelet-client ca "/O=system:nodes/CN=system:node:$NODE_NAME" "keyUsage=critical,digitalSignature" "extendedKeyUsage=clientAuth"
leaf kubelet ca "/CN=$NODE_NAME" "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" \
  "subjectAltName=IP:$GATEWAY,IP:127.0.0.1,DNS:$NODE_NAME,DNS:localhost"
# system:masters is more than the kubelet API needs, but the plane's RBAC is not under test.
leaf apiserver-kubelet-client ca "/O=system:masters/CN=kube-apiserver-kubelet-client" "keyUsage=critical,digitalSignature" "extendedKeyUsage=clientAuth"
openssl genrsa -out sa.key 2048 2>/dev/null
openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
ca pebble-ca "sidecert-local pebble https ca"
leaf pebble pebble-ca "/CN=pebble" "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" \
  "subjectAltName=IP:$GATEWAY,IP:127.0.0.1,DNS:localhost,DNS:pebble"
webhook_client
chmod 600 ./*.key
touch .complete.2
