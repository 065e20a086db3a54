# mia-dpo Helm chart

One release runs one [mia-dpo](../../README.md) run: a controller Job plans it and
creates one batch/v1 Job per stage (augment -> generate -> [calibrate ->] score -> select
-> train -> evaluate) from the Job templates the chart renders into its ConfigMap. Workers
take shard tasks from Redis and exchange data through S3 (a bundled MinIO by default), so
GPU pods exist only while their stage runs. Operations guide: `docs/operations.md`
("Kubernetes: the Helm chart").

This file is generated: the header from `hack/README.md.tpl`, the values table from the
`# --` comments of `values.yaml`.

```sh
.venv/bin/python charts/mia-dpo/hack/gen_schema.py   # values.schema.json (after config or base-schema changes)
.venv/bin/python charts/mia-dpo/hack/gen_readme.py   # this README (after values.yaml or template changes)
.venv/bin/python -m pytest -q tests/chart            # lint, kubernetes-validate --strict, contract
```

## Install

The defaults are a real run: LLaVA-1.5-7B (`llava-hf/llava-1.5-7b-hf`, from the Hugging
Face hub) on a LLaVA-format index in the bundled MinIO, one GPU per GPU stage on nodes
labelled `nvidia.com/gpu.present=true`, every other run setting mia-dpo's own default.

```sh
helm install mia-dpo charts/mia-dpo -n mia --create-namespace \
    --set networkPolicy.allowHub=true --set modelCache.enabled=true
```

The controller starts at once; with no index in the bucket yet it stops with
`input.path: s3://mia-dpo/input/llava_v1_5_mix665k.json: file not found` (exit 2, not
retried). Upload the data, then start the controller again:

```sh
kubectl -n mia port-forward svc/mia-dpo-minio 9000:9000 &
export AWS_ACCESS_KEY_ID=$(kubectl -n mia get secret mia-dpo-s3 -o jsonpath='{.data.access-key}' | base64 -d)
export AWS_SECRET_ACCESS_KEY=$(kubectl -n mia get secret mia-dpo-s3 -o jsonpath='{.data.secret-key}' | base64 -d)
aws --endpoint-url http://localhost:9000 s3 mb s3://mia-dpo      # if the run has not made it
aws --endpoint-url http://localhost:9000 s3 cp llava_v1_5_mix665k.json s3://mia-dpo/input/
aws --endpoint-url http://localhost:9000 s3 sync images/ s3://mia-dpo/input/images/
kubectl -n mia delete job mia-dpo-controller
helm upgrade mia-dpo charts/mia-dpo -n mia --reuse-values       # creates the controller Job again
```

With data already in your own S3, set `s3.*` and `config.input.*` and install once.

**The demo** baked into the images (200 synthetic samples and a tiny LLaVA, no hub, no
GPU needed for correctness) is a values file:

```sh
helm install demo charts/mia-dpo -n mia --create-namespace -f charts/mia-dpo/ci/demo-values.yaml
```

`ci/kind-values.yaml` is the same demo sized for a CPU-only kind cluster
(`k8s/kind-up.sh` installs it). The other `ci/*-values.yaml` files are worked examples
that the chart tests render and validate: external Redis/S3 with Secrets
(`external-services`), multi-node training (`multi-gpu`), and every operator setting
below at once (`operator`).

## Following a run

Every stage Job and pod carries `mia-dpo.io/run-id`, `mia-dpo.io/stage`,
`app.kubernetes.io/instance` (the release) and `mia-dpo.io/stage-index`, the stage's
position in the run, zero-padded (`"01"`, `"02"`, ...) so that it sorts:

```sh
kubectl -n mia get jobs -l mia-dpo.io/run-id=mia-dpo \
    --sort-by='.metadata.labels.mia-dpo\.io/stage-index' -L mia-dpo.io/stage-index
kubectl -n mia get pods -l mia-dpo.io/run-id=mia-dpo -L mia-dpo.io/stage-index,mia-dpo.io/stage
kubectl -n mia logs job/mia-dpo-controller --tail=20   # ends with the `mia-dpo status` table
```

The controller runs `mia-dpo run --summary`: whether the run succeeds or fails, its log
ends with the table `mia-dpo status --run-id <id>` prints (shards done, queued, leased,
dead-lettered, kept and dropped per stage), after the error line when it failed.

## Operator recipes

**Kueue (GPU quota).** Kueue reads the queue name from a label on the Job. Put it on the
GPU stages only; the chart then creates those Jobs suspended (`spec.suspend: true`) and
Kueue starts them when the LocalQueue has quota:

