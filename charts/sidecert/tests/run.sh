#!/usr/bin/env bash
# Chart unit tests: render charts/sidecert with several value sets and check the parts that
# branch on values. Needs helm and python3 with PyYAML; no cluster.
#   charts/sidecert/tests/run.sh            (HELM=path/to/helm to choose the binary)
# Prints one line per check and "N passed, N failed"; exits non-zero on any failure.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
chart=$(dirname "$here")
repo=$(cd "$chart/../.." && pwd)
HELM=${HELM:-$repo/e2e/.cache/bin/helm}
NS=sidecert-system
passed=0
failed=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

python3 -c 'import yaml' 2>/dev/null || { echo "python3 with PyYAML is required" >&2; exit 2; }
[[ -x $HELM ]] || { echo "helm not found at $HELM (make tools, or set HELM)" >&2; exit 2; }

# The checks are Python expressions over the rendered documents, with these helpers.
cat >"$tmp/check.py" <<'EOF'
import os, re, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
def all_of(kind): return [d for d in docs if d["kind"] == kind]
def one(kind, name=None):
    found = [d for d in all_of(kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]
def has(kind): return bool(all_of(kind))
def keys(x):
    """Every mapping key anywhere in x."""
    if isinstance(x, dict): return set(x) | set().union(*map(keys, x.values()))
    if isinstance(x, list): return set().union(*map(keys, x))
    return set()
def container(): return one("Deployment")["spec"]["template"]["spec"]["containers"][0]
def args(): return container()["args"]
def arg(flag):
    """The value of --flag=value in the webhook's args, or None."""
    vals = [a.split("=", 1)[1] for a in args() if a.startswith(flag + "=")]
    assert len(vals) <= 1, f"{flag} given {len(vals)} times"
    return vals[0] if vals else None
def cleanup_args(): return one("Job")["spec"]["template"]["spec"]["containers"][0]["args"]
def flags(words): return [m.group(0) for w in words if (m := re.match(r"--[a-z0-9-]+", w))]
def known_flags(help_file):
    unknown = sorted(set(flags(args())) - set(flags(open(help_file).read().split())))
    if unknown: print("    not in the binary:", " ".join(unknown))
    return not unknown
def hook(name): return [w for w in one("MutatingWebhookConfiguration")["webhooks"] if w["name"] == name][0]
def pods(): return hook("pods.sidecert.io")
def ingresses(): return hook("ingresses.sidecert.io")
def ok(expr):
    try:
        result = eval(expr)
    except Exception as e:
        print(f"    {type(e).__name__}: {e}")
        return False
    return result is True or (result and result is not None)
sys.exit(0 if ok(sys.argv[2]) else 1)
EOF

pass() { passed=$((passed + 1)); printf '  ok    %s\n' "$1"; }
fail() { failed=$((failed + 1)); printf '  FAIL  %s\n' "$1"; }

# render NAME [helm template args...]: renders into $tmp/NAME.yaml; a render error fails.
render() {
	local name=$1; shift
	echo "$name"
	if "$HELM" template sidecert "$chart" -n "$NS" --kube-version 1.35.0 "$@" >"$tmp/$name.yaml" 2>"$tmp/$name.err"; then
		pass "renders"
	else
		fail "renders: $(head -c 400 "$tmp/$name.err")"
	fi
}

# check NAME 'python expression' [description]
check() {
	local name=$1 expr=$2 desc=${3:-$2}
	if python3 "$tmp/check.py" "$tmp/$name.yaml" "$expr"; then pass "$desc"; else fail "$desc"; fi
}

# refuse DESC 'expected error text' [helm template args...]: the render must fail with it.
refuse() {
	local desc=$1 want=$2; shift 2
	local out
	if out=$("$HELM" template sidecert "$chart" -n "$NS" --kube-version 1.35.0 "$@" 2>&1 >/dev/null); then
		fail "$desc: rendered, expected an error"
	elif grep -qF -- "$want" <<<"$out"; then
		pass "$desc"
	else
		fail "$desc: error without \"$want\": $(head -c 400 <<<"$out")"
	fi
}

render defaults
check defaults '{d["kind"] for d in docs} == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "Service", "Deployment", "PodDisruptionBudget", "MutatingWebhookConfiguration", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding", "Job"}' \
	"exactly the default kinds (no ServiceMonitor, NetworkPolicy, ConfigMap)"
check defaults '"caBundle" not in keys(docs)' "caBundle is never set"
check defaults 'one("ValidatingAdmissionPolicy")["spec"]["matchConditions"][0]["expression"] == "request.userInfo.username == \"system:serviceaccount:sidecert-system:sidecert-webhook\"" and one("ValidatingAdmissionPolicyBinding")["spec"] == {"policyName": one("ValidatingAdmissionPolicy")["metadata"]["name"], "validationActions": ["Deny"]}' \
	"namespace guard: a Deny policy for the webhook's ServiceAccount"
check defaults '{r for x in one("ValidatingAdmissionPolicy")["spec"]["matchConstraints"]["resourceRules"] for r in x["resources"]} >= {w for x in one("ClusterRole")["rules"] if set(x["verbs"]) & {"create", "update", "patch", "delete"} and x["apiGroups"] != ["admissionregistration.k8s.io"] for w in x["resources"]}' \
	"namespace guard: covers every namespaced resource the ClusterRole may write"
check defaults '"\"sidecert-webhook-ca\"" in [v for v in one("ValidatingAdmissionPolicy")["spec"]["variables"] if v["name"] == "own"][0]["expression"] and "\"sidecert-webhook-leader\"" in [v for v in one("ValidatingAdmissionPolicy")["spec"]["variables"] if v["name"] == "own"][0]["expression"]' \
	"namespace guard: in the release namespace only the CA Secret and the leader Lease by name"
check defaults 'args()[:2] == ["serve", "--self-signed"] and arg("--namespace") == "sidecert-system"' "serve --self-signed --namespace=<release namespace>"
check defaults 'container()["command"] == ["/sidecert-webhook"]' "command /sidecert-webhook"
check defaults 'arg("--webhook-configuration-name") == one("MutatingWebhookConfiguration")["metadata"]["name"] == "sidecert"' \
	"--webhook-configuration-name is the configuration's name"
check defaults '[x["resourceNames"] for x in one("ClusterRole")["rules"] if x["resources"] == ["mutatingwebhookconfigurations"]] == [[arg("--webhook-configuration-name")]]' \
	"ClusterRole patches only that configuration"
check defaults 'arg("--service-name") == one("Service")["metadata"]["name"] == pods()["clientConfig"]["service"]["name"] == "sidecert-webhook"' \
	"--service-name is the Service the API server calls"
check defaults 'arg("--ca-secret-name") == "sidecert-webhook-ca" and one("Role")["rules"][0]["resourceNames"] == ["sidecert-webhook-ca"]' \
	"--ca-secret-name matches the Role's resourceNames"
check defaults 'one("Service")["spec"]["ports"][0] == {"name": "https", "port": 443, "targetPort": "https", "protocol": "TCP"}' "Service 443 -> https"
check defaults 'pods()["failurePolicy"] == "Fail" and ingresses()["failurePolicy"] == "Ignore"' "failurePolicy Fail for Pods, Ignore for Ingresses"
check defaults 'pods()["rules"][0]["operations"] == ["CREATE"] and ingresses()["rules"][0]["operations"] == ["CREATE", "UPDATE"]' \
	"Pods on CREATE only, Ingresses on CREATE and UPDATE"
check defaults 'all(w["sideEffects"] == "NoneOnDryRun" and w["admissionReviewVersions"] == ["v1"] and w["matchPolicy"] == "Equivalent" and w["timeoutSeconds"] == 10 for w in (pods(), ingresses()))' \
	"sideEffects NoneOnDryRun, v1, Equivalent, timeout 10"
check defaults 'all(w["namespaceSelector"] == {"matchLabels": {"sidecert.io/injection": "enabled"}, "matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["kube-system", "kube-public", "kube-node-lease", "sidecert-system"]}]} for w in (pods(), ingresses()))' \
	"namespaceSelector: labelled, not kube-* nor the release namespace"
check defaults 'pods()["objectSelector"]["matchExpressions"][0]["key"] in one("Deployment")["spec"]["template"]["metadata"]["labels"]' \
	"the Pod webhook skips the webhook's own Pods"
check defaults 'one("Deployment")["spec"]["replicas"] == 2 and one("PodDisruptionBudget")["spec"]["minAvailable"] == 1' "2 replicas, PDB minAvailable 1"
check defaults 'one("Deployment")["spec"]["template"]["spec"]["topologySpreadConstraints"][0]["whenUnsatisfiable"] == "ScheduleAnyway"' "spread across nodes"
check defaults 'container()["securityContext"]["readOnlyRootFilesystem"] and container()["securityContext"]["capabilities"]["drop"] == ["ALL"] and one("Deployment")["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] and one("Deployment")["spec"]["template"]["spec"]["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"' \
	"non-root, read-only root, no capabilities, RuntimeDefault seccomp"
check defaults 'container()["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "https", "scheme": "HTTPS"} and container()["livenessProbe"]["httpGet"]["path"] == "/healthz"' "HTTPS probes"
check defaults 'container()["image"] == "ghcr.io/sidecert/webhook:0.1.0" and arg("--sidecar-image") == "ghcr.io/sidecert/sidecar:0.1.0"' "images tagged with appVersion"
check defaults 'arg("--acme-server") == "letsencrypt" and arg("--acme-email") is None and arg("--acme-ca-bundle-file") is None' \
	"unset values pass no flag"

check defaults '[arg(f) for f in ("--ca-validity", "--ca-rotate-before", "--serving-validity", "--serving-rotate-before")] == ["365d", "90d", "7d", "2d"]' \
	"certificate lifetimes default to the webhook's own"

check defaults '[arg(f) for f in ("--reconcile", "--rollout-restart", "--reconcile-interval", "--shutdown-delay")] == ["true", "true", "5m", "5s"]' \
	"reconciler on, rollout restarts on, shutdown delay 5s"
check defaults 'arg("--leader-lease-name") == "sidecert-webhook-leader" and [r for r in one("Role")["rules"] if r.get("resourceNames") == [arg("--leader-lease-name")]][0]["verbs"] == ["get", "update", "patch"]' \
	"--leader-lease-name matches the Role's Lease rule"
check defaults '{(g, r): v for x in one("ClusterRole")["rules"] for g in x["apiGroups"] for r in x["resources"] for v in [x["verbs"]]}.items() >= {("apps", "deployments"): ["get", "patch"], ("apps", "replicasets"): ["get"], ("", "pods"): ["list"], ("", "namespaces"): ["list", "watch"]}.items()' \
	"ClusterRole: the reconciler reads Pods and namespaces, restarts workloads"
check defaults 'all("delete" not in x["verbs"] or x["resources"] in (["services"], ["roles"], ["rolebindings"], ["httproutes"]) or (x["resources"] == ["mutatingwebhookconfigurations"] and x.get("resourceNames") == ["sidecert"]) for x in one("ClusterRole")["rules"]) and "patch" in [v for x in one("ClusterRole")["rules"] if x["resources"] == ["ingresses"] for v in x["verbs"]]' \
	"ClusterRole: deletes only Services, Roles, RoleBindings and HTTPRoutes (its own, per the policy) and its MutatingWebhookConfiguration, patches Ingresses"
check defaults '"variables.cleanup" in one("ValidatingAdmissionPolicy")["spec"]["validations"][0]["expression"] and "-sidecert-solver" in [v for v in one("ValidatingAdmissionPolicy")["spec"]["variables"] if v["name"] == "ownDelete"][0]["expression"] and any("variables.ownDelete" in v["expression"] and "DELETE" in v["expression"] for v in one("ValidatingAdmissionPolicy")["spec"]["validations"][1:])' \
	"the policy lets the webhook clean up only its own objects in unlabelled namespaces, and delete no Role, RoleBinding or Service but its own anywhere"
check defaults '[x["verbs"] for x in one("ClusterRole")["rules"] if x["resources"] == ["endpointslices"] and x["apiGroups"] == ["discovery.k8s.io"] and "resourceNames" not in x] == [["list", "watch"]]' \
	"ClusterRole: holds list/watch on EndpointSlices, which it delegates to the sidecar's Role"

render overrides --set webhook.failurePolicy.pods=Ignore --set webhook.failurePolicy.ingresses=Fail --set webhook.timeoutSeconds=5 \
	--set acme.email=ops@example.com --set acme.server=https://acme.example/dir --set acme.profile=shortlived \
	--set 'acme.allowedServers={https://ca.example/dir,letsencrypt-staging}' \
	--set 'acme.allowedDomains={shop.example.com,*.shop.example.com}' --set reconciler.hostClaimReleaseAfter=1h \
	--set certificates.servingValidity=10m --set sidecar.resources.limits.cpu=100m --set webhook.extraArgs[0]=--workers=2
check overrides 'pods()["failurePolicy"] == "Ignore" and ingresses()["failurePolicy"] == "Fail"' "failurePolicy overrides"
check overrides 'pods()["timeoutSeconds"] == ingresses()["timeoutSeconds"] == 5' "timeoutSeconds override"
check overrides 'arg("--acme-email") == "ops@example.com" and arg("--acme-server") == "https://acme.example/dir" and arg("--acme-profile") == "shortlived"' "ACME flags"
check overrides 'arg("--allowed-acme-servers") == "https://ca.example/dir,letsencrypt-staging"' "allowed ACME servers, comma separated"
check defaults 'arg("--allowed-acme-servers") is None' "no extra ACME servers by default"
refuse "an allowed ACME server that is not https" "allowedServers" --set 'acme.allowedServers={http://ca.example/dir}'
check overrides 'arg("--allowed-domains") == "shop.example.com,*.shop.example.com" and arg("--host-claim-release-after") == "1h"' "allowed domains, comma separated; claim release delay"
check defaults 'arg("--allowed-domains") is None and arg("--host-claim-release-after") == "15m"' "any domain by default; claims released after 15m"
refuse "an allowed domain that is not a name" "allowedDomains" --set 'acme.allowedDomains={shop example}'
for short in 90s 1m 500ms; do
	refuse "a claim release delay under 2m ($short)" "hostClaimReleaseAfter" --set reconciler.hostClaimReleaseAfter=$short
done
check defaults '"sidecert-host-" in [v for v in one("ValidatingAdmissionPolicy")["spec"]["variables"] if v["name"] == "own"][0]["expression"] and ["get", "list", "update", "delete"] in [x["verbs"] for x in one("Role")["rules"] if x["resources"] == ["leases"]]' \
	"the webhook writes and deletes host claims in its own namespace"
check overrides 'arg("--serving-validity") == "10m" and arg("--sidecar-cpu-limit") == "100m" and args()[-1] == "--workers=2"' "certificate, sidecar and extra flags"

check defaults 'one("Job")["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete" and cleanup_args()[0] == "cleanup" and "--deployment=sidecert-webhook" in cleanup_args() and one("Job")["spec"]["template"]["spec"]["serviceAccountName"] == one("Deployment")["spec"]["template"]["spec"]["serviceAccountName"]' \
	"uninstall: a pre-delete Job cleans up as the webhook, stopping its Deployment first"
check defaults 'not set(one("Job")["spec"]["template"]["metadata"]["labels"].items()) >= set(one("Deployment")["spec"]["selector"]["matchLabels"].items())' \
	"the cleanup Job's Pod is not one the webhook Deployment selects (it waits for those to go)"
check defaults '"delete" in [x for x in one("ClusterRole")["rules"] if x["resources"] == ["mutatingwebhookconfigurations"]][0]["verbs"] and [x["resourceNames"] for x in one("Role")["rules"] if x["resources"] == ["deployments/scale"]] == [["sidecert-webhook"]]' \
	"the cleanup may delete the MutatingWebhookConfiguration and scale its own Deployment, by name"
render nocleanup --set cleanupOnUninstall=false
check nocleanup 'not has("Job")' "cleanupOnUninstall=false: no Job"

render servicemonitor --set metrics.serviceMonitor.enabled=true --set metrics.serviceMonitor.labels.release=prom
check servicemonitor 'one("ServiceMonitor")["spec"]["endpoints"][0]["port"] == "metrics" and one("Service")["spec"]["ports"][1]["name"] == "metrics"' "ServiceMonitor scrapes the metrics port"
check servicemonitor 'one("ServiceMonitor")["metadata"]["labels"]["release"] == "prom"' "ServiceMonitor labels"
check servicemonitor 'one("ServiceMonitor")["spec"]["selector"]["matchLabels"].items() <= one("Service")["metadata"]["labels"].items()' "ServiceMonitor selects the Service"

render networkpolicy --set networkPolicy.enabled=true --set networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.name=monitoring
check networkpolicy 'one("NetworkPolicy")["spec"]["podSelector"]["matchLabels"] == one("Deployment")["spec"]["selector"]["matchLabels"]' "NetworkPolicy selects the webhook Pods"
check networkpolicy 'one("NetworkPolicy")["spec"]["ingress"][0] == {"ports": [{"port": "https", "protocol": "TCP"}]}' "HTTPS open to the API server"
check networkpolicy 'one("NetworkPolicy")["spec"]["ingress"][1]["from"] == [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]' "metrics only from metricsFrom"

# One replica: no PDB (minAvailable 1 of 1 blocks every drain; minAvailable 0 protects nothing).
render single --set webhook.replicas=1
check single 'not has("PodDisruptionBudget") and one("Deployment")["spec"]["replicas"] == 1' "replicas 1: no PodDisruptionBudget"
render nopdb --set webhook.replicas=3 --set webhook.podDisruptionBudget.enabled=false
check nopdb 'not has("PodDisruptionBudget")' "podDisruptionBudget.enabled false: none"

render cabundle --set-file acme.caBundle="$here/testdata/ca.crt"
check cabundle 'one("ConfigMap")["data"]["ca.crt"].startswith("-----BEGIN CERTIFICATE-----")' "caBundle in a ConfigMap"
check cabundle 'arg("--acme-ca-bundle-file") == "/etc/sidecert/acme-ca/ca.crt" and container()["volumeMounts"][0]["mountPath"] == "/etc/sidecert/acme-ca"' "mounted and passed as a file"
check cabundle '"checksum/acme-ca-bundle" in one("Deployment")["spec"]["template"]["metadata"]["annotations"]' "Pods roll when it changes"
render clientca --set-file webhook.clientCA="$here/testdata/ca.crt"
check clientca 'one("ConfigMap", "sidecert-webhook-client-ca")["data"]["ca.crt"].startswith("-----BEGIN CERTIFICATE-----") and arg("--client-ca-file") == "/etc/sidecert/client-ca/ca.crt"' \
	"webhook.clientCA in a ConfigMap, passed as --client-ca-file"
check clientca '{"name": "client-ca", "mountPath": "/etc/sidecert/client-ca", "readOnly": True} in container()["volumeMounts"] and "checksum/client-ca" in one("Deployment")["spec"]["template"]["metadata"]["annotations"]' \
	"mounted; Pods roll when it changes"
check defaults 'arg("--client-ca-file") is None' "no client CA by default"
render cabundlefile --set acme.caBundleFile=/host/pebble-ca.crt
check cabundlefile 'arg("--acme-ca-bundle-file") == "/host/pebble-ca.crt" and not has("ConfigMap") and "volumes" not in one("Deployment")["spec"]["template"]["spec"]' \
	"caBundleFile passed as is, nothing mounted"

render noreconciler --set reconciler.enabled=false --set reconciler.rolloutRestart=false --set reconciler.interval=10m --set webhook.shutdownDelay=15s
check noreconciler 'arg("--reconcile") == "false" and arg("--rollout-restart") == "false" and arg("--reconcile-interval") == "10m" and arg("--shutdown-delay") == "15s"' \
	"reconciler values become flags"

render renamed --set fullnameOverride=acme-injector --set certificates.caSecretName=my-ca
check renamed 'arg("--webhook-configuration-name") == one("MutatingWebhookConfiguration")["metadata"]["name"] == "acme-injector"' "renamed: configuration name follows"
check renamed 'arg("--service-name") == pods()["clientConfig"]["service"]["name"] == "acme-injector-webhook" and arg("--ca-secret-name") == "my-ca"' "renamed: Service and CA Secret follow"
check renamed 'arg("--leader-lease-name") == "acme-injector-webhook-leader" and any(r.get("resourceNames") == ["acme-injector-webhook-leader"] for r in one("Role")["rules"])' \
	"renamed: leader Lease follows the fullname"
check renamed '"\"system:serviceaccount:sidecert-system:acme-injector-webhook\"" in one("ValidatingAdmissionPolicy")["spec"]["matchConditions"][0]["expression"] and "\"my-ca\"" in [v for v in one("ValidatingAdmissionPolicy")["spec"]["variables"] if v["name"] == "own"][0]["expression"]' \
	"renamed: the namespace guard follows the ServiceAccount and the CA Secret"

# Strict RBAC: the namespaced rights are bound only where listed; cluster-wide only reads
# and its own webhook configuration.
render strict --set 'rbac.namespaces={shop,blog}'
check strict '[d["metadata"]["name"] for d in all_of("ClusterRole")] == ["sidecert-webhook", "sidecert:webhook"] and [d["roleRef"]["name"] for d in all_of("ClusterRoleBinding")] == ["sidecert-webhook"]' \
	"strict: a ClusterRole for what is cluster-wide (bound), one for the rest (not bound cluster-wide)"
check strict 'all(set(x["verbs"]) <= {"get", "list", "watch"} or x.get("resourceNames") == ["sidecert"] for x in one("ClusterRole", "sidecert-webhook")["rules"]) and {r for x in one("ClusterRole", "sidecert-webhook")["rules"] for r in x["resources"]} == {"ingresses", "services", "namespaces", "gateways", "listenersets", "httproutes", "mutatingwebhookconfigurations"}' \
	"strict: cluster-wide only reads of Ingresses, Services, Namespaces and the Gateway API objects, and its own webhook configuration"
check strict '{r for x in one("ClusterRole", "sidecert:webhook")["rules"] for r in x["resources"]} >= {"secrets", "roles", "rolebindings", "leases", "events", "pods"}' \
	"strict: Secrets, Roles, RoleBindings, Leases, Events and Pods only in the namespaced ClusterRole"
check strict 'sorted((d["metadata"]["namespace"], d["metadata"]["name"], d["roleRef"]["kind"], d["roleRef"]["name"]) for d in all_of("RoleBinding") if d["metadata"]["namespace"] != "sidecert-system") == [("blog", "sidecert:webhook", "ClusterRole", "sidecert:webhook"), ("shop", "sidecert:webhook", "ClusterRole", "sidecert:webhook")] and all(d["subjects"] == [{"kind": "ServiceAccount", "name": "sidecert-webhook", "namespace": "sidecert-system"}] for d in all_of("RoleBinding"))' \
	"strict: bound by a RoleBinding in each namespace listed, to the webhook's ServiceAccount"
check strict 'all({"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["shop", "blog"]} in w["namespaceSelector"]["matchExpressions"] for w in one("MutatingWebhookConfiguration")["webhooks"])' \
	"strict: the webhook configuration selects only the namespaces listed"
check strict 'arg("--reconcile-namespace-selector") == "sidecert.io/injection=enabled,kubernetes.io/metadata.name in (shop,blog)" and "--namespace-selector=sidecert.io/injection=enabled,kubernetes.io/metadata.name in (shop,blog)" in cleanup_args()' \
	"strict: the webhook and the uninstall cleanup serve only the namespaces listed (and labelled)"
check strict '{"apiGroups": ["apps"], "resources": ["deployments"], "resourceNames": ["sidecert-webhook"], "verbs": ["get"]} in one("Role")["rules"] and {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]} in one("Role")["rules"]' \
	"strict: the uninstall cleanup reads its own Deployment by name and lists its Pods in the release namespace"
render strictlong --set fullnameOverride=aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa --set 'rbac.namespaces={shop}'
check strictlong 'len({d["metadata"]["name"] for d in all_of("ClusterRole")}) == 2 and [d["roleRef"]["name"] for d in all_of("ClusterRoleBinding")] == [all_of("ClusterRole")[0]["metadata"]["name"]]' \
	"strict, a 63-character fullname: the namespaced ClusterRole never takes the bound one's name"
check defaults 'arg("--reconcile-namespace-selector") == "sidecert.io/injection=enabled" and len(all_of("RoleBinding")) == 1 and all(len(w["namespaceSelector"]["matchExpressions"]) == 1 for w in one("MutatingWebhookConfiguration")["webhooks"])' \
	"default: every labelled namespace, no RoleBinding outside the release namespace"
check strict '{r for x in one("ValidatingAdmissionPolicy")["spec"]["matchConstraints"]["resourceRules"] for r in x["resources"]} >= {w for x in one("ClusterRole", "sidecert:webhook")["rules"] if set(x["verbs"]) & {"create", "update", "patch", "delete"} for w in x["resources"]}' \
	"strict: the namespace guard still covers every write (labelled as well as listed)"
refuse "strict: kube-system" 'sidecert never serves "kube-system"' --set 'rbac.namespaces={shop,kube-system}'
refuse "strict: the release namespace" 'sidecert never serves "sidecert-system"' --set 'rbac.namespaces={sidecert-system}'
refuse "strict: not a namespace name" "rbac/namespaces/0" --set 'rbac.namespaces={Shop_1}'

render reserved --set 'webhook.reservedSources={10.0.0.10/32,fd00::/64}'
check reserved 'arg("--reserved-sources") == "10.0.0.10/32,fd00::/64"' "webhook.reservedSources passed as --reserved-sources"
check defaults 'arg("--reserved-sources") is None' "no --reserved-sources by default"
refuse "a reserved source that is no address" "reservedSources" --set 'webhook.reservedSources={apiserver}'

render noguard --set rbac.namespaceGuard=false
check noguard 'not has("ValidatingAdmissionPolicy") and not has("ValidatingAdmissionPolicyBinding")' "rbac.namespaceGuard=false: no policy"

# Every flag the chart passes must exist in the webhook binary (when one is built that has
# --self-signed; skipped otherwise, e.g. on a clean clone before `make build`; `make test`
# builds first).
echo "flags known to the webhook binary"
webhook_bin=${SIDECERT_WEBHOOK_BIN:-$repo/target/debug/sidecert-webhook}
if [[ -x $webhook_bin ]] && "$webhook_bin" serve --help >"$tmp/help.txt" 2>&1 && grep -q -- '--self-signed' "$tmp/help.txt"; then
	for r in defaults overrides cabundle noreconciler strict reserved; do
		HELP_FILE=$tmp/help.txt check "$r" 'known_flags(os.environ["HELP_FILE"])' \
			"$r: every flag passed is in \`sidecert-webhook serve --help\`"
	done
else
	echo "  skip  $webhook_bin is missing or has no --self-signed yet"
fi

if [[ -x $webhook_bin ]] && "$webhook_bin" cleanup --help >"$tmp/cleanup-help.txt" 2>&1; then
	HELP_FILE=$tmp/cleanup-help.txt check defaults 'not (set(flags(cleanup_args())) - set(flags(open(os.environ["HELP_FILE"]).read().split())))' \
		"the cleanup Job's flags are in \`sidecert-webhook cleanup --help\`"
fi

echo "schema and input errors"
refuse "typo in a key" "additional properties 'replica' not allowed" --set webhook.replica=3
refuse "typo at the top level" "additional properties 'acmee' not allowed" --set acmee.email=x@y.z
refuse "wrong failurePolicy" "failurePolicy/pods" --set webhook.failurePolicy.pods=fail
refuse "timeoutSeconds above 30" "timeoutSeconds" --set webhook.timeoutSeconds=31
refuse "unknown key algorithm" "keyAlgorithm" --set acme.keyAlgorithm=ed25519
refuse "bad duration" "caValidity" --set certificates.caValidity=1year
refuse "typo in reconciler" "additional properties 'rollout' not allowed" --set reconciler.rollout=false
refuse "reconciler.enabled not a boolean" "reconciler/enabled" --set-string reconciler.enabled=yes
refuse "bad shutdownDelay" "shutdownDelay" --set webhook.shutdownDelay=soon
refuse "caBundle that is no PEM" "caBundle" --set acme.caBundle=hello
refuse "clientCA that is no PEM" "clientCA" --set webhook.clientCA=hello
refuse "caBundle and caBundleFile" "mutually exclusive" --set-file acme.caBundle="$here/testdata/ca.crt" --set acme.caBundleFile=/x

echo
echo "$passed passed, $failed failed"
((failed == 0))
