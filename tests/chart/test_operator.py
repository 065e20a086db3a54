"""What a cluster operator sets: priority and runtime classes, Job and pod labels and
annotations (Kueue), image pull secrets, the Hugging Face token and model cache, MinIO
persistence, GitOps-safe Secrets, and the labels `kubectl` sorts a run's stages by. Each
is rendered with the real helm, checked where it must land, and validated strictly."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.chart import (
    CHART,
    NAMESPACE,
    RELEASE,
    STAGES,
    Rendered,
    containers,
    env_of,
    helm,
    render,
    scenario_file,
    tool,
)

MODEL_STAGES = ("generate", "calibrate", "score", "train", "evaluate")
CPU_STAGES = ("augment", "select")
KUEUE = "kueue.x-k8s.io/queue-name"
INDEX = "mia-dpo.io/stage-index"


def _values(tmp_path: Path, values: dict[str, Any], name: str = "v.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return path


def _pod(r: Rendered, stage: str) -> dict[str, Any]:
    return r.jobs[stage]["spec"]["template"]["spec"]


def _validate(tmp_path: Path, *renders: Rendered) -> None:
    """kubernetes-validate --strict (1.33) on the manifests and each stage Job template."""
    files = []
    for i, r in enumerate(renders):
        files.append(tmp_path / f"r{i}.yaml")
        files[-1].write_text(r.text)
        for stage, text in r.job_texts.items():
            files.append(tmp_path / f"r{i}-{stage}.yaml")
            files[-1].write_text(text)
    proc = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "-k", "1.33.0", "--quiet", *map(str, files)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def operator() -> Rendered:
    return render(scenario_file("operator"))


@pytest.fixture(scope="module")
def default() -> Rendered:
    return render()


# ------------------------------------------------------------ priority and runtime


def test_priority_and_runtime_classes(operator: Rendered, default: Rendered) -> None:
    for stage in STAGES:
        pod = _pod(operator, stage)
        want = "mia-dpo-train" if stage == "train" else "mia-dpo-batch"  # stage over global
        assert pod["priorityClassName"] == want, stage
        assert pod["runtimeClassName"] == ("runc" if stage in CPU_STAGES else "nvidia"), stage
    controller = operator.controller["spec"]["template"]["spec"]
    assert controller["priorityClassName"] == "mia-dpo-control"
    assert "runtimeClassName" not in controller  # the controller runs no model
    for where, pod in default.pod_specs():
        assert "priorityClassName" not in pod and "runtimeClassName" not in pod, where


def test_global_priority_reaches_the_controller(tmp_path: Path) -> None:
    r = render(_values(tmp_path, {"priorityClassName": "batch-low"}))
    assert r.controller["spec"]["template"]["spec"]["priorityClassName"] == "batch-low"
    assert {_pod(r, s)["priorityClassName"] for s in STAGES} == {"batch-low"}
    # the bundled services and the test pod keep the cluster default
    for d in r.kind("Deployment"):
        assert "priorityClassName" not in d["spec"]["template"]["spec"]


# ------------------------------------------------------------- labels, annotations


def test_job_and_pod_labels_merge_per_stage_over_global(operator: Rendered) -> None:
    for stage in STAGES:
        job = operator.jobs[stage]
        labels, annotations = job["metadata"]["labels"], job["metadata"]["annotations"]
        pod_meta = job["spec"]["template"]["metadata"]
        team = "vision-train" if stage == "train" else "vision"
        assert labels["team"] == team and pod_meta["labels"]["team"] == team, stage
        cost = "ml-training" if stage == "train" else "ml-research"
        assert annotations == {"example.com/cost-center": cost}, stage
        expect_pod = {"example.com/scrape": "false"}
        if stage == "generate":
            expect_pod["example.com/stage-note"] = "answers"
        assert pod_meta["annotations"] == expect_pod, stage
        # job labels stay on the Job, pod labels on the pods
        assert KUEUE not in pod_meta["labels"], stage
    # global podLabels/podAnnotations reach every other pod too; jobLabels only stage Jobs
    assert operator.controller["spec"]["template"]["metadata"]["labels"]["team"] == "vision"
    assert "team" not in operator.controller["metadata"]["labels"]
    for d in operator.kind("Deployment"):
        assert d["spec"]["template"]["metadata"]["annotations"] == {"example.com/scrape": "false"}


def test_kueue_queue_label_suspends_the_gpu_jobs(operator: Rendered, default: Rendered) -> None:
    for stage in STAGES:
        job = operator.jobs[stage]
        if stage in MODEL_STAGES:
            assert job["metadata"]["labels"][KUEUE] == "gpu-queue", stage
            assert job["spec"]["suspend"] is True, stage
        else:
            assert KUEUE not in job["metadata"]["labels"], stage
            assert "suspend" not in job["spec"], stage
    assert all("suspend" not in j["spec"] for j in default.jobs.values())


def test_chart_labels_cannot_be_overridden(tmp_path: Path) -> None:
    theirs = {"mia-dpo.io/stage": "mine", "mia-dpo.io/run-id": "mine", INDEX: "99",
              "app.kubernetes.io/instance": "mine", "extra": "kept"}  # fmt: skip
    r = render(_values(tmp_path, {
        "run": {"id": "r1"}, "jobLabels": theirs, "podLabels": theirs,
        "generate": {"jobLabels": theirs, "podLabels": theirs},
    }))  # fmt: skip
    for stage in STAGES:
        job = r.jobs[stage]
        for labels in (job["metadata"]["labels"], job["spec"]["template"]["metadata"]["labels"]):
            assert labels["mia-dpo.io/stage"] == stage
            assert labels["mia-dpo.io/run-id"] == "r1"
            assert labels["app.kubernetes.io/instance"] == RELEASE
            assert labels[INDEX] == f"{STAGES.index(stage) + 1:02d}"
            assert labels["extra"] == "kept"
    assert r.controller["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/instance"] == (
        RELEASE
    )


def test_a_numeric_run_id_stays_a_string_label(tmp_path: Path) -> None:
    r = render(_values(tmp_path, {"run": {"id": "2024"}}))
    labelled = [r.controller, r.controller["spec"]["template"], r.configmap]
    labelled += [part for j in r.jobs.values() for part in (j, j["spec"]["template"])]
    for obj in labelled:
        assert obj["metadata"]["labels"]["mia-dpo.io/run-id"] == "2024"
    _validate(tmp_path, r)


# ------------------------------------------------------------------ pull secrets


def test_image_pull_secrets_on_every_pod(operator: Rendered) -> None:
    wheres = []
    for where, pod in operator.pod_specs():
        assert pod["imagePullSecrets"] == [{"name": "registry-pull"}], where
        wheres.append(where)
    expected = {"Job/mia-dpo-controller", "Deployment/mia-dpo-redis", "Deployment/mia-dpo-minio",
                "Pod/mia-dpo-test", *(f"template job-{s}.yaml" for s in STAGES)}  # fmt: skip
    assert set(wheres) == expected


# ------------------------------------------------------- Hugging Face token, cache


def test_hf_token_only_in_the_model_stages(operator: Rendered, default: Rendered) -> None:
    for stage in STAGES:
        env = env_of(_pod(operator, stage)["containers"][0])
        if stage in MODEL_STAGES:
            ref = env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "hf-token", "key": "token"}, stage
        else:
            assert "HF_TOKEN" not in env, stage
    for where, pod in operator.pod_specs():  # the controller, services and test pod: none
        if not where.startswith("template "):
            assert all("HF_TOKEN" not in env_of(c) for c in containers(pod)), where
    for where, pod in default.pod_specs():
        assert all("HF_TOKEN" not in env_of(c) for c in containers(pod)), where


def test_model_cache_claim_mounted_as_hf_home(operator: Rendered) -> None:
    pvc = operator.get("PersistentVolumeClaim", "mia-dpo-model-cache")
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["storageClassName"] == "shared-nfs"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "200Gi"
    for stage in STAGES:
        pod = _pod(operator, stage)
        (c,) = pod["containers"]
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        env = env_of(c)
        if stage in MODEL_STAGES:
            assert mounts["model-cache"] == {"name": "model-cache", "mountPath": "/hf-cache",
                                             "readOnly": False}, stage  # fmt: skip
            claim = volumes["model-cache"]["persistentVolumeClaim"]
            assert claim == {"claimName": "mia-dpo-model-cache", "readOnly": False}, stage
            assert env["HF_HOME"]["value"] == "/hf-cache", stage
            assert "HF_HUB_OFFLINE" not in env, stage
        else:
            assert "model-cache" not in mounts and "HF_HOME" not in env, stage
    assert "model-cache" not in str(operator.controller)


def test_read_only_existing_cache_is_offline(tmp_path: Path) -> None:
    r = render(_values(tmp_path, {"modelCache": {
        "enabled": True, "existingClaim": "llava-cache", "readOnly": True,
        "mountPath": "/models/hf"}}))  # fmt: skip
    claims = [p["metadata"]["name"] for p in r.kind("PersistentVolumeClaim")]
    assert claims == ["mia-dpo-minio"]  # the existing claim is used, none is made
    for stage in ("generate", "train"):
        pod = _pod(r, stage)
        (c,) = pod["containers"]
        env = env_of(c)
        assert env["HF_HUB_CACHE"]["value"] == "/models/hf/hub"
        assert env["HF_HUB_OFFLINE"]["value"] == "1"
        assert "HF_HOME" not in env  # the image's /scratch/hf stays writable for the rest
        mount = next(m for m in c["volumeMounts"] if m["name"] == "model-cache")
        assert (mount["mountPath"], mount["readOnly"]) == ("/models/hf", True)
        volume = next(v for v in pod["volumes"] if v["name"] == "model-cache")
        assert volume["persistentVolumeClaim"] == {"claimName": "llava-cache", "readOnly": True}
    _validate(tmp_path, r)


# ----------------------------------------------------------------- MinIO, Secrets


def test_minio_persists_on_a_kept_claim_by_default(default: Rendered, tmp_path: Path) -> None:
    pvc = default.get("PersistentVolumeClaim", "mia-dpo-minio")
    assert pvc["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert "storageClassName" not in pvc["spec"]  # the cluster default (kind: "standard")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "50Gi"
    pod = default.get("Deployment", "mia-dpo-minio")["spec"]["template"]["spec"]
    data = next(v for v in pod["volumes"] if v["name"] == "data")
    assert data == {"name": "data", "persistentVolumeClaim": {"claimName": "mia-dpo-minio"}}
    # its root credentials are kept with it
    s3 = default.get("Secret", "mia-dpo-s3")
    assert s3["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert "annotations" not in default.get("Secret", "mia-dpo-redis")["metadata"]
    kind = render(scenario_file("kind"))
    assert kind.get("PersistentVolumeClaim", "mia-dpo-minio")["spec"]["resources"] == {
        "requests": {"storage": "5Gi"}
    }
    off = render(_values(tmp_path, {"s3": {"minio": {"persistence": {"enabled": False}}}}))
    assert not off.kind("PersistentVolumeClaim")
    assert "annotations" not in off.get("Secret", "mia-dpo-s3")["metadata"]
    pod = off.get("Deployment", "mia-dpo-minio")["spec"]["template"]["spec"]
    assert next(v for v in pod["volumes"] if v["name"] == "data")["emptyDir"]


def test_existing_secrets_render_none_and_every_pod_uses_them(operator: Rendered) -> None:
    assert operator.kind("Secret") == []
    names = {"MIA_DPO_REDIS_PASSWORD": "mia-dpo-redis-auth", "REDIS_PASSWORD": "mia-dpo-redis-auth",
             "MIA_DPO_S3_ACCESS_KEY": "mia-dpo-s3-auth", "MIA_DPO_S3_SECRET_KEY": "mia-dpo-s3-auth",
             "MINIO_ROOT_USER": "mia-dpo-s3-auth", "MINIO_ROOT_PASSWORD": "mia-dpo-s3-auth",
             "HF_TOKEN": "hf-token"}  # fmt: skip
    seen = set()
    for where, pod in operator.pod_specs():
        for c in containers(pod):
            for e in c.get("env", []):
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == names[e["name"]], (where, e)
                    seen.add(where)
    assert len(seen) == 4 + len(STAGES)  # controller, redis, minio, test pod, stages


def test_explicit_passwords_render_the_same_every_time(tmp_path: Path) -> None:
    """What a GitOps tool gets when the values carry the credentials: no lookup, no random,
    so two renders (two syncs) are identical."""
    values = _values(tmp_path, {"redis": {"password": "r-pw"},
                                "s3": {"accessKey": "ak", "secretKey": "sk-secret"}})  # fmt: skip
    first, second = render(values), render(values)
    assert first.text == second.text
    assert first.secret_data() == {
        "mia-dpo-redis": {"redis-password": "r-pw"},
        "mia-dpo-s3": {"access-key": "ak", "secret-key": "sk-secret"},
    }
    # without them, helm template (no cluster to look up) makes new ones each time
    assert render().secret_data() != render().secret_data()


# -------------------------------------------------------------- kubectl's view


def kubectl_fields(expr: str) -> list[str]:
    """The field names of a kubectl JSONPath (--sort-by) as client-go's parser reads
    them: split on unescaped dots; a backslash escapes the next character; `-` and `/`
    belong to the name."""
    expr = expr.strip().removeprefix("{").removesuffix("}").removeprefix(".")
    fields, current, i = [], "", 0
    while i < len(expr):
        ch = expr[i]
        if ch == "\\":
            current, i = current + expr[i + 1], i + 2
            continue
        if ch in "[]$@{},":
            raise ValueError(f"{expr}: {ch} ends a field")
        if ch == ".":
            fields.append(current)
            current = ""
        else:
            current += ch
        i += 1
    return [*fields, current]


def notes(tmp_path: Path, *values_files: Path) -> str:
    """NOTES.txt as helm renders it (`helm template` skips NOTES: a copy of the chart
    exposes it through a ConfigMap)."""
    copy = tmp_path / "mia-dpo"
    if not copy.exists():
        shutil.copytree(CHART, copy)
        (copy / "notes.txt").write_text((CHART / "templates" / "NOTES.txt").read_text())
        (copy / "templates" / "zz-notes.yaml").write_text(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n"
            'data:\n  notes: {{ tpl (.Files.Get "notes.txt") . | toJson }}\n'
        )
    files = [a for f in values_files for a in ("-f", str(f))]
    proc = helm("template", RELEASE, copy, "-n", NAMESPACE, *files,
                "--show-only", "templates/zz-notes.yaml")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return str(yaml.safe_load(proc.stdout)["data"]["notes"])


def test_kubectl_sorts_the_run_stages_in_order(tmp_path: Path) -> None:
    values = _values(tmp_path, {"run": {"id": "r7"}, "config": {"score": {"layer": "auto"}}})
    r = render(values)
    text = notes(tmp_path, values)
    command = next(line for line in text.splitlines() if "--sort-by" in line)
    assert "get jobs -l mia-dpo.io/run-id=r7 " in command
    (expr,) = re.findall(r"--sort-by='([^']+)'", command)
    fields = kubectl_fields(expr)
    assert fields == ["metadata", "labels", INDEX]
    jobs = [j for j in r.jobs.values() if j["metadata"]["labels"]["mia-dpo.io/run-id"] == "r7"]
    assert len(jobs) == 7  # calibrate joined score

    def key(job: dict[str, Any]) -> str:
        node: Any = job
        for f in fields:
            node = node[f]
        return str(node)

    ordered = [j["metadata"]["labels"]["mia-dpo.io/stage"] for j in sorted(jobs, key=key)]
    assert ordered == ["augment", "generate", "calibrate", "score", "select", "train", "evaluate"]
    assert [key(j) for j in sorted(jobs, key=key)] == [f"{i:02d}" for i in range(1, 8)]
    # stage pods carry it too, for `kubectl get pods -L`
    for job in jobs:
        assert job["spec"]["template"]["metadata"]["labels"][INDEX] == key(job)
    assert "kubectl -n mia get pods -l mia-dpo.io/run-id=r7 -L mia-dpo.io/stage-index" in text
    assert "ends with the `mia-dpo status` table" in text


def test_notes_warn_when_the_hub_model_cannot_be_downloaded(tmp_path: Path) -> None:
    warning = "The model cannot be downloaded"
    default = notes(tmp_path)
    assert "WARNING: config.model.path is the hub id llava-hf/llava-1.5-7b-hf" in default
    assert warning in default
    assert "kubectl -n mia delete pvc/mia-dpo-minio secret/mia-dpo-s3" in default
    for fine in ({"networkPolicy": {"allowHub": True}}, {"networkPolicy": {"enabled": False}}):
        assert "WARNING" not in notes(tmp_path, _values(tmp_path, fine, "fine.yaml")), fine
    assert "WARNING" not in notes(tmp_path, scenario_file("demo"))
    cached = _values(tmp_path, {"modelCache": {"enabled": True, "readOnly": True}}, "c.yaml")
    text = notes(tmp_path, cached)
    assert "must already be in the cache mia-dpo-model-cache" in text and warning not in text
    assert "kubectl -n mia delete pvc/mia-dpo-model-cache" in text


# ---------------------------------------------------------------------- schema

BAD = [
    ("bad priority class", {"priorityClassName": "High_Priority"}, "priorityClassName"),
    ("bad stage runtime", {"train": {"runtimeClassName": "NVIDIA"}}, "train.runtimeClassName"),
    ("label value too long", {"jobLabels": {"x": "y" * 64}}, "jobLabels.x"),
    ("pod label not a string", {"generate": {"podLabels": {"tier": 1}}}, "generate.podLabels"),
    ("bad access mode", {"modelCache": {"accessModes": ["ReadWriteAll"]}}, "modelCache"),
    ("relative mount", {"modelCache": {"mountPath": "cache"}}, "modelCache.mountPath"),
    ("unknown hfToken key", {"hfToken": {"secret": "x"}}, "Additional property secret"),
    ("allowHub not a bool", {"networkPolicy": {"allowHub": "yes"}}, "networkPolicy.allowHub"),
    ("bad hub cidr", {"networkPolicy": {"hub": {"cidrs": ["hf.co"]}}}, "networkPolicy.hub"),
]


@pytest.mark.parametrize(("values", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_operator_values_are_refused(
    values: dict[str, Any], message: str, tmp_path: Path
) -> None:
    from tests.chart.chart import template

    proc = template(_values(tmp_path, values))
    assert proc.returncode != 0, f"accepted: {values}"
    assert message in proc.stderr, proc.stderr
