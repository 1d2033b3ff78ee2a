{{/* The chart name, or nameOverride. */}}
{{- define "kube-fim.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object name: `<release>-<chart>`, or the release name alone
when it already contains the chart name (release `kube-fim` gives `kube-fim`).
Kept to 50 characters so that suffixes such as `-operator` fit in 63.
*/}}
{{- define "kube-fim.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kube-fim.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object; pass (dict "ctx" $ "component" "operator"). */}}
{{- define "kube-fim.labels" -}}
helm.sh/chart: {{ include "kube-fim.chart" .ctx }}
app.kubernetes.io/name: {{ include "kube-fim.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: kube-fim
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The operator pods' selector labels. */}}
{{- define "kube-fim.operatorSelectorLabels" -}}
app.kubernetes.io/name: {{ include "kube-fim.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
The agent pods' labels. The operator sets exactly these on the DaemonSet it
creates (operator/src/daemonset.rs), so they are fixed, not derived from the
release: there is one agent DaemonSet per operator namespace.
*/}}
{{- define "kube-fim.agentSelectorLabels" -}}
app.kubernetes.io/name: kube-fim
app.kubernetes.io/component: agent
{{- end }}

{{- define "kube-fim.operatorServiceAccountName" -}}
{{- default (printf "%s-operator" (include "kube-fim.fullname" .)) .Values.serviceAccount.operator.name }}
{{- end }}

{{- define "kube-fim.agentServiceAccountName" -}}
{{- default (printf "%s-agent" (include "kube-fim.fullname" .)) .Values.serviceAccount.agent.name }}
{{- end }}

{{- define "kube-fim.agentDaemonSetName" -}}
{{- default (printf "%s-agent" (include "kube-fim.fullname" .)) .Values.agent.daemonSetName }}
{{- end }}

{{/* An image reference from {repository, tag, digest}; pass (dict "image" ... "ctx" $). */}}
{{- define "kube-fim.image" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) }}
{{- end }}
{{- end }}
