{{- define "verge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "verge.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains (include "verge.name" .) .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "verge.name" .) | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "verge.labels" -}}
app.kubernetes.io/name: {{ include "verge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* selector labels: (dict "root" $ "component" "agent") */}}
{{- define "verge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "verge.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "verge.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{/* true when a protocol that discovers by multicast is enabled: the agent then needs the host network */}}
{{- define "verge.multicast" -}}
{{- if or .Values.onvif.discovery.enabled .Values.mdns.discovery.enabled -}}true{{- end -}}
{{- end -}}

{{/* true when usb or udev is enabled: uevents (hotplug) need the host's /run/udev and the host network namespace */}}
{{- define "verge.uevents" -}}
{{- if or .Values.usb.discovery.enabled .Values.udev.discovery.enabled -}}true{{- end -}}
{{- end -}}

{{- define "verge.podSecurityContextRestricted" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "verge.containerSecurityContextRestricted" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/* Akri-style resources block -> core/v1 ResourceRequirements with the device placeholder */}}
{{- define "verge.brokerResources" -}}
requests:
  "{{`{{PLACEHOLDER}}`}}": "1"
  memory: {{ .memoryRequest | quote }}
  cpu: {{ .cpuRequest | quote }}
limits:
  "{{`{{PLACEHOLDER}}`}}": "1"
  memory: {{ .memoryLimit | quote }}
  cpu: {{ .cpuLimit | quote }}
{{- end -}}

{{- define "verge.brokerContainer" -}}
- name: {{ .name }}-broker
  image: {{ printf "%s:%s" .b.image.repository (toString .b.image.tag) | quote }}
  {{- with .b.image.pullPolicy }}
  imagePullPolicy: {{ . }}
  {{- end }}
  {{- with .b.command }}
  command: {{ toJson . }}
  {{- end }}
  {{- with .b.args }}
  args: {{ toJson . }}
  {{- end }}
  {{- with .b.env }}
  env: {{ toJson . }}
  {{- end }}
  {{- with .b.ports }}
  ports: {{ toJson . }}
  {{- end }}
  {{- with .b.securityContext }}
  securityContext: {{ toJson . }}
  {{- end }}
  resources:
    {{- include "verge.brokerResources" .b.resources | nindent 4 }}
{{- end -}}

{{- define "verge.service" -}}
type: {{ .type }}
ports:
  - name: {{ .name }}
    port: {{ .port }}
    targetPort: {{ .targetPort }}
    protocol: {{ .protocol }}
{{- end -}}

{{/*
A Configuration from a protocol block:
(dict "root" $ "cfg" .Values.debugEcho.configuration "handler" "debugEcho")
*/}}
{{- define "verge.configuration" -}}
{{- $cfg := .cfg -}}
{{- if and $cfg.brokerPod.image.repository $cfg.brokerJob.image.repository -}}
{{- fail (printf "configuration %s: set brokerPod.image.repository or brokerJob.image.repository, not both" $cfg.name) -}}
{{- end }}
apiVersion: akri.sh/v0
kind: Configuration
metadata:
  name: {{ $cfg.name }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "verge.labels" .root | nindent 4 }}
spec:
  discoveryHandler:
    name: {{ .handler | quote }}
    discoveryDetails: {{ if kindIs "string" $cfg.discoveryDetails }}{{ $cfg.discoveryDetails | quote }}{{ else if $cfg.discoveryDetails }}{{ toYaml $cfg.discoveryDetails | quote }}{{ else }}""{{ end }}
    {{- with $cfg.discoveryProperties }}
    discoveryProperties: {{ toJson . }}
    {{- end }}
  capacity: {{ $cfg.capacity }}
  {{- if $cfg.brokerPod.image.repository }}
  brokerSpec:
    brokerPodSpec:
      containers:
        {{- include "verge.brokerContainer" (dict "name" $cfg.name "b" $cfg.brokerPod) | nindent 8 }}
      {{- with .root.Values.imagePullSecrets }}
      imagePullSecrets: {{ toJson . }}
      {{- end }}
  {{- else if $cfg.brokerJob.image.repository }}
  brokerSpec:
    brokerJobSpec:
      backoffLimit: {{ $cfg.brokerJob.backoffLimit }}
      parallelism: {{ $cfg.brokerJob.parallelism }}
      completions: {{ $cfg.brokerJob.completions }}
      template:
        spec:
          restartPolicy: {{ $cfg.brokerJob.restartPolicy }}
          containers:
            {{- include "verge.brokerContainer" (dict "name" $cfg.name "b" $cfg.brokerJob) | nindent 12 }}
          {{- with .root.Values.imagePullSecrets }}
          imagePullSecrets: {{ toJson . }}
          {{- end }}
  {{- end }}
  {{- if $cfg.instanceService.enabled }}
  instanceServiceSpec:
    {{- include "verge.service" $cfg.instanceService | nindent 4 }}
  {{- end }}
  {{- if $cfg.configurationService.enabled }}
  configurationServiceSpec:
    {{- include "verge.service" $cfg.configurationService | nindent 4 }}
  {{- end }}
  brokerProperties: {{ toJson ($cfg.brokerProperties | default dict) }}
{{- end -}}
