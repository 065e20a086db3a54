{{/*
The stage Jobs the controller creates, one per stage, rendered into the ConfigMap.
*/}}

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
{{- $model := has $stage (include "mia-dpo.modelStages" $ | fromJsonArray) }}
{{- $labels := include "mia-dpo.stageLabels" . }}
{{- $jobLabels := include "mia-dpo.mergeLabels" (dict "labels" $labels "extra" (list $v.jobLabels $.Values.jobLabels)) | fromYaml }}
{{- $jobAnnotations := merge (dict) ($v.jobAnnotations | default dict) ($.Values.jobAnnotations | default dict) }}
{{- $priorityClass := $v.priorityClassName | default $.Values.priorityClassName }}
{{- $runtimeClass := $v.runtimeClassName | default $.Values.runtimeClassName }}
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
    {{- toYaml $jobLabels | nindent 4 }}
  {{- with $jobAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- if hasKey $jobLabels "kueue.x-k8s.io/queue-name" }}
  # Kueue admits the Job (and unsuspends it) when its queue has quota.
  suspend: true
  {{- end }}
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
      {{- include "mia-dpo.podMetadata" (dict "ctx" $ "labels" $labels "podLabels" $v.podLabels "podAnnotations" $v.podAnnotations) | nindent 6 }}
    spec:
      restartPolicy: Never
      automountServiceAccountToken: false
      enableServiceLinks: false
      {{- if $multiNode }}
      subdomain: {{ $fullname }}-train
      {{- end }}
      {{- with $priorityClass }}
      priorityClassName: {{ . }}
      {{- end }}
      {{- with $runtimeClass }}
      runtimeClassName: {{ . }}
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
            {{- include "mia-dpo.env" (dict "ctx" $ "extraEnv" $v.extraEnv "model" $model) | nindent 12 }}
          {{- with $resources }}
          resources:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- include "mia-dpo.securityContext" $ | nindent 10 }}
          volumeMounts:
            {{- include "mia-dpo.volumeMounts" (dict "ctx" $ "shm" $shm "model" $model) | nindent 12 }}
      volumes:
        {{- include "mia-dpo.volumes" (dict "ctx" $ "shm" $shm "model" $model) | nindent 8 }}
      {{- with include "mia-dpo.scheduling" $v | trim }}
      {{- . | nindent 6 }}
      {{- end }}
{{- end }}
