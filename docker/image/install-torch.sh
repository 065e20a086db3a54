#!/bin/sh
# Installs torch into /opt/venv (gpu image builder stage), then writes
# /ctx/constraints.txt pinning the installed build, so that no later requirement
# (transformers, peft, trl) can swap in another torch.
#   VARIANT=cuda: torch==$TORCH_VERSION from PyPI (its wheels carry their CUDA
#                 libraries), or from $TORCH_INDEX_URL when set.
#   VARIANT=cpu:  a CPU wheel placed in the build context (docker/local/wheels/
#                 torch-$TORCH_VERSION+cpu-cpXY-*.whl, matching the image's Python),
#                 else torch==$TORCH_VERSION from the PyTorch CPU index.
set -eu
: "${VARIANT:?}" "${TORCH_VERSION:?}"
pip=/ctx/pip
pytag=$(/opt/venv/bin/python -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
case "$VARIANT" in
  cpu)
    wheel=""
    for w in /ctx/local/wheels/torch-"$TORCH_VERSION"+cpu-"$pytag"-*.whl; do
      [ -f "$w" ] && wheel="$w"
    done
    if [ -n "$wheel" ]; then
      echo "torch: $wheel (from the build context)"
      "$pip" install --no-compile "$wheel"
    else
      "$pip" install --no-compile \
        --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" \
        "torch==$TORCH_VERSION"
    fi
    ;;
  cuda)
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
      "$pip" install --no-compile --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"
    else
      "$pip" install --no-compile "torch==$TORCH_VERSION"
    fi
    ;;
  *)
    echo "VARIANT must be cuda or cpu, got '$VARIANT'" >&2
    exit 2
    ;;
esac
installed=$(/opt/venv/bin/python -c 'import importlib.metadata as m; print(m.version("torch"))')
echo "torch==$installed" >/ctx/constraints.txt
echo "pinned torch==$installed"
