{{/*
=============================================================================
Public templates (for your own pod specs)
=============================================================================
Each takes either
  - the root context `.` of this chart, or of a parent chart that has this
    chart as a dependency named `dbsidecar` (its values are found under
    .Values.dbsidecar automatically), or
  - an explicit dict, e.g. for an aliased dependency:
      (dict "Values" .Values.mydb "Release" .Release "Capabilities" .Capabilities)

  dbsidecar.initContainers   the sidecar if sidecar.native, else nothing
  dbsidecar.containers       the sidecar if not sidecar.native, else nothing
                             (list it BEFORE the app container)
  dbsidecar.container        the sidecar container, unconditionally
  dbsidecar.volumes          config, socket and tmp volumes (+ extraVolumes)
  dbsidecar.appVolumeMounts  the socket directory, for the app container
  dbsidecar.appEnv           DBSIDECAR_URL (+ DBSIDECAR_TOKEN if auth is set), for the app
  dbsidecar.podAnnotations   config checksum (+ prometheus.io/* if enabled)
  dbsidecar.podLabels        labels the PodMonitor selects on

All render YAML starting at column 0; place them with nindent:
  initContainers:
    {{- include "dbsidecar.initContainers" . | nindent 8 }}
*/}}

{{- define "dbsidecar.initContainers" -}}
{{- include "dbsidecar._dispatch" (list "dbsidecar._initContainers" .) -}}
{{- end -}}

{{- define "dbsidecar.containers" -}}
{{- include "dbsidecar._dispatch" (list "dbsidecar._containers" .) -}}
{{- end -}}

{{- define "dbsidecar.container" -}}
{{- include "dbsidecar._dispatch" (list "dbsidecar._container" .) -}}
{{- end -}}

{{- define "dbsidecar.volumes" -}}
{{- include "dbsidecar._dispatch" (list "dbsidecar._volumes" .) -}}
{{- end -}}

{{- define "dbsidecar.appVolumeMounts" -}}
{{- include "dbsidecar._dispatch" (list "dbsidecar._appVolumeMounts" .) -}}
{{- end -}}

{{- define "dbsidecar.appEnv" -}}
{{- include "dbsidecar._dispatch" (list "dbsidecar._appEnv" .) -}}
{{- end -}}

{{- define "dbsidecar.podAnnotations" -}}
{{- include "dbsidecar._dispatch" (list "dbsidecar._podAnnotations" .) -}}
{{- end -}}

{{- define "dbsidecar.podLabels" -}}
{{- include "dbsidecar._dispatch" (list "dbsidecar._podLabels" .) -}}
{{- end -}}

{{/*
Normalise the caller's context into (dict "Values" <dbsidecar values>
"Release" ... ["Capabilities" ...]) and render the named private template.
Nothing below relies on .Chart, which is the parent's chart when a parent
includes these templates. hasKey (not field access) keeps `helm lint
--strict` (missingkey=error) happy when a key is absent.
*/}}
{{- define "dbsidecar._dispatch" -}}
{{- $name := index . 0 -}}
{{- $in := index . 1 -}}
{{- $v := $in.Values -}}
{{- if hasKey $in.Values "dbsidecar" -}}
{{- $v = $in.Values.dbsidecar -}}
{{- end -}}
{{- $ctx := dict "Values" $v "Release" $in.Release -}}
{{- if hasKey $in "Capabilities" -}}
{{- $_ := set $ctx "Capabilities" $in.Capabilities -}}
{{- end -}}
{{- include $name $ctx | trim -}}
{{- end -}}

{{/*
=============================================================================
Names and labels
=============================================================================
*/}}

