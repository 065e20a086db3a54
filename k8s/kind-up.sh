#!/usr/bin/env bash
# mia-dpo on kind: create the cluster (k8s/kind-config.yaml), build the light and GPU
# images for the CPU, load them (and the bundled Redis and MinIO images) into the nodes,
# and install the chart with charts/mia-dpo/ci/kind-values.yaml (the chart's kind CI
# scenario, so the values we lint are the values we install). Rerunning it rebuilds the
# images and reinstalls the release. The bundled MinIO keeps its data on a PVC that
# `helm uninstall` leaves (with its S3 Secret), so a reinstall resumes the run and skips
# the stages already finished; --fresh deletes both first and the run starts over.
#
#   k8s/kind-up.sh                 # everything
#   k8s/kind-up.sh --no-build      # reuse the images already built
#   k8s/kind-up.sh --fresh         # also drop the kept MinIO data: a new run from scratch
#   k8s/kind-up.sh --delete        # delete the cluster
#
# Environment: CLUSTER (mia-dpo), NAMESPACE (mia), RELEASE (mia-dpo), TAG (dev),
# KIND_NODE_IMAGE (kind's default node image), HELM (helm on PATH, else .venv/bin/helm).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLUSTER="${CLUSTER:-mia-dpo}"
NAMESPACE="${NAMESPACE:-mia}"
RELEASE="${RELEASE:-mia-dpo}"
TAG="${TAG:-dev}"
CONTEXT="kind-${CLUSTER}"
# The chart's resource-name prefix (its fullname helper): the release name, plus
# "-mia-dpo" unless it already contains it.
if [[ "${RELEASE}" == *mia-dpo* ]]; then FULLNAME="${RELEASE}"; else FULLNAME="${RELEASE}-mia-dpo"; fi
VALUES="${ROOT}/charts/mia-dpo/ci/kind-values.yaml"
CHART="${ROOT}/charts/mia-dpo"

BUILD=1
FRESH=0
for arg in "$@"; do
  case "${arg}" in
    --no-build) BUILD=0 ;;
    --fresh) FRESH=1 ;;
    --delete)
      kind delete cluster --name "${CLUSTER}"
      exit 0
      ;;
    -h | --help)
      sed -n '2,17p' "${BASH_SOURCE[0]}"
      exit 0
      ;;
    *)
      echo "kind-up: unknown argument ${arg} (try --help)" >&2
      exit 2
      ;;
  esac
done

log() { printf '\n==> %s\n' "$*" >&2; }
need() {
  if ! command -v "$1" >/dev/null 2>&1; then
    echo "kind-up: $1 is not installed" >&2
    exit 1
  fi
}

if [[ -n "${HELM:-}" ]]; then
  :
elif command -v helm >/dev/null 2>&1; then
  HELM=helm
else
  HELM="${ROOT}/.venv/bin/helm"
fi
need docker
need kind
need kubectl
need "${HELM}"

if kind get clusters 2>/dev/null | grep -qx "${CLUSTER}"; then
  log "kind cluster ${CLUSTER} exists"
else
  log "creating kind cluster ${CLUSTER}"
  create=(kind create cluster --name "${CLUSTER}" --config "${ROOT}/k8s/kind-config.yaml" --wait 120s)
  if [[ -n "${KIND_NODE_IMAGE:-}" ]]; then
    create+=(--image "${KIND_NODE_IMAGE}")
  fi
  "${create[@]}"
fi

if [[ "${BUILD}" == 1 ]]; then
  log "building mia-dpo:${TAG} (light) and mia-dpo-gpu:${TAG} (GPU stages, CPU torch)"
  (
    cd "${ROOT}"
    docker build -f docker/Dockerfile --target light --build-arg VARIANT=cpu -t "mia-dpo:${TAG}" .
    docker build -f docker/Dockerfile --target gpu --build-arg VARIANT=cpu -t "mia-dpo-gpu:${TAG}" .
  )
fi

log "loading the images into the kind nodes"
kind load docker-image --name "${CLUSTER}" "mia-dpo:${TAG}" "mia-dpo-gpu:${TAG}"
# The bundled Redis and MinIO images, as the chart renders them: pulled here once and
# loaded, so the nodes need no registry access.
mapfile -t extra_images < <(
  "${HELM}" template "${RELEASE}" "${CHART}" -f "${VALUES}" --namespace "${NAMESPACE}" \
    --set "image.tag=${TAG}" --set "gpuImage.tag=${TAG}" |
    sed -n 's/^ *image: "\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' | sort -u |
    grep -v -e "^mia-dpo:" -e "^mia-dpo-gpu:" || true
)
for image in "${extra_images[@]}"; do
  if ! docker image inspect "${image}" >/dev/null 2>&1; then
    docker pull "${image}"
  fi
  kind load docker-image --name "${CLUSTER}" "${image}"
done

if "${HELM}" status "${RELEASE}" --namespace "${NAMESPACE}" --kube-context "${CONTEXT}" >/dev/null 2>&1; then
  log "uninstalling the previous release ${RELEASE} (a Job's pods cannot be changed)"
  "${HELM}" uninstall "${RELEASE}" --namespace "${NAMESPACE}" --kube-context "${CONTEXT}" --wait
fi
if [[ "${FRESH}" == 1 ]]; then
  log "deleting the kept MinIO data and its credentials (--fresh)"
  kubectl --context "${CONTEXT}" -n "${NAMESPACE}" delete --ignore-not-found --wait \
    "pvc/${FULLNAME}-minio" "secret/${FULLNAME}-s3"
fi

log "installing ${RELEASE} into namespace ${NAMESPACE}"
"${HELM}" install "${RELEASE}" "${CHART}" \
  --kube-context "${CONTEXT}" --namespace "${NAMESPACE}" --create-namespace \
  -f "${VALUES}" --set "image.tag=${TAG}" --set "gpuImage.tag=${TAG}" \
  --wait --timeout 5m

log "checking Redis and S3 from inside the cluster"
"${HELM}" test "${RELEASE}" --namespace "${NAMESPACE}" --kube-context "${CONTEXT}" --logs

kubectl --context "${CONTEXT}" -n "${NAMESPACE}" get jobs,pods -l "app.kubernetes.io/instance=${RELEASE}"
cat >&2 <<MSG

Follow the run (its stage Jobs in order; the controller's log ends with \`mia-dpo status\`):
  kubectl --context ${CONTEXT} -n ${NAMESPACE} get jobs -l mia-dpo.io/run-id=kind-demo --sort-by='.metadata.labels.mia-dpo\.io/stage-index'
  kubectl --context ${CONTEXT} -n ${NAMESPACE} get jobs -l app.kubernetes.io/instance=${RELEASE} -w
  kubectl --context ${CONTEXT} -n ${NAMESPACE} logs -f job/${FULLNAME}-controller
  kubectl --context ${CONTEXT} -n ${NAMESPACE} logs -l app.kubernetes.io/instance=${RELEASE},mia-dpo.io/stage=generate --prefix
The MinIO data outlives \`helm uninstall\`: kubectl --context ${CONTEXT} -n ${NAMESPACE} delete pvc/${FULLNAME}-minio secret/${FULLNAME}-s3
Delete everything:
  k8s/kind-up.sh --delete
MSG
