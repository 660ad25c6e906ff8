#!/usr/bin/env bash
# The plane's ingress controller: Traefik (built by make tools, image by images.sh), as a Pod
# on the node's network with its Kubernetes Ingress provider, the IngressClass "traefik"
# (the cluster's default), its Gateway API provider (the standard channel's CRDs, the
# GatewayClass "traefik") and the file provider reading $STATE/traefik/dynamic (where a
# scenario turns on an HTTP-to-HTTPS redirect).
#
#   e2e/scripts/ingress.sh up      (cluster-up.sh calls it once the node is Ready)
#
# Entrypoints, all on the node's address: web ($INGRESS_HTTP_PORT, Pebble's HTTP-01 port),
# websecure ($INGRESS_HTTPS_PORT, TLS for every router, certificates from the Ingresses'
# Secrets), traefik ($INGRESS_PING_PORT, /ping for the readiness probe). A Gateway's listeners
# must use the first two ports. Each Ingress and Gateway it serves gets the node's address in
# its status, which plane-dns publishes for its hosts.
# It goes with the node: node.sh down removes its container like every other.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DYNAMIC="$(mkdir -p "$STATE" && cd "$STATE" && pwd -P)/traefik/dynamic"

manifest() {
  cat <<YAML
apiVersion: v1
kind: Namespace
metadata:
  name: $INGRESS_NAMESPACE
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: traefik, namespace: $INGRESS_NAMESPACE}
---
# Traefik's documented rules for its Ingress provider, plus nodes: v3.7 routes nothing
# until it can list them.
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: sidecert-plane-traefik}
rules:
- apiGroups: [""]
  resources: [services, secrets, nodes]
  verbs: [get, list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
- apiGroups: [networking.k8s.io]
  resources: [ingresses, ingressclasses]
  verbs: [get, list, watch]
- apiGroups: [networking.k8s.io]
  resources: [ingresses/status]
  verbs: [update]
# Its Gateway API provider.
- apiGroups: [""]
  resources: [namespaces, configmaps]
  verbs: [get, list, watch]
- apiGroups: [gateway.networking.k8s.io]
  resources: [gatewayclasses, gateways, httproutes, grpcroutes, tlsroutes, referencegrants, backendtlspolicies]
  verbs: [get, list, watch]
- apiGroups: [gateway.networking.k8s.io]
  resources: [gatewayclasses/status, gateways/status, httproutes/status, grpcroutes/status, tlsroutes/status, backendtlspolicies/status]
  verbs: [update]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: sidecert-plane-traefik}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: sidecert-plane-traefik}
subjects:
- {kind: ServiceAccount, name: traefik, namespace: $INGRESS_NAMESPACE}
---
apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata:
  name: traefik
  annotations: {ingressclass.kubernetes.io/is-default-class: "true"}
spec:
  controller: traefik.io/ingress-controller
---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: traefik}
spec:
  controllerName: traefik.io/gateway-controller
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: traefik, namespace: $INGRESS_NAMESPACE}
spec:
  replicas: 1
  strategy: {type: Recreate}
  selector: {matchLabels: {app: traefik}}
  template:
    metadata: {labels: {app: traefik}}
    spec:
      serviceAccountName: traefik
      hostNetwork: true
      dnsPolicy: ClusterFirstWithHostNet
      terminationGracePeriodSeconds: 5
      securityContext:
        runAsNonRoot: true
        runAsUser: 65532
        runAsGroup: 65532
        seccompProfile: {type: RuntimeDefault}
      containers:
      - name: traefik
        image: sidecert.test/traefik:$TRAEFIK_VERSION
        imagePullPolicy: IfNotPresent
        # It looks for a configuration file in \$HOME/.config (flags only here); the image's
        # /home/nonroot is owned by root, mode 0700, so the lookup would fail on permissions.
        env: [{name: HOME, value: /tmp}]
        args:
        - --global.checkNewVersion=false
        - --global.sendAnonymousUsage=false
        - --log.level=INFO
        - --log.noColor=true
        - --accessLog=true
        - --entryPoints.web.address=$GATEWAY:$INGRESS_HTTP_PORT
        - --entryPoints.websecure.address=$GATEWAY:$INGRESS_HTTPS_PORT
        - --entryPoints.websecure.http.tls=true
        - --entryPoints.traefik.address=$GATEWAY:$INGRESS_PING_PORT
        - --ping=true
        - --ping.entryPoint=traefik
        - --providers.kubernetesIngress=true
        - --providers.kubernetesIngress.ingressEndpoint.ip=$GATEWAY
        - --providers.kubernetesGateway=true
        - --providers.kubernetesGateway.statusAddress.ip=$GATEWAY
        - --providers.file.directory=/etc/traefik/dynamic
        - --providers.file.watch=true
        readinessProbe:
          httpGet: {host: $GATEWAY, port: $INGRESS_PING_PORT, path: /ping}
          periodSeconds: 1
        securityContext:
          allowPrivilegeEscalation: false
          readOnlyRootFilesystem: true
          capabilities: {drop: [ALL]}
        volumeMounts:
        - {name: dynamic, mountPath: /etc/traefik/dynamic, readOnly: true}
      volumes:
      - name: dynamic
        hostPath: {path: $DYNAMIC, type: Directory}
YAML
}

up() {
  mkdir -p "$DYNAMIC"
  chmod 0755 "$DYNAMIC" "$(dirname "$DYNAMIC")"
  require_free_ports "$GATEWAY:$INGRESS_HTTP_PORT" "$GATEWAY:$INGRESS_HTTPS_PORT" "$GATEWAY:$INGRESS_PING_PORT"
  local crds="$E2E/.cache/gateway-api/$GATEWAY_API_VERSION"
  [[ -f "$crds/.complete" ]] || die "the Gateway API CRDs are missing from $crds; run make tools"
  say "installing the Gateway API $GATEWAY_API_VERSION CRDs (standard channel)"
  kubectl_admin apply --server-side --force-conflicts -f "$crds" >/dev/null
  # Every CRD of the folder (files gateway.networking.k8s.io_<plural>.yaml; the one
  # ValidatingAdmissionPolicy file is not a CRD).
  local names=() f
  for f in "$crds"/gateway.networking.k8s.io_*.yaml; do
    grep -q '^kind: CustomResourceDefinition$' "$f" || continue
    f=${f##*/gateway.networking.k8s.io_}
    names+=("crd/${f%.yaml}.gateway.networking.k8s.io")
  done
  kubectl_admin wait --for condition=Established --timeout 30s "${names[@]}" >/dev/null
  say "starting the ingress controller (Traefik $TRAEFIK_VERSION: Ingress and Gateway API providers)"
  manifest | kubectl_admin apply -f - >/dev/null
  kubectl_admin -n "$INGRESS_NAMESPACE" rollout status deployment/traefik --timeout "${SIDECERT_INGRESS_WAIT:-90}s" >&2 ||
    die "Traefik did not become ready; see: kubectl -n $INGRESS_NAMESPACE logs deploy/traefik"
}

case "${1:-}" in
  up) up ;;
  manifest) manifest ;;
  *) die "usage: $0 up|manifest" ;;
esac
