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

{{/*
The protocol blocks that can run their handler outside the agent, and what each needs: the
handler names the agent then stops embedding, the standalone binary's fixed flags, and its host
access (host network for multicast or uevents, /run/udev for uevents, /run/dbus for BlueZ).
Modbus: only modbus-tcp moves out; an unprivileged pod cannot open the node's serial ports either.
*/}}
{{- define "verge.protocols" -}}
onvif: {binary: verge-onvif-discovery, handlers: [onvif], args: [], hostNetwork: true, runUdev: false, runDbus: false}
usb: {binary: verge-usb-discovery, handlers: [usb], args: [], hostNetwork: true, runUdev: true, runDbus: false}
udev: {binary: verge-udev-discovery, handlers: [udev], args: [], hostNetwork: true, runUdev: true, runDbus: false}
modbus: {binary: verge-modbus-discovery, handlers: [modbus-tcp], args: [--transport=tcp], hostNetwork: false, runUdev: false, runDbus: false}
ble: {binary: verge-ble-discovery, handlers: [ble], args: [], hostNetwork: false, runUdev: false, runDbus: true}
mdns: {binary: verge-mdns-discovery, handlers: [mdns], args: [], hostNetwork: true, runUdev: false, runDbus: false}
{{- end -}}

{{/* true when the block's handler runs in the agent: enabled, and no image for a DaemonSet */}}
{{- define "verge.embedded" -}}
{{- $d := (index .root.Values .block).discovery -}}
{{- if and $d.enabled (not (and $d.image $d.image.repository)) -}}true{{- end -}}
{{- end -}}

{{/* true when the block's handler runs as its own DaemonSet: enabled with an image */}}
{{- define "verge.external" -}}
{{- $d := (index .root.Values .block).discovery -}}
{{- if and $d.enabled $d.image $d.image.repository -}}true{{- end -}}
{{- end -}}

{{/* true when an embedded protocol discovers by multicast: the agent then needs the host network */}}
{{- define "verge.multicast" -}}
{{- if or (include "verge.embedded" (dict "root" . "block" "onvif")) (include "verge.embedded" (dict "root" . "block" "mdns")) -}}true{{- end -}}
{{- end -}}

{{/* true when usb or udev is embedded: uevents (hotplug) need the host's /run/udev and the host network namespace */}}
{{- define "verge.uevents" -}}
{{- if or (include "verge.embedded" (dict "root" . "block" "usb")) (include "verge.embedded" (dict "root" . "block" "udev")) -}}true{{- end -}}
{{- end -}}

{{/*
A discovery handler DaemonSet (the custom block and every protocol block with an image):
(dict "root" $ "component" "onvif-discovery" "d" <block>.discovery "image" "repo:tag"
      "args" (list ...) "env" (list ...) "runAsUser" 0 "hostNetwork" bool "runUdev" bool
      "runDbus" bool "healthPort" port-or-nil)
The handler registers on the agent's registration socket in agent.handlersDir (group
agent.registrationSocketGroup) and serves its own socket there.
*/}}
{{- define "verge.handlerDaemonSet" -}}
{{- $root := .root -}}
{{- $d := .d -}}
{{- $handlersDir := $root.Values.agent.handlersDir -}}
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: {{ include "verge.fullname" $root }}-{{ .component }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "verge.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  selector:
    matchLabels:
      {{- include "verge.selectorLabels" (dict "root" $root "component" .component) | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "verge.selectorLabels" (dict "root" $root "component" .component) | nindent 8 }}
      {{- with $d.podAnnotations }}
      annotations: {{ toJson . }}
      {{- end }}
    spec:
      # The handler needs no API access.
      automountServiceAccountToken: false
      {{- if .hostNetwork }}
      # Multicast discovery needs the node's own interfaces; uevents are only delivered in the
      # host's network namespace.
      hostNetwork: true
      dnsPolicy: ClusterFirstWithHostNet
      {{- end }}
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets: {{ toJson . }}
      {{- end }}
      securityContext:
        # uid 0 by default: the handler creates its socket in agent.handlersDir, which is
        # root-owned 0755 on the node (as root without capabilities it only acts as the owner)
        runAsNonRoot: {{ ne (int .runAsUser) 0 }}
        runAsUser: {{ .runAsUser }}
        runAsGroup: {{ .runAsUser }}
        {{- if ne $root.Values.agent.registrationSocketGroup nil }}
        # the agent's registration socket is mode 0660 with this group
        supplementalGroups: [{{ $root.Values.agent.registrationSocketGroup }}]
        {{- end }}
        seccompProfile:
          type: RuntimeDefault
      containers:
        - name: handler
          image: {{ .image | quote }}
          imagePullPolicy: {{ $d.image.pullPolicy }}
          {{- with .args }}
          args: {{ toJson . }}
          {{- end }}
          env:
            - name: DISCOVERY_HANDLERS_DIRECTORY
              value: {{ $handlersDir | quote }}
            {{- with .env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
            - name: NODE_NAME
              valueFrom:
                fieldRef:
                  fieldPath: spec.nodeName
            # Akri's handlers read the node name from AGENT_NODE_NAME
            - name: AGENT_NODE_NAME
              valueFrom:
                fieldRef:
                  fieldPath: spec.nodeName
            {{- with $d.env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- if ne .healthPort nil }}
          ports:
            - name: health
              containerPort: {{ .healthPort }}
              protocol: TCP
          # The handler may serve on a unix socket only, which kubelet cannot probe, and its
          # image has no shell: the SDK's HTTP health endpoint is what is probed.
          livenessProbe:
            httpGet:
              path: /healthz
              port: health
            periodSeconds: 10
            failureThreshold: 3
          # Ready once registered with the agent (not ready while the agent is away).
          readinessProbe:
            httpGet:
              path: /readyz
              port: health
            periodSeconds: 5
          startupProbe:
            httpGet:
              path: /healthz
              port: health
            periodSeconds: 1
            failureThreshold: 60
          {{- end }}
          resources: {{ toJson $d.resources }}
          securityContext:
            {{- include "verge.containerSecurityContextRestricted" $root | nindent 12 }}
          volumeMounts:
            - name: handlers
              mountPath: {{ $handlersDir }}
            {{- if .runUdev }}
            - name: run-udev
              mountPath: /run/udev
              readOnly: true
            {{- end }}
            {{- if .runDbus }}
            - name: run-dbus
              mountPath: /run/dbus
              readOnly: true
            {{- end }}
      volumes:
        # registration socket and the handler's own socket
        - name: handlers
          hostPath:
            path: {{ $handlersDir }}
            type: DirectoryOrCreate
        {{- if .runUdev }}
        # udevd's database and control socket: libudev delivers uevents only when it exists
        - name: run-udev
          hostPath:
            path: /run/udev
            type: DirectoryOrCreate
        {{- end }}
        {{- if .runDbus }}
        # BlueZ on the system D-Bus; the directory, as for the agent, so a dbus-daemon restart
        # (a new socket file) is seen
        - name: run-dbus
          hostPath:
            path: /run/dbus
            type: Directory
        {{- end }}
      {{- with $d.nodeSelector }}
      nodeSelector: {{ toJson . }}
      {{- end }}
      {{- with $d.tolerations }}
      tolerations: {{ toJson . }}
      {{- end }}
      {{- with $d.affinity }}
      affinity: {{ toJson . }}
      {{- end }}
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
