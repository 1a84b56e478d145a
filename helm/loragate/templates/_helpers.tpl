{{/* Chart name, truncated to the 63 characters DNS labels allow. */}}
{{- define "loragate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name; the release name alone when it already contains the chart name. */}}
{{- define "loragate.fullname" -}}
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

{{- define "loragate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "loragate.gateway.fullname" -}}
{{- printf "%s-gateway" (include "loragate.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "loragate.engine.fullname" -}}
{{- printf "%s-engine" (include "loragate.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The headless Service whose DNS name resolves to the ready engine pods. */}}
{{- define "loragate.engine.headless" -}}
{{- printf "%s-engine-headless" (include "loragate.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "loragate.engine.discoveryHost" -}}
{{- printf "%s.%s.svc.%s" (include "loragate.engine.headless" .) .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{- define "loragate.labels" -}}
helm.sh/chart: {{ include "loragate.chart" . }}
app.kubernetes.io/name: {{ include "loragate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: loragate
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "loragate.gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "loragate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "loragate.engine.selectorLabels" -}}
app.kubernetes.io/name: {{ include "loragate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: engine
{{- end }}

{{- define "loragate.gateway.labels" -}}
{{ include "loragate.labels" . }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "loragate.engine.labels" -}}
{{ include "loragate.labels" . }}
app.kubernetes.io/component: engine
{{- end }}

{{/* repository:tag, or repository@digest when a digest pins the image. */}}
{{- define "loragate.image" -}}
{{- if .digest }}
{{- printf "%s@%s" .repository .digest }}
{{- else }}
{{- printf "%s:%s" .repository .tag }}
{{- end }}
{{- end }}

{{/* The engine image: the vllm-cpu build for device=cpu, the GPU image otherwise. */}}
{{- define "loragate.engine.image" -}}
{{- if eq .Values.engine.device "cpu" }}
{{- include "loragate.image" .Values.engine.cpuImage }}
{{- else }}
{{- include "loragate.image" .Values.engine.image }}
{{- end }}
{{- end }}

{{- define "loragate.registry.s3SecretName" -}}
{{- if .Values.registry.s3.existingSecret }}
{{- .Values.registry.s3.existingSecret }}
{{- else }}
{{- printf "%s-registry-s3" (include "loragate.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "loragate.registry.hasS3Credentials" -}}
{{- if or .Values.registry.s3.existingSecret .Values.registry.s3.credentials.accessKeyId }}true{{- end }}
{{- end }}

{{- define "loragate.registry.claimName" -}}
{{- if .Values.registry.pvc.existingClaim }}
{{- .Values.registry.pvc.existingClaim }}
{{- else }}
{{- printf "%s-registry" (include "loragate.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* Mount path of the local adapter cache; the same on gateway and engine pods, so paths mean the same file. */}}
{{- define "loragate.cacheDir" -}}/var/cache/loragate{{- end }}

{{/* Registry location and credentials: the same env on the gateway and the adapter-sync sidecar. */}}
{{- define "loragate.registry.env" -}}
{{- if eq .Values.registry.mode "s3" }}
- name: LORAGATE_REGISTRY
  value: {{ printf "s3://%s/%s" .Values.registry.s3.bucket .Values.registry.s3.prefix | trimSuffix "/" | quote }}
{{- with .Values.registry.s3.endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
- name: AWS_REGION
  value: {{ .Values.registry.s3.region | quote }}
{{- if include "loragate.registry.hasS3Credentials" . }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ include "loragate.registry.s3SecretName" . }}
      key: {{ .Values.registry.s3.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "loragate.registry.s3SecretName" . }}
      key: {{ .Values.registry.s3.secretAccessKeyKey }}
{{- end }}
{{- else }}
- name: LORAGATE_REGISTRY
  value: {{ .Values.registry.pvc.mountPath | quote }}
{{- end }}
# Same cache root on the gateway and the adapter-sync sidecar: materialised versions get the same path on both.
- name: LORAGATE_CACHE
  value: {{ include "loragate.cacheDir" . | quote }}
{{- end }}

{{/* The engines' minimum under an autoscaler: engine.autoscaling.minReplicas, or engine.replicaCount when null. */}}
{{- define "loragate.engine.minReplicas" -}}
{{- $min := .Values.engine.autoscaling.minReplicas }}
{{- if kindIs "invalid" $min }}{{ .Values.engine.replicaCount | int }}{{ else }}{{ $min | int }}{{ end }}
{{- end }}

{{- define "loragate.engine.autoscaled" -}}
{{- if or .Values.engine.autoscaling.keda.enabled .Values.engine.autoscaling.hpa.enabled }}true{{ end }}
{{- end }}

{{/* The engine pod's helper containers (base fetch, adapter sync): the gateway image, as the engine's user. */}}
{{- define "loragate.engine.helperSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.engine.podSecurityContext.runAsUser }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end }}

{{/* Where the adapter-sync sidecar marks its first finished pass (on the adapter cache; readiness checks it). */}}
{{- define "loragate.adapterSync.readyFile" -}}
{{- include "loragate.cacheDir" . }}/.adapter-sync-ready
{{- end }}

{{/* The adapter-sync sidecar runs (S3 registry, LoRA on, not switched off). */}}
{{- define "loragate.adapterSync.enabled" -}}
{{- if and .Values.engine.lora.enabled .Values.engine.adapterSync.enabled (eq .Values.registry.mode "s3") }}true{{ end }}
{{- end }}

{{/*
A pod's affinity: `affinity` with the podAntiAffinity preset ("soft": preferred, "hard": required, "": none) added,
keeping pods of the same component on different nodes. Call with (dict "preset" P "affinity" A "labels" L).
*/}}
{{- define "loragate.affinity" -}}
{{- $affinity := deepCopy (.affinity | default dict) }}
{{- $term := dict "topologyKey" "kubernetes.io/hostname" "labelSelector" (dict "matchLabels" .labels) }}
{{- if eq .preset "hard" }}
{{- $_ := set $affinity "podAntiAffinity" (dict "requiredDuringSchedulingIgnoredDuringExecution" (list $term)) }}
{{- else if eq .preset "soft" }}
{{- $preferred := dict "weight" 100 "podAffinityTerm" $term }}
{{- $_ := set $affinity "podAntiAffinity" (dict "preferredDuringSchedulingIgnoredDuringExecution" (list $preferred)) }}
{{- end }}
{{- if $affinity }}
{{- toYaml $affinity }}
{{- end }}
{{- end }}

{{/* topologySpreadConstraints, each selecting this component's pods unless it names its own labelSelector. */}}
{{- define "loragate.topologySpread" -}}
{{- $labels := .labels }}
{{- range .constraints }}
{{- $c := deepCopy . }}
{{- if not $c.labelSelector }}
{{- $_ := set $c "labelSelector" (dict "matchLabels" $labels) }}
{{- end }}
- {{ toYaml $c | nindent 2 | trim }}
{{- end }}
{{- end }}

{{/* Cross-field checks JSON Schema cannot express; each fails the render with one clear line. */}}
{{- define "loragate.validate" -}}
{{- range $path, $image := dict "gateway.image" .Values.gateway.image "engine.image" .Values.engine.image "engine.cpuImage" .Values.engine.cpuImage }}
{{- if and (eq $image.tag "latest") (not $image.digest) }}
{{- fail (printf "%s.tag: 'latest' is not allowed; pin a version tag or set %s.digest" $path $path) }}
{{- end }}
{{- end }}
{{- $lora := .Values.engine.lora }}
{{- if lt (int $lora.maxCpuLoras) (int $lora.maxLoras) }}
{{- fail (printf "engine.lora.maxCpuLoras (%d) must be >= engine.lora.maxLoras (%d): vLLM refuses to start otherwise" (int $lora.maxCpuLoras) (int $lora.maxLoras)) }}
{{- end }}
{{- if and (eq .Values.engine.device "gpu") (gt (int .Values.engine.tensorParallelSize) (int .Values.engine.gpu.count)) }}
{{- fail (printf "engine.tensorParallelSize (%d) needs at least as many GPUs per pod, engine.gpu.count is %d" (int .Values.engine.tensorParallelSize) (int .Values.engine.gpu.count)) }}
{{- end }}
{{- $as := .Values.engine.autoscaling }}
{{- if and $as.keda.enabled $as.hpa.enabled }}
{{- fail "engine.autoscaling: enable at most one of keda and hpa (both would scale the same Deployment)" }}
{{- end }}
{{- $min := include "loragate.engine.minReplicas" . | int }}
{{- if gt $min (int $as.maxReplicas) }}
{{- if kindIs "invalid" $as.minReplicas }}
{{- if include "loragate.engine.autoscaled" . }}
{{- fail (printf "engine.replicaCount (%d) is the autoscaler's minimum and exceeds engine.autoscaling.maxReplicas (%d)" $min (int $as.maxReplicas)) }}
{{- end }}
{{- else }}
{{- fail (printf "engine.autoscaling.minReplicas (%d) exceeds maxReplicas (%d)" $min (int $as.maxReplicas)) }}
{{- end }}
{{- end }}
{{- if and $as.hpa.enabled (eq $min 0) }}
{{- fail "engine.autoscaling.hpa: a HorizontalPodAutoscaler cannot scale to zero (its minimum is engine.autoscaling.minReplicas, or engine.replicaCount when that is null, and it is 0); use keda for scale-to-zero" }}
{{- end }}
{{- range $name, $on := dict "keda" $as.keda.enabled "hpa" $as.hpa.enabled }}
{{- if and $on $as.requireServiceMonitor (not $.Values.metrics.serviceMonitor.enabled) }}
{{- fail (printf "engine.autoscaling.%s scales on loragate_engine_waiting_requests, which Prometheus has only if it scrapes the gateways: set metrics.serviceMonitor.enabled=true (or engine.autoscaling.requireServiceMonitor=false if your Prometheus scrapes them another way, e.g. by the pods' prometheus.io annotations)" $name) }}
{{- end }}
{{- end }}
{{- $model := .Values.engine.model }}
{{- $mv := .Values.engine.modelVolume }}
{{- if and $mv.existingClaim $mv.registryBase }}
{{- fail "engine.modelVolume: set existingClaim (a volume holding the model) or registryBase (a registered base copied in at start), not both" }}
{{- end }}
{{- if hasPrefix "/" $model }}
{{- $mounts := list }}
{{- if or $mv.existingClaim $mv.registryBase }}
{{- $mounts = append $mounts $mv.mountPath }}
{{- end }}
{{- range .Values.engine.extraVolumeMounts }}
{{- $mounts = append $mounts .mountPath }}
{{- end }}
{{- $onVolume := false }}
{{- range $mounts }}
{{- if or (eq $model .) (hasPrefix (printf "%s/" (trimSuffix "/" .)) $model) }}
{{- $onVolume = true }}
{{- end }}
{{- end }}
{{- if not $onVolume }}
{{- fail (printf "engine.model %s is a path, but no volume of the engine pod is mounted there (the pod would crash-loop): set engine.modelVolume.existingClaim (a PVC holding it under %s), engine.modelVolume.registryBase (a base whose weights are in the registry, copied in at start), or mount one with engine.extraVolumes and engine.extraVolumeMounts" $model $mv.mountPath) }}
{{- end }}
{{- end }}
{{- if $mv.registryBase }}
{{- $want := printf "%s/%s" (trimSuffix "/" $mv.mountPath) $mv.registryBase }}
{{- if ne $model $want }}
{{- fail (printf "engine.modelVolume.registryBase %s is copied to %s: set engine.model to that path (it is %s)" $mv.registryBase $want $model) }}
{{- end }}
{{- end }}
{{- $g := .Values.gateway }}
{{- range $preset := list (list "gateway" $g) (list "engine" .Values.engine) }}
{{- $v := index $preset 1 }}
{{- if and $v.podAntiAffinity ($v.affinity | default dict).podAntiAffinity }}
{{- fail (printf "%s.podAntiAffinity (%s) would replace %s.affinity.podAntiAffinity: set %s.podAntiAffinity to \"\" to use your own" (index $preset 0) $v.podAntiAffinity (index $preset 0) (index $preset 0)) }}
{{- end }}
{{- end }}
{{- range $kind, $on := dict "httpRoute" $g.httpRoute.enabled "ingress" $g.ingress.enabled }}
{{- if and $on (not $g.metricsPort) (eq $g.security.metricsAuth "none") }}
{{- fail (printf "gateway.%s would publish /metrics without a key (gateway.metricsPort is null and gateway.security.metricsAuth is none): give /metrics its own port (gateway.metricsPort) or require a key (metricsAuth admin)" $kind) }}
{{- end }}
{{- end }}
{{- if and $g.httpRoute.enabled (not $g.httpRoute.parentRefs) }}
{{- fail "gateway.httpRoute.parentRefs: name the Gateway (Gateway API) that should route to the gateway Service" }}
{{- end }}
{{- $gas := .Values.gateway.autoscaling }}
{{- if and $gas.enabled (gt (int $gas.minReplicas) (int $gas.maxReplicas)) }}
{{- fail (printf "gateway.autoscaling.minReplicas (%d) exceeds maxReplicas (%d)" (int $gas.minReplicas) (int $gas.maxReplicas)) }}
{{- end }}
{{- if le (int .Values.gateway.terminationGracePeriodSeconds) (add .Values.gateway.preStopSleepSeconds 5 | int) }}
{{- fail (printf "gateway.terminationGracePeriodSeconds (%d) must exceed gateway.preStopSleepSeconds + 5 (%d) to leave time to drain" (int .Values.gateway.terminationGracePeriodSeconds) (add .Values.gateway.preStopSleepSeconds 5 | int)) }}
{{- end }}
{{- if and .Values.gateway.metricsPort (eq (int .Values.gateway.metricsPort) (int .Values.gateway.port)) }}
{{- fail (printf "gateway.metricsPort (%d) is gateway.port: give /metrics a port of its own, or null to share it" (int .Values.gateway.port)) }}
{{- end }}
{{- if and (eq .Values.registry.mode "s3") .Values.registry.s3.credentials.accessKeyId (not .Values.registry.s3.credentials.secretAccessKey) }}
{{- fail "registry.s3.credentials: accessKeyId is set but secretAccessKey is empty" }}
{{- end }}
{{- end }}
