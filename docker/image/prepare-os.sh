#!/bin/sh
# First layer of every mia-dpo image (run as root by docker/Dockerfile).
# - Python >= 3.11 with venv: python:3.11-slim already has it; a plain Debian/Ubuntu
#   base (the CI's debootstrap image, nvidia/cuda) gets python3 + python3-venv from apt.
# - The unprivileged user 10001 (group 10001), HOME=/tmp.
# - /app (WORKDIR) and /scratch (HF_HOME=/scratch/hf) writable by uid 10001 and by
#   group 0, so a platform that runs the image under an arbitrary uid still works.
set -eu

if ! python3 -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  apt-get install -y --no-install-recommends python3 python3-venv ca-certificates
  apt-get clean
  rm -rf /var/lib/apt/lists/* /var/log/apt /var/log/dpkg.log /var/cache/debconf/*-old
fi
python3 -c 'import sys; assert sys.version_info >= (3, 11), sys.version'

getent group 10001 >/dev/null || groupadd --gid 10001 mia
getent passwd 10001 >/dev/null ||
  useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin mia

mkdir -p /app /scratch/hf /opt/mia-dpo
chown -R 10001:0 /app /scratch
chmod -R 0775 /app /scratch
