"""Rendering the Helm chart with the real helm binary, and walking what it renders.

The helm binary is the one `make venv` installs next to the interpreter
(tools/get_helm.py), else the first `helm` on PATH. Nothing here talks to a cluster.
"""

from __future__ import annotations

import base64
import copy
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "mia-dpo"
CI_DIR = CHART / "ci"
SCENARIOS = sorted(p.stem.removesuffix("-values") for p in CI_DIR.glob("*-values.yaml"))
RELEASE = "mia-dpo"
NAMESPACE = "mia"
STAGES = ("augment", "generate", "score", "select", "train", "evaluate")
GPU_STAGES = ("generate", "score", "train", "evaluate")


def tool(name: str) -> str:
    """A venv tool (helm, kubernetes-validate) beside sys.executable, else on PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise AssertionError(
            f"{name} not found next to {sys.executable} or on PATH; run `make venv` "
            "(tools/get_helm.py installs helm into .venv/bin)"
        )
    return found


def helm(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("helm"), *map(str, args)], capture_output=True, text=True, check=False
    )


@dataclass
class Rendered:
    """One `helm template` output: the objects, and the stage Job templates that the
    ConfigMap carries as YAML text."""

    text: str
    objects: list[dict[str, Any]]
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    job_texts: dict[str, str] = field(default_factory=dict)

    def kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [o for o in self.kind(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind}/{name}, got {len(found)}"
        return found[0]

    @property
    def configmap(self) -> dict[str, Any]:
        return self.get("ConfigMap", f"{RELEASE}-run")

    @property
    def config_text(self) -> str:
        return str(self.configmap["data"]["config.yaml"])

    @property
    def controller(self) -> dict[str, Any]:
        return self.get("Job", f"{RELEASE}-controller")

    def secret_data(self) -> dict[str, dict[str, str]]:
        """Secret name -> key -> decoded value, for the Secrets the chart renders."""
        out: dict[str, dict[str, str]] = {}
        for s in self.kind("Secret"):
            data = {k: base64.b64decode(v).decode() for k, v in (s.get("data") or {}).items()}
            data.update(s.get("stringData") or {})
            out[s["metadata"]["name"]] = data
        return out

    def pod_specs(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(where, pod spec) of every pod the release can start: workloads, the test pod
        and the stage Job templates."""
        for o in self.objects:
            if o["kind"] in ("Job", "Deployment"):
                yield f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"]
            elif o["kind"] == "Pod":
                yield f"Pod/{o['metadata']['name']}", o["spec"]
        for stage, job in self.jobs.items():
            yield f"template job-{stage}.yaml", job["spec"]["template"]["spec"]


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def parse(text: str) -> Rendered:
    objects = [o for o in yaml.safe_load_all(text) if o]
    rendered = Rendered(text=text, objects=objects)
    cms = [o for o in objects if o["kind"] == "ConfigMap"]
    for cm in cms:
        for key, value in (cm.get("data") or {}).items():
            if key.startswith("job-") and key.endswith(".yaml"):
                stage = key.removeprefix("job-").removesuffix(".yaml")
                rendered.job_texts[stage] = value
                rendered.jobs[stage] = yaml.safe_load(value)
    return rendered


def template(
    *values_files: Path, sets: dict[str, str] | None = None, release: str = RELEASE
) -> subprocess.CompletedProcess[str]:
    args: list[str | Path] = ["template", release, CHART, "--namespace", NAMESPACE]
    for f in values_files:
        args += ["-f", f]
    for key, value in (sets or {}).items():
        args += ["--set", f"{key}={value}"]
    return helm(*args)


def render(
    *values_files: Path, sets: dict[str, str] | None = None, release: str = RELEASE
) -> Rendered:
    proc = template(*values_files, sets=sets, release=release)
    assert proc.returncode == 0, f"helm template failed:\n{proc.stderr}"
    return parse(proc.stdout)


def scenario_file(name: str) -> Path:
    return CI_DIR / f"{name}-values.yaml"


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Helm's merge of a values file over the chart's values (maps merge, the rest
    is replaced)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def values_for(*values_files: Path) -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    for f in values_files:
        values = deep_merge(values, yaml.safe_load(f.read_text()) or {})
    return values


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def walk_keys(node: Any) -> Iterator[str]:
    """Every mapping key in a nested structure."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield str(k)
            yield from walk_keys(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk_keys(v)
