{{- define "stead.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "stead.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "stead.labels" -}}
app.kubernetes.io/name: {{ include "stead.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "stead.selectorLabels" -}}
app.kubernetes.io/name: {{ include "stead.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "stead.webhookSecret" -}}
{{- if .Values.webhook.existingSecret -}}
{{- .Values.webhook.existingSecret -}}
{{- else -}}
{{- printf "%s-webhook" (include "stead.fullname" .) -}}
{{- end -}}
{{- end -}}
