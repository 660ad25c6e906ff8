{{/* Chart name, at most 63 characters. */}}
{{- define "sidecert.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource-name prefix: the release name, plus the chart name unless it already holds it. */}}
{{- define "sidecert.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Deployment, Service, ServiceAccount and RBAC name. The Service name is also passed to
     --service-name: the webhook puts it into its serving certificate's DNS names. */}}
{{- define "sidecert.webhookName" -}}
{{- printf "%s-webhook" (include "sidecert.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The MutatingWebhookConfiguration (cluster-scoped), also passed to
     --webhook-configuration-name and used in the ClusterRole's resourceNames. */}}
{{- define "sidecert.webhookConfigurationName" -}}
{{- include "sidecert.fullname" . }}
{{- end }}

{{- define "sidecert.caSecretName" -}}
{{- default (printf "%s-webhook-ca" (include "sidecert.fullname" .)) .Values.certificates.caSecretName }}
{{- end }}

{{/* The Lease the webhook replicas elect the reconciler's leader on (--leader-lease-name). */}}
{{- define "sidecert.leaderLeaseName" -}}
{{- printf "%s-webhook-leader" (include "sidecert.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sidecert.clientCaConfigMapName" -}}
{{- printf "%s-webhook-client-ca" (include "sidecert.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sidecert.acmeCaConfigMapName" -}}
{{- printf "%s-acme-ca" (include "sidecert.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Where the webhook reads the ACME CA bundle, or nothing. */}}
{{- define "sidecert.acmeCaBundleFile" -}}
{{- if and .Values.acme.caBundle .Values.acme.caBundleFile }}
{{- fail "acme.caBundle and acme.caBundleFile are mutually exclusive: set one" }}
{{- else if .Values.acme.caBundle -}}
/etc/sidecert/acme-ca/ca.crt
{{- else -}}
{{ .Values.acme.caBundleFile }}
{{- end }}
{{- end }}

{{- define "sidecert.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "sidecert.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sidecert
{{- end }}

{{- define "sidecert.webhookSelectorLabels" -}}
app.kubernetes.io/name: {{ include "sidecert.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: webhook
{{- end }}

{{/* Carried by every webhook Pod; the Pod webhook's objectSelector skips Pods that have it, so
     the webhook never reviews its own Pods (of this or any other sidecert release). */}}
{{- define "sidecert.webhookPodMarker" -}}
sidecert.io/webhook
{{- end }}

{{- define "sidecert.webhookLabels" -}}
{{ include "sidecert.labels" . }}
app.kubernetes.io/component: webhook
{{- end }}

{{- define "sidecert.image" -}}
{{- printf "%s:%s" .image.repository (default .chart.AppVersion .image.tag) }}
{{- end }}

{{/* Strict RBAC: the ClusterRole bound by a RoleBinding in each of rbac.namespaces, and
     those RoleBindings. A colon: no ServiceAccount name has one, so no sidecar RoleBinding
     (sidecert-<serviceAccount>) can take this name, and it never equals the webhook's own
     names however long the release name (RBAC names may be 253 long: not cut). */}}
{{- define "sidecert.namespacedRoleName" -}}
{{- printf "%s:webhook" (include "sidecert.fullname" .) }}
{{- end }}

{{/* rbac.namespaces, checked: DNS labels, never a kube-* namespace or the release's own
     (sidecert never serves those). Fails the render otherwise. */}}
{{- define "sidecert.strictNamespaces" -}}
{{- $listed := .Values.rbac.namespaces | default list }}
{{- range $listed }}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$" .) }}
{{- fail (printf "rbac.namespaces: %q is not a namespace name (a DNS label)" .) }}
{{- end }}
{{- if or (hasPrefix "kube-" .) (eq . $.Release.Namespace) }}
{{- fail (printf "rbac.namespaces: sidecert never serves %q (kube-* and the release namespace are never served)" .) }}
{{- end }}
{{- end }}
{{- $listed | uniq | join "," }}
{{- end }}

{{/* The label selector of the namespaces sidecert serves (--reconcile-namespace-selector):
     the opt-in label, and with strict RBAC only the namespaces listed. */}}
{{- define "sidecert.namespaceSelector" -}}
sidecert.io/injection=enabled
{{- with include "sidecert.strictNamespaces" . -}}
,kubernetes.io/metadata.name in ({{ . }})
{{- end }}
{{- end }}
