{{/* The base name of every object: the release name, or "<release>-egret". */}}
{{- define "egret.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "egret.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Labels of every object. */}}
{{- define "egret.labels" -}}
app.kubernetes.io/name: egret
app.kubernetes.io/part-of: egret
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The agent pods; the same selector as deploy/kubernetes/, so either can adopt the other. */}}
{{- define "egret.agentSelector" -}}
app.kubernetes.io/name: egret
app.kubernetes.io/component: agent
{{- end -}}

{{- define "egret.cleanupSelector" -}}
app.kubernetes.io/name: egret
app.kubernetes.io/component: cleanup
{{- end -}}

{{/* The host's bpffs volume, shared by the agent and the cleanup. */}}
{{- define "egret.bpffsVolume" -}}
- name: bpffs
  hostPath:
    path: /sys/fs/bpf
    type: Directory
{{- end -}}
