{{- define "strata.labels" -}}
app.kubernetes.io/name: strata
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{- define "strata.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}

{{- define "strata.tlsSecret" -}}
{{- if .Values.agentTls.existingSecret -}}
{{ .Values.agentTls.existingSecret }}
{{- else -}}
{{ .Release.Name }}-agent-tls
{{- end -}}
{{- end -}}