{{- define "dbsidecar.name" -}}
{{- default "dbsidecar" .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
<release>-dbsidecar, or the release name alone if it already contains the
name. Built from .Release and .Values only, so a parent chart including
dbsidecar.volumes computes the same ConfigMap name the subchart created.
*/}}
{{- define "dbsidecar.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "dbsidecar.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "dbsidecar.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels for this chart's own objects (root context only). */}}
{{- define "dbsidecar.labels" -}}
helm.sh/chart: {{ include "dbsidecar.chart" . }}
{{ include "dbsidecar.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "dbsidecar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dbsidecar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "dbsidecar.configMapName" -}}
{{- if .Values.existingConfigMap.name -}}
{{- .Values.existingConfigMap.name -}}
{{- else -}}
{{- include "dbsidecar.fullname" . -}}
{{- end -}}
{{- end -}}

{{- define "dbsidecar.image" -}}
{{- $repo := required "dbsidecar: image.repository is required (the registry path of your dbsidecar image)" .Values.image.repository -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" $repo .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (required "dbsidecar: image.tag or image.digest is required" (toString .Values.image.tag)) -}}
{{- end -}}
{{- end -}}

{{/* The ops port: sidecar.opsPort, else config.ops.port, else 9432. */}}
{{- define "dbsidecar.opsPort" -}}
{{- if .Values.sidecar.opsPort -}}
{{- .Values.sidecar.opsPort | int -}}
{{- else -}}
{{- dig "ops" "port" 9432 (.Values.config | default dict) | int -}}
{{- end -}}
{{- end -}}

{{/*
=============================================================================
Private templates: called through dbsidecar._dispatch with a normalised
context, never directly by users.
=============================================================================
*/}}

{{- define "dbsidecar._initContainers" -}}
{{- if .Values.sidecar.native -}}
{{- include "dbsidecar._container" . -}}
{{- end -}}
{{- end -}}

{{- define "dbsidecar._containers" -}}
{{- if not .Values.sidecar.native -}}
{{- include "dbsidecar._container" . -}}
{{- end -}}
{{- end -}}

{{- define "dbsidecar._container" -}}
{{- $v := .Values -}}
{{- $native := $v.sidecar.native -}}
{{- $opsPort := include "dbsidecar.opsPort" . | int -}}
{{- /*
An API server older than 1.29 silently drops restartPolicy on an init
container; the sidecar would then block the pod in Init forever. Fail at
render time instead, whenever the target version is known.
*/ -}}
{{- if and $native (hasKey . "Capabilities") -}}
{{- if semverCompare "<1.29.0-0" .Capabilities.KubeVersion.Version -}}
{{- fail (printf "dbsidecar: sidecar.native=true needs Kubernetes >= 1.29 (native sidecars); the target is %s. Set sidecar.native=false, or pass --kube-version if rendering offline." .Capabilities.KubeVersion.Version) -}}
{{- end -}}
{{- end -}}
- name: {{ $v.sidecar.containerName }}
  image: {{ include "dbsidecar.image" . | quote }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  {{- if $native }}
  # Native sidecar: running (startupProbe passed) before the app starts,
  # stopped only after the app has exited.
  restartPolicy: Always
  {{- end }}
  args:
    {{- toYaml $v.sidecar.args | nindent 4 }}
  ports:
    - name: {{ $v.sidecar.opsPortName }}
      containerPort: {{ $opsPort }}
      protocol: TCP
  {{- if or $v.secretEnv $v.auth.existingSecret $v.consul.tokenSecret.name $v.env }}
  env:
    {{- range $v.secretEnv }}
    - name: {{ required "dbsidecar: secretEnv[].name is required" .name }}
      valueFrom:
        secretKeyRef:
          name: {{ required "dbsidecar: secretEnv[].secretName is required" .secretName }}
          key: {{ required "dbsidecar: secretEnv[].key is required" .key }}
          {{- if hasKey . "optional" }}
          optional: {{ .optional }}
          {{- end }}
    {{- end }}
    {{- if $v.auth.existingSecret }}
    - name: DBSIDECAR_AUTH_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ $v.auth.existingSecret }}
          key: {{ $v.auth.key }}
    {{- end }}
    {{- if $v.consul.tokenSecret.name }}
    - name: CONSUL_HTTP_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ $v.consul.tokenSecret.name }}
          key: {{ $v.consul.tokenSecret.key }}
    {{- end }}
    {{- with $v.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
  {{- with $v.envFrom }}
  envFrom:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: dbsidecar-config
      mountPath: /etc/dbsidecar
      readOnly: true
    - name: dbsidecar-socket
      mountPath: {{ $v.socket.mountPath }}
    - name: dbsidecar-tmp
      mountPath: /tmp
    {{- with $v.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $v.probes.startup }}
  {{- if .enabled }}
  startupProbe:
    httpGet:
      path: {{ .path }}
      port: {{ $opsPort }}
    {{- with omit . "enabled" "path" }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
  {{- end }}
  {{- with $v.probes.liveness }}
  {{- if .enabled }}
  livenessProbe:
    httpGet:
      path: {{ .path }}
      port: {{ $opsPort }}
    {{- with omit . "enabled" "path" }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
  {{- end }}
  {{- with $v.probes.readiness }}
  {{- if .enabled }}
  readinessProbe:
    httpGet:
      path: {{ .path }}
      port: {{ $opsPort }}
    {{- with omit . "enabled" "path" }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
  {{- end }}
  {{- if not $native }}
  {{- $c := $v.sidecar.classic }}
  {{- $sleep := $c.preStopSleepSeconds | default 0 | int }}
  {{- if or $c.holdApplicationUntilReady (gt $sleep 0) }}
  lifecycle:
    {{- if $c.holdApplicationUntilReady }}
    # Blocks the start of the containers listed after this one until the
    # sidecar is started (the kubelet waits for postStart in list order).
    postStart:
      exec:
        command:
          - dbsidecar
          - wait
          - --ops
          - {{ printf "http://127.0.0.1:%d" $opsPort | quote }}
          - --timeout
          - {{ $c.waitTimeout | default "120s" | quote }}
    {{- end }}
    {{- if gt $sleep 0 }}
    # Every container gets SIGTERM at once; keep serving while the app drains.
    preStop:
      exec:
        command: ["sleep", "{{ $sleep }}"]
    {{- end }}
  {{- end }}
  {{- end }}
  {{- with $v.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  # Config errors (the message names the key) show in `kubectl describe`.
  terminationMessagePolicy: FallbackToLogsOnError
{{- end -}}

{{- define "dbsidecar._volumes" -}}
{{- $v := .Values -}}
- name: dbsidecar-config
  configMap:
    name: {{ include "dbsidecar.configMapName" . }}
    items:
      - key: {{ if $v.existingConfigMap.name }}{{ $v.existingConfigMap.key }}{{ else }}config.yaml{{ end }}
        path: config.yaml
- name: dbsidecar-socket
  {{- with $v.socket.emptyDir }}
  emptyDir:
    {{- toYaml . | nindent 4 }}
  {{- else }}
  emptyDir: {}
  {{- end }}
- name: dbsidecar-tmp
  {{- with $v.tmp.emptyDir }}
  emptyDir:
    {{- toYaml . | nindent 4 }}
  {{- else }}
  emptyDir: {}
  {{- end }}
{{- with $v.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "dbsidecar._appVolumeMounts" -}}
- name: dbsidecar-socket
  mountPath: {{ .Values.socket.mountPath }}
{{- end -}}

{{/*
DBSIDECAR_URL and DBSIDECAR_TOKEN are what the Python client reads. The URL
prefers the Unix socket when one is configured (no TCP stack in the path).
*/}}
{{- define "dbsidecar._appEnv" -}}
{{- $cfg := .Values.config | default dict -}}
{{- $url := .Values.appEnv.url -}}
{{- if not $url -}}
{{- $uds := dig "listen" "uds" "" $cfg -}}
{{- if $uds -}}
{{- $url = printf "unix://%s" $uds -}}
{{- else -}}
{{- $url = printf "http://127.0.0.1:%d" (dig "listen" "port" 7432 $cfg | int) -}}
{{- end -}}
{{- end -}}
- name: {{ .Values.appEnv.urlEnvName }}
  value: {{ $url | quote }}
{{- if .Values.auth.existingSecret }}
- name: {{ .Values.auth.appEnvName }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.auth.existingSecret }}
      key: {{ .Values.auth.key }}
{{- end }}
{{- end -}}

{{- define "dbsidecar._podAnnotations" -}}
{{- if not .Values.existingConfigMap.name }}
# Rolls the pods when the rendered sidecar config changes.
checksum/dbsidecar-config: {{ toYaml .Values.config | sha256sum }}
{{- end }}
{{- if .Values.metrics.podAnnotations.enabled }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ include "dbsidecar.opsPort" . | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end -}}

{{- define "dbsidecar._podLabels" -}}
{{- with .Values.podLabels -}}
{{- toYaml . -}}
{{- end -}}
{{- end -}}
