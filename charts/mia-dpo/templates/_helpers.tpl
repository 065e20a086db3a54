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

{{/* Labels of a stage Job and its pods. Context: dict ctx, stage. */}}
{{- define "mia-dpo.stageLabels" -}}
{{ include "mia-dpo.baseLabels" (dict "ctx" .ctx "component" .stage) }}
mia-dpo.io/stage: {{ .stage }}
mia-dpo.io/run-id: {{ include "mia-dpo.runId" .ctx }}
{{- end }}

{{/*
A pod template's metadata body: the given labels plus podLabels, and podAnnotations.
Context: dict ctx, labels (rendered labels).
*/}}
{{- define "mia-dpo.podMetadata" -}}
labels:
  {{- .labels | nindent 2 }}
  {{- with .ctx.Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with .ctx.Values.podAnnotations }}
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

{{/* The environment of mia-dpo containers. Context: dict ctx, extraEnv. */}}
{{- define "mia-dpo.env" -}}
- name: MIA_DPO_RUN_ID
  value: {{ include "mia-dpo.runId" .ctx | quote }}
{{ include "mia-dpo.credentialEnv" .ctx }}
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

{{/* volumeMounts of a mia-dpo container. Context: dict ctx, shm (bool: /dev/shm). */}}
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
volumes of a mia-dpo pod. Context: dict ctx, shm (bool), jobs (bool: the controller also
gets the stage Job templates, at /etc/mia-dpo/jobs/<stage>.yaml).
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

{{/* ------------------------------------------------------------- stage Jobs */}}

{{/* GPUs of one pod of a stage. Context: dict ctx, stage. */}}
{{- define "mia-dpo.stageGpus" -}}
{{- $v := index .ctx.Values .stage }}
{{- if eq .stage "train" }}{{ int $v.gpusPerNode }}{{ else }}{{ int $v.gpu }}{{ end }}
{{- end }}

{{/* The container command and args of a stage. Context: dict ctx, stage. */}}
{{- define "mia-dpo.stageCommand" -}}
{{- $v := index .ctx.Values .stage -}}
{{- $run := include "mia-dpo.runId" .ctx -}}
{{- $task := list "-m" "mia_dpo" "stage-task" "--stage" .stage "--run-id" $run "--config" "/etc/mia-dpo/config.yaml" -}}
{{- if and (eq .stage "train") (gt (int $v.nodes) 1) -}}
{{- $svc := printf "%s-train" (include "mia-dpo.fullname" .ctx) -}}
command: ["torchrun"]
args:
  {{- concat (list
      "--nnodes" (toString (int $v.nodes))
      "--nproc-per-node" (toString (max 1 (int $v.gpusPerNode)))
      "--rdzv-backend" "c10d"
      "--rdzv-endpoint" (printf "%s-0.%s:%d" $svc $svc (int $v.rendezvousPort))
      "--rdzv-id" $run) $task | toYaml | nindent 2 }}
{{- else if and (eq .stage "train") (gt (int $v.gpusPerNode) 1) -}}
command: ["torchrun"]
args:
  {{- concat (list "--standalone" "--nproc-per-node" (toString (int $v.gpusPerNode))) $task | toYaml | nindent 2 }}
{{- else -}}
command: ["mia-dpo"]
args: ["worker", "--stage", {{ .stage | quote }}, "--config", "/etc/mia-dpo/config.yaml"]
{{- end }}
{{- end }}

{{/*
A stage's batch/v1 Job, as the controller creates it. Context: dict ctx, stage.
*/}}
{{- define "mia-dpo.stageJob" -}}
{{- $ := .ctx }}
{{- $stage := .stage }}
{{- $v := index $.Values $stage }}
{{- $fullname := include "mia-dpo.fullname" $ }}
{{- $gpuImage := has $stage (include "mia-dpo.gpuImageStages" $ | fromJsonArray) }}
{{- $gpus := include "mia-dpo.stageGpus" . | int }}
{{- $multiNode := and (eq $stage "train") (gt (int $v.nodes) 1) }}
{{- $oneTask := and (eq $stage "train") (not $multiNode) (gt (int $v.gpusPerNode) 1) }}
{{- $shm := and $gpuImage $.Values.shm.enabled }}
{{- $resources := deepCopy ($v.resources | default dict) }}
{{- if gt $gpus 0 }}
{{- $limits := $resources.limits | default dict }}
{{- $_ := set $limits "nvidia.com/gpu" $gpus }}
{{- $_ := set $resources "limits" $limits }}
{{- end -}}
apiVersion: batch/v1
kind: Job
metadata:
  name: {{ $fullname }}-{{ $stage }}
  labels:
    {{- include "mia-dpo.stageLabels" . | nindent 4 }}
spec:
  {{- if $multiNode }}
  # One pod per node; torchrun's c10d rendezvous on pod 0 via the headless Service.
  completionMode: Indexed
  completions: {{ int $v.nodes }}
  parallelism: {{ int $v.nodes }}
  {{- else if $oneTask }}
  # One pod, torchrun --standalone over its GPUs.
  completions: 1
  parallelism: 1
  {{- else }}
  # Work-queue pattern: no completions; pods exit 0 when the stage is closed and drained.
  parallelism: {{ int $v.parallelism }}
  {{- end }}
  backoffLimit: {{ int $v.backoffLimit }}
  {{- if not (kindIs "invalid" $v.activeDeadlineSeconds) }}
  activeDeadlineSeconds: {{ int64 $v.activeDeadlineSeconds }}
  {{- end }}
  {{- if not (kindIs "invalid" $v.ttlSecondsAfterFinished) }}
  ttlSecondsAfterFinished: {{ int64 $v.ttlSecondsAfterFinished }}
  {{- end }}
  {{- with $.Values.podFailurePolicy }}
  podFailurePolicy:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  template:
    metadata:
      {{- include "mia-dpo.podMetadata" (dict "ctx" $ "labels" (include "mia-dpo.stageLabels" .)) | nindent 6 }}
    spec:
      restartPolicy: Never
      automountServiceAccountToken: false
      enableServiceLinks: false
      {{- if $multiNode }}
      subdomain: {{ $fullname }}-train
      {{- end }}
      {{- include "mia-dpo.podCommon" $ | nindent 6 }}
      containers:
        - name: worker
          {{- include "mia-dpo.containerImage" (dict "ctx" $ "image" $v.image "gpu" $gpuImage) | nindent 10 }}
          {{- include "mia-dpo.stageCommand" . | nindent 10 }}
          {{- if $multiNode }}
          ports:
            - name: c10d
              containerPort: {{ int $v.rendezvousPort }}
          {{- end }}
          env:
            {{- include "mia-dpo.env" (dict "ctx" $ "extraEnv" $v.extraEnv) | nindent 12 }}
          {{- with $resources }}
          resources:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- include "mia-dpo.securityContext" $ | nindent 10 }}
          volumeMounts:
            {{- include "mia-dpo.volumeMounts" (dict "ctx" $ "shm" $shm) | nindent 12 }}
      volumes:
        {{- include "mia-dpo.volumes" (dict "ctx" $ "shm" $shm) | nindent 8 }}
      {{- with include "mia-dpo.scheduling" $v | trim }}
      {{- . | nindent 6 }}
      {{- end }}
{{- end }}