```yaml
generate: {jobLabels: {kueue.x-k8s.io/queue-name: gpu-queue}}
score:    {jobLabels: {kueue.x-k8s.io/queue-name: gpu-queue}}
train:    {jobLabels: {kueue.x-k8s.io/queue-name: gpu-queue}}
evaluate: {jobLabels: {kueue.x-k8s.io/queue-name: gpu-queue}}
calibrate: {jobLabels: {kueue.x-k8s.io/queue-name: gpu-queue}}   # when score calibrates
```

The global `jobLabels` / `jobAnnotations` go on every stage Job, `podLabels` /
`podAnnotations` on every pod; a stage's own maps are merged over the global ones. The
labels the chart sets itself (`app.kubernetes.io/*`, `helm.sh/chart`, `mia-dpo.io/*`)
always win: selectors, NetworkPolicies and the controller rely on them.

**Priority and runtime.** `priorityClassName` applies to the controller and every stage
pod, `<stage>.priorityClassName` and `controller.priorityClassName` override it (e.g. a
preemptible class for generate, a higher one for train). `runtimeClassName` (e.g. `nvidia`
where the NVIDIA container runtime is a RuntimeClass) applies to the stage pods;
`<stage>.runtimeClassName` overrides it, e.g. `runc` for the CPU stages.

**Model cache.** Without one, every GPU pod downloads the model into its own `/scratch`
emptyDir. `modelCache.enabled: true` mounts a shared PersistentVolumeClaim in the model
stages (generate, calibrate, score, train, evaluate) at `modelCache.mountPath`
(`/hf-cache`) and sets `HF_HOME` to it: the first pod downloads, the others read. The
chart makes the claim `<release>-model-cache` (`size`, `storageClass`, `accessModes`,
ReadWriteMany by default because stage pods run on several nodes; ReadWriteOnce only when
all model stages are pinned to one node), or uses `existingClaim`. A cache filled
beforehand (e.g. a Job running `HF_HOME=/hf-cache hf download llava-hf/llava-1.5-7b-hf`)
can be mounted read-only: `modelCache.readOnly: true` sets `HF_HUB_CACHE=<mountPath>/hub`
and `HF_HUB_OFFLINE=1`, and `HF_HOME` stays on `/scratch` for the rest.

**Hub access.** The NetworkPolicies keep every pod away from the internet.
`networkPolicy.allowHub: true` lets the model stages (not the controller, not augment or
select, which load no model) reach TCP 443, optionally only `networkPolicy.hub.cidrs`
(the hub serves files from CDNs whose addresses change, so prefer an egress proxy or your
network plugin's FQDN rules to a CIDR list). Gated or private models need a token:
`kubectl create secret generic hf-token --from-literal=token=hf_...` and
`hfToken.existingSecret: hf-token` give the model stages `HF_TOKEN`. With the defaults
(a hub id, no hub access, no cache) the install notes warn that the model cannot be
downloaded.

**Secrets under GitOps.** Empty `redis.password`, `s3.accessKey` and `s3.secretKey` get
random values that `helm upgrade` keeps by looking the Secret up in the cluster. Argo CD
and other tools that render with `helm template` have no cluster to look in, so the
values would change on every sync. There, create the Secrets yourself (SealedSecrets,
External Secrets, SOPS) and name them: `redis.existingSecret` (+ `redis.passwordKey`) and
`s3.existingSecret` (+ `s3.accessKeyKey`, `s3.secretKeyKey`); the chart then renders no
Secret and every pod reads the named ones. Explicit values in your (encrypted) values
file work too: the rendering is then the same on every sync.

**Uninstall and what stays.** `helm uninstall` removes the controller, its stage Jobs
(owned by the controller Job) and the services, but keeps, by
`helm.sh/resource-policy: keep`:

- the MinIO PVC `<release>-minio` (`s3.minio.persistence`, on by default): the pairs, the
  trained adapter and the reports;
- the chart-made S3 Secret `<release>-s3`, MinIO's root credentials for that data;
- the model cache PVC `<release>-model-cache`, when the chart made it.

Installing the same release name again reuses them (the run resumes; a finished run does
nothing). Delete them when done:

```sh
kubectl -n mia delete pvc/mia-dpo-minio secret/mia-dpo-s3 pvc/mia-dpo-model-cache
```

## Values

@@VALUES_TABLE@@
