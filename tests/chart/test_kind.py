"""k8s/: the kind cluster config, the values for it and the script that brings it up.
kind itself is not available here: the script is checked for syntax and for the
commands it must run."""

from __future__ import annotations

import subprocess

import yaml

from tests.chart.chart import CI_DIR, GPU_STAGES, REPO, Rendered

K8S = REPO / "k8s"


def test_kind_installs_the_ci_scenario() -> None:
    """One values file for kind: the chart's CI scenario, linted and rendered in CI."""
    assert not (K8S / "values-kind.yaml").exists()
    assert (CI_DIR / "kind-values.yaml").is_file()


def test_kind_config() -> None:
    cfg = yaml.safe_load((K8S / "kind-config.yaml").read_text())
    assert cfg["kind"] == "Cluster" and cfg["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    roles = [n["role"] for n in cfg["nodes"]]
    assert roles == ["control-plane", "worker"]
    worker = cfg["nodes"][1]
    assert worker["labels"] == {"nvidia.com/gpu.present": "true"}


def test_kind_worker_fits_the_gpu_stages(rendered: dict[str, Rendered]) -> None:
    """The GPU stages' nodeSelector matches the kind worker, and nothing they need is
    missing there (no GPU limit, no taint to tolerate)."""
    worker = yaml.safe_load((K8S / "kind-config.yaml").read_text())["nodes"][1]
    assert "kubeadmConfigPatches" not in worker  # no taints
    for stage in GPU_STAGES:
        pod = rendered["kind"].jobs[stage]["spec"]["template"]["spec"]
        assert pod["nodeSelector"].items() <= worker["labels"].items()
        assert "nvidia.com/gpu" not in pod["containers"][0]["resources"].get("limits", {})
        assert pod["containers"][0]["imagePullPolicy"] == "Never"


def test_kind_minio_claim_uses_the_default_storage_class(rendered: dict[str, Rendered]) -> None:
    """kind ships a default StorageClass ("standard"): the MinIO claim names none."""
    (pvc,) = rendered["kind"].kind("PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == "mia-dpo-minio"
    assert "storageClassName" not in pvc["spec"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_kind_up_script_syntax() -> None:
    script = K8S / "kind-up.sh"
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_kind_up_script_steps() -> None:
    text = (K8S / "kind-up.sh").read_text()
    for step in (
        "set -euo pipefail",
        'kind create cluster --name "${CLUSTER}" --config "${ROOT}/k8s/kind-config.yaml"',
        "docker build -f docker/Dockerfile --target light --build-arg VARIANT=cpu"
        ' -t "mia-dpo:${TAG}" .',
        "docker build -f docker/Dockerfile --target gpu --build-arg VARIANT=cpu"
        ' -t "mia-dpo-gpu:${TAG}" .',
        'kind load docker-image --name "${CLUSTER}" "mia-dpo:${TAG}" "mia-dpo-gpu:${TAG}"',
        '-f "${VALUES}"',
        "--wait",
        '"${HELM}" test',
        "get jobs -l app.kubernetes.io/instance=",
        # MinIO's PVC and S3 Secret outlive `helm uninstall`: --fresh drops them
        '"pvc/${FULLNAME}-minio" "secret/${FULLNAME}-s3"',
        "--sort-by='.metadata.labels.mia-dpo\\.io/stage-index'",
    ):
        assert step in text, step
    assert 'VALUES="${ROOT}/charts/mia-dpo/ci/kind-values.yaml"' in text
