"""Static checks of docker/: the Compose files, the run config they mount, the
Dockerfile's stage layout and the build context. No Docker needed; the images and the
stack themselves are exercised end to end by docker/ci-e2e.sh."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mia_dpo.config import load_config
from mia_dpo.records import DEFAULT_STAGES, MODEL_STAGES, STAGE_ORDER

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
CPU_STAGES = [s for s in STAGE_ORDER if s not in MODEL_STAGES]


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_config_loads_and_holds_no_credential(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("MIA_DPO_REDIS_URL", "MIA_DPO_REDIS_PASSWORD", "MIA_DPO_S3_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    cfg = load_config(str(DOCKER / "compose-config.yaml"))
    assert cfg.launcher.kind == "external"
    assert cfg.queue.backend == "redis" and cfg.queue.url == "redis://redis:6379/0"
    assert cfg.store.backend == "s3" and cfg.store.endpoint == "minio:9000"
    assert cfg.stages == list(DEFAULT_STAGES)
    assert cfg.input.path.startswith("/opt/mia-dpo/demo/source/")
    assert cfg.model.path == "/opt/mia-dpo/demo/model"
    raw = yaml.safe_load((DOCKER / "compose-config.yaml").read_text())
    assert not {"password"} & set(raw["queue"])
    assert not {"access_key", "secret_key"} & set(raw["store"])


def test_every_stage_has_a_worker_on_the_right_image() -> None:
    services = compose()["services"]
    for stage in STAGE_ORDER:
        svc = services[f"worker-{stage}"]
        assert svc["command"][:4] == ["mia-dpo", "worker", "--stage", stage]
        image = svc["image"]
        if stage in MODEL_STAGES:
            assert "MIA_DPO_GPU_IMAGE" in image and svc["build"]["target"] == "gpu"
        else:
            assert "MIA_DPO_IMAGE" in image and svc["build"]["target"] == "light"
    ctl = services["controller"]
    assert ctl["command"][:3] == ["mia-dpo", "run", "/config/compose.yaml"]
    assert "--run-id" in ctl["command"] and ctl["restart"] == "no"
    assert ctl["stop_signal"] == "SIGINT"


def test_app_services_get_connections_from_the_environment() -> None:
    services = compose()["services"]
    for name in ["controller", *(f"worker-{s}" for s in STAGE_ORDER)]:
        svc = services[name]
        env = svc["environment"]
        for var in (
            "MIA_DPO_REDIS_URL",
            "MIA_DPO_REDIS_PASSWORD",
            "MIA_DPO_S3_ENDPOINT",
            "MIA_DPO_S3_ACCESS_KEY",
            "MIA_DPO_S3_SECRET_KEY",
            "MIA_DPO_RUN_ID",
        ):
            assert var in env, (name, var)
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        assert svc["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
        assert "./compose-config.yaml:/config/compose.yaml:ro" in svc["volumes"]


def test_backing_services() -> None:
    c = compose()
    assert c["version"] == "3.8"
    redis, minio, init = (c["services"][n] for n in ("redis", "minio", "minio-init"))
    assert "--requirepass" in redis["command"][-1] and "healthcheck" in redis
    assert "REDISCLI_AUTH" in redis["environment"]
    assert "minio/minio" in minio["image"] and "healthcheck" in minio
    assert "minio/mc" in init["image"] and "mc mb" in init["command"][0]
    for port in minio["ports"]:
        assert port.startswith("127.0.0.1:"), port
    ci = yaml.safe_load((DOCKER / "compose.ci.yaml").read_text())
    assert ci["version"] == "3.8"
    assert set(ci["services"]) == {"redis", "minio", "minio-init"}


@pytest.mark.parametrize("stage", CPU_STAGES)
def test_light_image_stages_import_no_torch(stage: str) -> None:
    """augment and select run on the light image, which has no torch."""
    code = f"""
import sys
class Block:
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "transformers", "peft", "trl", "datasets"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
from mia_dpo.stages import get_stage
import mia_dpo.cli, mia_dpo.controller, mia_dpo.runtime.worker, mia_dpo.status
get_stage({stage!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT / "services")


def test_dockerfile_stage_order_and_user() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\S+)$", text, flags=re.M)
    assert stages.index("light") < stages.index("os-cuda") < stages.index("venv-gpu")
    assert stages[-1] == "gpu"
    for target in ("light", "gpu"):
        body = text.split(f" AS {target}\n", 1)[1].split("\nFROM ", 1)[0]
        assert "USER 10001:10001" in body and "WORKDIR /app" in body
        assert "COPY --from=venv-" in body  # the venv comes from a builder stage
    assert "ENTRYPOINT" not in text


def test_build_context_excludes_local_state() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    rules = [line for line in lines if line and not line.startswith("#")]
    assert rules[0] == "*"  # an allowlist: .git, .venv, .demo, tests, ... stay out
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    assert {"pyproject.toml", "README.md", "services", "docker/image", "docker/local"} <= allowed
    # the wheel's license file and the pins every image installs within
    assert {"LICENSE", "constraints.txt"} <= allowed


def test_both_images_install_within_constraints() -> None:
    """Every dependency install of both images is bounded by constraints.txt (what CI
    tested), so an image built in a year has the same versions."""
    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    runs = [ln for ln in text.splitlines() if ln.startswith("RUN ") and "requirements.txt" in ln]
    installs = [r for r in runs if "-r /ctx/requirements.txt" in r]
    assert len(installs) == 2, runs  # venv-light and venv-gpu
    for run in installs:
        assert "-c /ctx/project-constraints.txt" in run, run
    assert text.count("COPY constraints.txt /ctx/project-constraints.txt") == 2
