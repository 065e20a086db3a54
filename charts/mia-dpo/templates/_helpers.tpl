{{/*
Helpers shared by every template. Each piece of a pod (names, labels, images, security,
credentials, volumes) is written once here.
*/}}

{{/* Chart name. */}}
{{- define "mia-dpo.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 52 | trimSuffix "-" }}
{{- end }}

{{/*
Resource-name prefix. Truncated to 52 characters so that the longest suffix
("-controller", 11) keeps every name within 63.
*/}}
{{- define "mia-dpo.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Chart label value. */}}
{{- define "mia-dpo.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The run id: run.id, or the release name. */}}
{{- define "mia-dpo.runId" -}}
{{- .Values.run.id | default .Release.Name }}
{{- end }}

{{/*
The stages of the run, in pipeline order, as a JSON list. calibrate joins score on its
own when config.score asks for a calibrated layer or thresholds (as the run config does),
so that it gets a Job template too.
*/}}
{{- define "mia-dpo.stages" -}}
{{- $score := (.Values.config | default dict).score | default dict }}
{{- $calibrated := or (eq (toString (index $score "layer" | default "")) "auto") (eq (toString (index $score "thresholds" | default "")) "calibrated") }}
{{- $wanted := .Values.run.stages }}
{{- if and $calibrated (has "score" $wanted) }}
{{- $wanted = append $wanted "calibrate" }}
{{- end }}
{{- $stages := list }}
{{- range (list "augment" "generate" "calibrate" "score" "select" "train" "evaluate") }}
{{- if has . $wanted }}
{{- $stages = append $stages . }}
{{- end }}
{{- end }}
{{- toJson $stages }}
{{- end }}

{{/* Stages whose default image is the GPU image. */}}
{{- define "mia-dpo.gpuImageStages" -}}
{{- toJson (list "generate" "calibrate" "score" "train" "evaluate") }}
{{- end }}

{{/*
Stages that load the model (mia_dpo.records.MODEL_STAGES): they get the Hugging Face
token, the model cache and, with networkPolicy.allowHub, the hub egress.
*/}}
{{- define "mia-dpo.modelStages" -}}
{{- toJson (list "generate" "calibrate" "score" "train" "evaluate") }}
{{- end }}

{{/* 1-based position of a stage in the run, zero-padded ("01"): sorts as text. Context: dict ctx, stage. */}}
{{- define "mia-dpo.stageIndex" -}}
{{- $index := 0 }}
{{- range $i, $s := include "mia-dpo.stages" .ctx | fromJsonArray }}
{{- if eq $s $.stage }}{{ $index = add1 $i }}{{ end }}
{{- end }}
{{- printf "%02d" $index }}
{{- end }}

{{/* Selector labels. Context: dict ctx, component. */}}
{{- define "mia-dpo.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mia-dpo.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Common labels without managed-by (the stage Jobs are managed by the controller, which
adds app.kubernetes.io/managed-by itself). Context: dict ctx, component.
*/}}
{{- define "mia-dpo.baseLabels" -}}
helm.sh/chart: {{ include "mia-dpo.chart" .ctx }}
{{ include "mia-dpo.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: mia-dpo
{{- end }}

{{/* Labels of objects Helm manages. Context: dict ctx, component. */}}
{{- define "mia-dpo.labels" -}}
{{ include "mia-dpo.baseLabels" . }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- end }}

{{/*
Labels of a stage Job and its pods: run id, stage, and the stage's position in the run
(`kubectl get jobs -l mia-dpo.io/run-id=ID --sort-by=.metadata.labels.mia-dpo\.io/stage-index`
lists the run's stages in order). Context: dict ctx, stage.
*/}}
{{- define "mia-dpo.stageLabels" -}}
{{ include "mia-dpo.baseLabels" (dict "ctx" .ctx "component" .stage) }}
mia-dpo.io/stage: {{ .stage }}
mia-dpo.io/run-id: {{ include "mia-dpo.runId" .ctx | quote }}
mia-dpo.io/stage-index: {{ include "mia-dpo.stageIndex" . | quote }}
{{- end }}

{{/*
Labels as YAML: the chart's (rendered text) merged over the users' maps, which cannot
override them. Context: dict labels (text), extra (list of maps, first wins).
*/}}
{{- define "mia-dpo.mergeLabels" -}}
{{- $out := fromYaml .labels }}
{{- range .extra }}{{ $out = merge $out (. | default dict) }}{{ end }}
{{- toYaml $out }}
{{- end }}

{{/*
A pod template's metadata body: the given labels plus podLabels (a stage's over the global
ones), and podAnnotations likewise. Context: dict ctx, labels (rendered labels), and
optionally podLabels, podAnnotations (a stage's maps).
*/}}
{{- define "mia-dpo.podMetadata" -}}
labels:
  {{- include "mia-dpo.mergeLabels" (dict "labels" .labels "extra" (list .podLabels .ctx.Values.podLabels)) | nindent 2 }}
{{- $annotations := merge (dict) (.podAnnotations | default dict) (.ctx.Values.podAnnotations | default dict) }}
{{- with $annotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
An image reference. Context: dict image (a stage's override, may be empty), default
(`image` or `gpuImage` values), appVersion (the tag when neither sets one).
*/}}
{{- define "mia-dpo.image" -}}
{{- $repo := .image.repository | default .default.repository }}
{{- $tag := .image.tag | default .default.tag | default .appVersion }}
{{- printf "%s:%s" $repo $tag }}
{{- end }}

{{/* image: and imagePullPolicy: lines of a container. Context: dict ctx, image, gpu. */}}
{{- define "mia-dpo.containerImage" -}}
{{- $default := ternary .ctx.Values.gpuImage .ctx.Values.image (.gpu | default false) -}}
{{- $image := .image | default dict -}}
image: {{ include "mia-dpo.image" (dict "image" $image "default" $default "appVersion" .ctx.Chart.AppVersion) | quote }}
imagePullPolicy: {{ $image.pullPolicy | default $default.pullPolicy }}
{{- end }}

{{/* Pod-level settings every pod shares. Context: root. */}}
{{- define "mia-dpo.podCommon" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Container security context. Context: root. */}}
{{- define "mia-dpo.securityContext" -}}
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
{{- end }}

{{/*
nodeSelector / tolerations / affinity lines (may be empty: call it through `with`).
Context: a values section.
*/}}
{{- define "mia-dpo.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------- connections */}}

{{- define "mia-dpo.redisSecretName" -}}
{{- .Values.redis.existingSecret | default (printf "%s-redis" (include "mia-dpo.fullname" .)) }}
{{- end }}

{{- define "mia-dpo.s3SecretName" -}}
{{- .Values.s3.existingSecret | default (printf "%s-s3" (include "mia-dpo.fullname" .)) }}
{{- end }}

{{- define "mia-dpo.redisHost" -}}
{{- if .Values.redis.enabled }}
{{- printf "%s-redis" (include "mia-dpo.fullname" .) }}
{{- else }}
{{- required "redis.host is required when redis.enabled is false" .Values.redis.host }}
{{- end }}
{{- end }}

{{- define "mia-dpo.redisUrl" -}}
{{- $scheme := ternary "rediss" "redis" (and .Values.redis.tls (not .Values.redis.enabled)) }}
{{- printf "%s://%s:%d/%d" $scheme (include "mia-dpo.redisHost" .) (int .Values.redis.port) (int .Values.redis.db) }}
{{- end }}

{{/* S3 endpoint as host:port. */}}
{{- define "mia-dpo.s3Endpoint" -}}
{{- if .Values.s3.minio.enabled }}
{{- printf "%s-minio:9000" (include "mia-dpo.fullname" .) }}
{{- else }}
{{- required "s3.endpoint (host:port) is required when s3.minio.enabled is false" .Values.s3.endpoint }}
{{- end }}
{{- end }}

{{- define "mia-dpo.s3Secure" -}}
{{- and .Values.s3.secure (not .Values.s3.minio.enabled) }}
{{- end }}

{{/*
Credential environment: only secretKeyRefs to the chart's Secrets or the existing ones.
Context: root.
*/}}
{{- define "mia-dpo.credentialEnv" -}}
- name: MIA_DPO_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "mia-dpo.redisSecretName" . }}
      key: {{ .Values.redis.passwordKey }}
- name: MIA_DPO_S3_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "mia-dpo.s3SecretName" . }}
      key: {{ .Values.s3.accessKeyKey }}
- name: MIA_DPO_S3_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "mia-dpo.s3SecretName" . }}
      key: {{ .Values.s3.secretKeyKey }}
{{- end }}

{{/*
The Hugging Face environment of a model stage: the token from its Secret, and where the
model cache is (HF_HOME on a writable cache; HF_HUB_CACHE and offline on a read-only one,
HF_HOME staying on /scratch for what else the libraries write). Context: root.
*/}}
{{- define "mia-dpo.modelEnv" -}}
{{- with .Values.hfToken.existingSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.hfToken.key }}
{{- end }}
{{- $cache := .Values.modelCache }}
{{- if $cache.enabled }}
{{- if $cache.readOnly }}
- name: HF_HUB_CACHE
  value: {{ printf "%s/hub" (trimSuffix "/" $cache.mountPath) | quote }}
- name: HF_HUB_OFFLINE
  value: "1"
{{- else }}
- name: HF_HOME
  value: {{ $cache.mountPath | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* The environment of mia-dpo containers. Context: dict ctx, extraEnv, model (bool). */}}
{{- define "mia-dpo.env" -}}
- name: MIA_DPO_RUN_ID
  value: {{ include "mia-dpo.runId" .ctx | quote }}
{{ include "mia-dpo.credentialEnv" .ctx }}
{{- if .model }}
{{- with include "mia-dpo.modelEnv" .ctx | trim }}
{{ . }}
{{- end }}
{{- end }}
{{- with .ctx.Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- with .extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
A Secret value (base64) that survives upgrades: the given value, else the one already in
the cluster, else a random one. Context: dict ctx, name, key, value, length.
*/}}
{{- define "mia-dpo.secretValue" -}}
{{- if .value }}
{{- .value | toString | b64enc }}
{{- else }}
{{- $existing := lookup "v1" "Secret" .ctx.Release.Namespace .name | default dict }}
{{- dig "data" .key (randAlphaNum (int .length) | b64enc) $existing }}
{{- end }}
{{- end }}

{{/* ------------------------------------------------------------------- volumes */}}

{{/*
volumeMounts of a mia-dpo container. Context: dict ctx, shm (bool: /dev/shm), model
(bool: the model cache).
*/}}
{{- define "mia-dpo.volumeMounts" -}}
- name: run-config
  mountPath: /etc/mia-dpo
  readOnly: true
- name: scratch
  mountPath: /scratch
- name: tmp
  mountPath: /tmp
{{- if .shm }}
- name: shm
  mountPath: /dev/shm
{{- end }}
{{- if .ctx.Values.data.enabled }}
- name: data
  mountPath: {{ .ctx.Values.data.mountPath }}
  readOnly: {{ .ctx.Values.data.readOnly }}
{{- end }}
{{- if and .model .ctx.Values.modelCache.enabled }}
- name: model-cache
  mountPath: {{ .ctx.Values.modelCache.mountPath }}
  readOnly: {{ .ctx.Values.modelCache.readOnly }}
{{- end }}
{{- end }}

{{/* The scratch and /tmp emptyDirs. Context: root. */}}
{{- define "mia-dpo.scratchVolumes" -}}
- name: scratch
  emptyDir:
    {{- with .Values.scratch.medium }}
    medium: {{ . }}
    {{- end }}
    sizeLimit: {{ .Values.scratch.sizeLimit }}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.scratch.tmpSizeLimit }}
{{- end }}

{{/*
volumes of a mia-dpo pod. Context: dict ctx, shm (bool), model (bool: the model cache),
jobs (bool: the controller also gets the stage Job templates, at
/etc/mia-dpo/jobs/<stage>.yaml).
*/}}
{{- define "mia-dpo.volumes" -}}
- name: run-config
  configMap:
    name: {{ include "mia-dpo.fullname" .ctx }}-run
    items:
      - key: config.yaml
        path: config.yaml
      {{- if .jobs }}
      {{- range (include "mia-dpo.stages" .ctx | fromJsonArray) }}
      - key: job-{{ . }}.yaml
        path: jobs/{{ . }}.yaml
      {{- end }}
      {{- end }}
{{ include "mia-dpo.scratchVolumes" .ctx }}
{{- if .shm }}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .ctx.Values.shm.sizeLimit }}
{{- end }}
{{- if .ctx.Values.data.enabled }}
{{- if not .ctx.Values.data.volume }}
{{- fail "data.volume (a volume source, e.g. persistentVolumeClaim) is required when data.enabled is true" }}
{{- end }}
- name: data
  {{- toYaml .ctx.Values.data.volume | nindent 2 }}
{{- end }}
{{- if and .model .ctx.Values.modelCache.enabled }}
- name: model-cache
  persistentVolumeClaim:
    claimName: {{ include "mia-dpo.modelCacheClaim" .ctx }}
    readOnly: {{ .ctx.Values.modelCache.readOnly }}
{{- end }}
{{- end }}

