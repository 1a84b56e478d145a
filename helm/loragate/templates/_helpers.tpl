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
{{- if gt (int $as.minReplicas) (int $as.maxReplicas) }}
{{- fail (printf "engine.autoscaling.minReplicas (%d) exceeds maxReplicas (%d)" (int $as.minReplicas) (int $as.maxReplicas)) }}
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
