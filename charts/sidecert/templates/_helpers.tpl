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