{{/* The model cache's PersistentVolumeClaim: the existing one, or the chart's. Context: root. */}}
{{- define "mia-dpo.modelCacheClaim" -}}
{{- .Values.modelCache.existingClaim | default (printf "%s-model-cache" (include "mia-dpo.fullname" .)) }}
{{- end }}

{{/* ------------------------------------------------------------ the run config */}}

{{/*
config.yaml: the user's `config`, plus what the chart decides (run id, stages, Redis and
S3 connections, the kubernetes launcher). No credentials: they come from Secrets as env.
*/}}
{{- define "mia-dpo.runConfig" -}}
{{- $cfg := deepCopy (.Values.config | default dict) }}
{{- $stages := include "mia-dpo.stages" . | fromJsonArray }}
{{- $workers := dict }}
{{- range $stages }}
{{- $_ := set $workers . (int (index $.Values . "parallelism")) }}
{{- end }}
{{- $chart := dict
  "run_id" (include "mia-dpo.runId" .)
  "stages" $stages
  "queue" (dict "backend" "redis" "url" (include "mia-dpo.redisUrl" .))
  "store" (dict
    "backend" "s3"
    "endpoint" (include "mia-dpo.s3Endpoint" .)
    "bucket" .Values.s3.bucket
    "secure" (include "mia-dpo.s3Secure" . | eq "true"))
  "launcher" (dict
    "kind" "kubernetes"
    "workers" $workers
    "kubernetes" (dict "job_templates" "/etc/mia-dpo/jobs" "cleanup" .Values.controller.cleanup))
}}
{{- toYaml (mergeOverwrite $cfg $chart) }}
{{- end }}
