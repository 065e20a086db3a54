"""The chart renders valid Kubernetes objects that follow the images/chart/launcher
contract: lint, schema validation of every object and every stage Job template,
the controller Job, the stage Jobs, labels, the run config."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from mia_dpo.config import load_config
from tests.chart.chart import (
    CHART,
    GPU_STAGES,
    NAMESPACE,
    RELEASE,
    SCENARIOS,
    STAGES,
    Rendered,
    env_of,
    helm,
    render,
    scenario_file,
    tool,
    values_for,
)

CONFIG = "/etc/mia-dpo/config.yaml"


def test_scenarios_present() -> None:
    assert SCENARIOS == ["default", "demo", "external-services", "kind", "multi-gpu", "operator"]


@pytest.mark.parametrize("name", SCENARIOS)
def test_lint_strict(name: str) -> None:
    proc = helm("lint", "--strict", CHART, "-f", scenario_file(name), "--namespace", NAMESPACE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


def test_kubernetes_validate(rendered: dict[str, Rendered], tmp_path: Path) -> None:
    """kubernetes-validate --strict against 1.33 on every scenario's manifests and on
    each stage Job template inside the ConfigMaps, in one run of the CLI."""
    files: list[Path] = []
    for name, r in rendered.items():
        manifest = tmp_path / f"{name}.yaml"
        manifest.write_text(r.text)
        files.append(manifest)
        assert set(r.job_texts) == set(STAGES), name
        for stage, text in r.job_texts.items():
            job = tmp_path / f"{name}-job-{stage}.yaml"
            job.write_text(text)
            files.append(job)
    proc = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "-k", "1.33.0", "--quiet", *map(str, files)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_objects(rendered: dict[str, Rendered]) -> None:
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in rendered["default"].objects)
    assert kinds == [
        ("ConfigMap", "mia-dpo-run"),
        ("Deployment", "mia-dpo-minio"),
        ("Deployment", "mia-dpo-redis"),
        ("Job", "mia-dpo-controller"),
        ("NetworkPolicy", "mia-dpo-controller"),
        ("NetworkPolicy", "mia-dpo-minio"),
        ("NetworkPolicy", "mia-dpo-redis"),
        ("NetworkPolicy", "mia-dpo-test"),
        ("NetworkPolicy", "mia-dpo-workers"),
        ("PersistentVolumeClaim", "mia-dpo-minio"),
        ("Pod", "mia-dpo-test"),
        ("Role", "mia-dpo-controller"),
        ("RoleBinding", "mia-dpo-controller"),
        ("Secret", "mia-dpo-redis"),
        ("Secret", "mia-dpo-s3"),
        ("Service", "mia-dpo-minio"),
        ("Service", "mia-dpo-redis"),
        ("ServiceAccount", "mia-dpo-controller"),
    ]
    external = {(o["kind"], o["metadata"]["name"]) for o in rendered["external-services"].objects}
    assert not {k for k in external if k[0] in ("Deployment", "Secret", "Service")}


# ---------------------------------------------------------------- the run config


def test_config_loads(rendered: dict[str, Rendered], scenario: str, tmp_path: Path) -> None:
    r = rendered[scenario]
    values = values_for(scenario_file(scenario))
    path = tmp_path / "config.yaml"
    path.write_text(r.config_text)
    cfg = load_config(path, environ={})
    assert cfg.launcher.kind == "kubernetes"
    assert cfg.launcher.kubernetes.job_templates == "/etc/mia-dpo/jobs"
    assert cfg.launcher.kubernetes.cleanup == values["controller"]["cleanup"]
    assert cfg.launcher.workers == {s: values[s]["parallelism"] for s in STAGES}
    assert cfg.queue.backend == "redis" and cfg.store.backend == "s3"
    assert cfg.run_id == (values["run"]["id"] or RELEASE)
    assert list(cfg.stages) == list(STAGES)
    assert cfg.store.bucket == values["s3"]["bucket"]
    if values["redis"]["enabled"]:
        assert cfg.queue.url == "redis://mia-dpo-redis:6379/0"
    else:
        r_ = values["redis"]
        assert cfg.queue.url == f"redis://{r_['host']}:{r_['port']}/{r_['db']}"
    if values["s3"]["minio"]["enabled"]:
        assert (cfg.store.endpoint, cfg.store.secure) == ("mia-dpo-minio:9000", False)
    else:
        assert (cfg.store.endpoint, cfg.store.secure) == (values["s3"]["endpoint"], True)
    # The user's section arrives as given (merged over RunConfig's defaults).
    for section, fields in values["config"].items():
        if not isinstance(fields, dict):
            assert getattr(cfg, section) == fields, section
            continue
        for key, value in fields.items():
            assert getattr(getattr(cfg, section), key) == value, f"{section}.{key}"
    assert cfg.queue.password is None and cfg.store.access_key is None


def test_default_config_is_a_real_model_run(rendered: dict[str, Rendered], tmp_path: Path) -> None:
    """The defaults install LLaVA-1.5-7B on an index in the bucket; every other run
    setting is mia-dpo's own default (the chart restates none); the demo is a values file."""
    cfg = yaml.safe_load(rendered["default"].config_text)
    assert cfg["input"] == {
        "path": "s3://mia-dpo/input/llava_v1_5_mix665k.json",
        "image_root": "s3://mia-dpo/input/images",
        "holdout_fraction": 0.01,  # RunConfig's 0 would make the evaluate stage refuse
    }
    assert cfg["model"] == {"path": "llava-hf/llava-1.5-7b-hf"}
    chart_set = {"run_id", "stages", "queue", "store", "launcher"}
    assert set(cfg) == {"input", "model"} | chart_set
    loaded = load_config(_write(tmp_path, rendered["default"].config_text), environ={})
    assert loaded.input.holdout_fraction > 0 and "evaluate" in loaded.stages
    assert "/opt/mia-dpo/demo" not in rendered["default"].text


def test_demo_values_run_the_baked_demo(rendered: dict[str, Rendered]) -> None:
    for name in ("demo", "kind"):
        cfg = yaml.safe_load(rendered[name].config_text)
        assert cfg["input"]["path"] == "/opt/mia-dpo/demo/source/data.json", name
        assert cfg["input"]["image_root"] == "/opt/mia-dpo/demo/source/images", name
        assert cfg["input"]["holdout_fraction"] == 0.2, name
        assert cfg["model"]["path"] == "/opt/mia-dpo/demo/model", name


def test_stage_subset_in_pipeline_order(tmp_path: Path) -> None:
    values = tmp_path / "v.yaml"
    values.write_text("run: {stages: [select, augment]}\n")
    r = render(values)
    assert set(r.jobs) == {"augment", "select"}
    cfg = load_config(_write(tmp_path, r.config_text), environ={})
    assert list(cfg.stages) == ["augment", "select"]
    assert set(cfg.launcher.workers) == {"augment", "select"}
    items = _controller_volume(r)["configMap"]["items"]
    assert [i["path"] for i in items] == ["config.yaml", "jobs/augment.yaml", "jobs/select.yaml"]


@pytest.mark.parametrize(
    "score", ["{layer: auto}", "{thresholds: calibrated}", "{layer: 3, thresholds: paper}"]
)
def test_calibration_adds_a_calibrate_job_on_the_gpu_image(tmp_path: Path, score: str) -> None:
    values = tmp_path / "v.yaml"
    values.write_text(f"config: {{score: {score}}}\n")
    r = render(values)
    cfg = load_config(_write(tmp_path, r.config_text), environ={})
    if "paper" in score:  # a fixed layer and the paper's table: nothing to calibrate
        assert "calibrate" not in r.jobs and "calibrate" not in cfg.stages
        return
    assert list(cfg.stages) == [
        "augment",
        "generate",
        "calibrate",
        "score",
        "select",
        "train",
        "evaluate",
    ]
    assert cfg.launcher.workers["calibrate"] == 1
    pod = r.jobs["calibrate"]["spec"]["template"]["spec"]
    assert "gpu" in pod["containers"][0]["image"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    items = [i["path"] for i in _controller_volume(r)["configMap"]["items"]]
    assert "jobs/calibrate.yaml" in items


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


# ------------------------------------------------------------ the controller Job


def _controller_volume(r: Rendered) -> dict[str, Any]:
    pod = r.controller["spec"]["template"]["spec"]
    return next(v for v in pod["volumes"] if v["name"] == "run-config")


def test_controller_job(rendered: dict[str, Rendered], scenario: str) -> None:
    r = rendered[scenario]
    values = values_for(scenario_file(scenario))
    run = values["run"]["id"] or RELEASE
    job = r.controller
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == "mia-dpo-controller"
    assert pod["automountServiceAccountToken"] is True
    (c,) = pod["containers"]
    assert c["command"] == ["mia-dpo"]
    assert c["args"] == ["run", CONFIG, "--run-id", run, "--quiet", "--summary"]
    assert c["image"] == _image(values["image"])
    mount = next(m for m in c["volumeMounts"] if m["name"] == "run-config")
    assert mount["mountPath"] == "/etc/mia-dpo"
    items = _controller_volume(r)["configMap"]
    assert items["name"] == "mia-dpo-run"
    assert items["items"] == [{"key": "config.yaml", "path": "config.yaml"}] + [
        {"key": f"job-{s}.yaml", "path": f"jobs/{s}.yaml"} for s in STAGES
    ]
    env = env_of(c)
    assert env["MIA_DPO_RUN_ID"]["value"] == run
    assert env["MIA_DPO_OWNER_JOB"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.labels['batch.kubernetes.io/job-name']"
    )
    assert env["MIA_DPO_OWNER_UID"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.labels['batch.kubernetes.io/controller-uid']"
    )
    assert job["spec"]["backoffLimit"] == values["controller"]["backoffLimit"]
    (init,) = pod["initContainers"]
    assert init["args"][1:] == (
        ["mia-dpo-redis:6379", "mia-dpo-minio:9000"]
        if scenario != "external-services"
        else ["redis-master.data.svc.cluster.local:6380", "s3.eu-west-1.amazonaws.com:443"]
    )


def _image(image: dict[str, Any]) -> str:
    return f"{image['repository']}:{image['tag'] or '0.1.0'}"


# ------------------------------------------------------------------ stage Jobs


def test_stage_job_templates(rendered: dict[str, Rendered], scenario: str) -> None:
    r = rendered[scenario]
    values = values_for(scenario_file(scenario))
    run = values["run"]["id"] or RELEASE
    for stage, job in r.jobs.items():
        v = values[stage]
        where = f"{scenario} job-{stage}.yaml"
        assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job", where
        name = job["metadata"]["name"]
        assert name == f"mia-dpo-{stage}" and len(name) <= 63, where
        pod = job["spec"]["template"]["spec"]
        assert pod["restartPolicy"] == "Never", where
        assert pod.get("automountServiceAccountToken") is False, where
        (c,) = pod["containers"]
        assert c["name"] == "worker", where
        expect_image = values["gpuImage"] if stage in GPU_STAGES else values["image"]
        assert c["image"] == _image(expect_image), where
        spec = job["spec"]
        multi = stage == "train" and v["nodes"] > 1
        standalone = stage == "train" and not multi and v["gpusPerNode"] > 1
        if not (multi or standalone):
            assert c["command"] == ["mia-dpo"], where
            assert c["args"] == ["worker", "--stage", stage, "--config", CONFIG], where
            assert "completions" not in spec and "completionMode" not in spec, where
            assert spec["parallelism"] == v["parallelism"], where
        assert spec["backoffLimit"] == v["backoffLimit"], where
        assert spec["podFailurePolicy"] == values["podFailurePolicy"], where
        assert spec.get("ttlSecondsAfterFinished") == v["ttlSecondsAfterFinished"], where
        assert spec.get("activeDeadlineSeconds") == v["activeDeadlineSeconds"], where
        env = env_of(c)
        assert env["MIA_DPO_RUN_ID"] == {"name": "MIA_DPO_RUN_ID", "value": run}, where
        for var in ("MIA_DPO_REDIS_PASSWORD", "MIA_DPO_S3_ACCESS_KEY", "MIA_DPO_S3_SECRET_KEY"):
            assert "secretKeyRef" in env[var]["valueFrom"], where
        for extra in [*values["extraEnv"], *v["extraEnv"]]:
            assert env[extra["name"]] == extra, where
        mount = next(m for m in c["volumeMounts"] if m["name"] == "run-config")
        assert mount["mountPath"] == "/etc/mia-dpo", where
        vol = next(x for x in pod["volumes"] if x["name"] == "run-config")
        assert vol["configMap"] == {
            "name": "mia-dpo-run",
            "items": [{"key": "config.yaml", "path": "config.yaml"}],
        }, where
        for key in ("nodeSelector", "tolerations", "affinity"):
            assert pod.get(key, type(v[key])()) == v[key], f"{where}: {key}"


def test_gpu_stages_default(rendered: dict[str, Rendered]) -> None:
    r = rendered["default"]
    for stage, job in r.jobs.items():
        pod = job["spec"]["template"]["spec"]
        limits = pod["containers"][0]["resources"].get("limits", {})
        if stage in GPU_STAGES:
            assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}, stage
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
                pod["tolerations"]
            ), stage
            assert limits["nvidia.com/gpu"] == 1, stage
            shm = next(v for v in pod["volumes"] if v["name"] == "shm")
            assert shm["emptyDir"]["medium"] == "Memory", stage
        else:
            assert "nvidia.com/gpu" not in limits, stage
            assert "nodeSelector" not in pod and "tolerations" not in pod, stage


def test_kind_has_no_gpu_limits(rendered: dict[str, Rendered]) -> None:
    r = rendered["kind"]
    assert "nvidia.com/gpu:" not in r.text
    for stage in GPU_STAGES:
        pod = r.jobs[stage]["spec"]["template"]["spec"]
        # still steered to the kind worker labelled like a GPU node
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    images = {c["image"] for _, pod in r.pod_specs() for c in pod["containers"]}
    assert {"mia-dpo:dev", "mia-dpo-gpu:dev"} <= images


def test_single_node_multi_gpu_train(tmp_path: Path) -> None:
    values = tmp_path / "v.yaml"
    values.write_text("run: {id: one-node}\ntrain: {gpusPerNode: 8}\n")
    r = render(values)
    spec = r.jobs["train"]["spec"]
    assert "completionMode" not in spec
    assert (spec["completions"], spec["parallelism"]) == (1, 1)
    (c,) = spec["template"]["spec"]["containers"]
    assert c["command"] == ["torchrun"]
    assert c["args"] == [
        "--standalone", "--nproc-per-node", "8",
        "-m", "mia_dpo", "stage-task", "--stage", "train", "--run-id", "one-node",
        "--config", CONFIG,
    ]  # fmt: skip
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert not [s for s in r.kind("Service") if s["metadata"]["name"] == "mia-dpo-train"]


def test_multi_node_train(rendered: dict[str, Rendered]) -> None:
    r = rendered["multi-gpu"]
    job = r.jobs["train"]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 2
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == "mia-dpo-train"
    (c,) = pod["containers"]
    assert c["command"] == ["torchrun"]
    assert c["args"] == [
        "--nnodes", "2", "--nproc-per-node", "4",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "mia-dpo-train-0.mia-dpo-train:29500",
        "--rdzv-id", "multi-gpu",
        "-m", "mia_dpo", "stage-task", "--stage", "train", "--run-id", "multi-gpu",
        "--config", CONFIG,
    ]  # fmt: skip
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 4
    svc = r.get("Service", "mia-dpo-train")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert [p["port"] for p in svc["spec"]["ports"]] == [29500]
    labels = spec["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    # other scenarios: one train pod, no Service
    assert not [s for s in rendered["default"].kind("Service") if "train" in s["metadata"]["name"]]


# ---------------------------------------------------------------------- labels


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def test_labels(rendered: dict[str, Rendered], scenario: str) -> None:
    r = rendered[scenario]
    values = values_for(scenario_file(scenario))
    run = values["run"]["id"] or RELEASE
    common = {
        "app.kubernetes.io/name": "mia-dpo",
        "app.kubernetes.io/instance": RELEASE,
        "app.kubernetes.io/version": "0.1.0",
        "app.kubernetes.io/part-of": "mia-dpo",
    }
    for o in r.objects:
        labels = o["metadata"]["labels"]
        assert _matches(common, labels), o["metadata"]["name"]
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/component"]
    for stage, job in r.jobs.items():
        own = {**common, "app.kubernetes.io/component": stage, "mia-dpo.io/stage": stage,
               "mia-dpo.io/run-id": run}  # fmt: skip
        assert _matches(own, job["metadata"]["labels"]), stage
        assert _matches(own, job["spec"]["template"]["metadata"]["labels"]), stage
        # the controller sets managed-by on the Jobs it creates
        assert "app.kubernetes.io/managed-by" not in job["metadata"]["labels"]
    # `kubectl get jobs -l app.kubernetes.io/instance=mia-dpo` and per-stage selectors
    jobs = [r.controller, *r.jobs.values()]
    selected = [
        j
        for j in jobs
        if _matches({"app.kubernetes.io/instance": RELEASE}, j["metadata"]["labels"])
    ]
    assert len(selected) == 1 + len(STAGES)
    for stage in STAGES:
        hits = [j for j in jobs if _matches({"mia-dpo.io/stage": stage}, j["metadata"]["labels"])]
        assert [j["metadata"]["name"] for j in hits] == [f"mia-dpo-{stage}"]
    assert r.controller["spec"]["template"]["metadata"]["labels"]["mia-dpo.io/run-id"] == run
    # Services and Deployments select their own pods
    pods = {o["metadata"]["name"]: o["spec"]["template"]["metadata"]["labels"]
            for o in r.kind("Deployment")}  # fmt: skip
    for d in r.kind("Deployment"):
        assert _matches(d["spec"]["selector"]["matchLabels"], pods[d["metadata"]["name"]])
    for svc in r.kind("Service"):
        if svc["metadata"]["name"] in pods:
            assert _matches(svc["spec"]["selector"], pods[svc["metadata"]["name"]])


def test_long_release_name_fits() -> None:
    release = "r" * 53  # helm's longest release name
    r = render(release=release)
    names = [o["metadata"]["name"] for o in r.objects] + [
        j["metadata"]["name"] for j in r.jobs.values()
    ]
    assert max(map(len, names)) <= 63, names
    for o in [*r.objects, *r.jobs.values()]:
        assert all(len(str(v)) <= 63 for v in o["metadata"]["labels"].values())


# ----------------------------------------------------------------------- NOTES


def test_notes(tmp_path: Path) -> None:
    """NOTES.txt renders (through a copy of the chart that exposes it as a ConfigMap:
    `helm template` skips NOTES) and names the commands to follow the run."""
    copy = tmp_path / "mia-dpo"
    shutil.copytree(CHART, copy)
    (copy / "notes-under-test.txt").write_text((CHART / "templates" / "NOTES.txt").read_text())
    (copy / "templates" / "zz-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n"
        'data:\n  notes: {{ tpl (.Files.Get "notes-under-test.txt") . | toJson }}\n'
    )
    only = ["--show-only", "templates/zz-notes.yaml"]
    proc = helm("template", RELEASE, copy, "-n", NAMESPACE, "-f", scenario_file("multi-gpu"), *only)
    assert proc.returncode == 0, proc.stderr
    notes = yaml.safe_load(proc.stdout)["data"]["notes"]
    for line in (
        "kubectl -n mia get jobs -l app.kubernetes.io/instance=mia-dpo",
        "kubectl -n mia logs -f job/mia-dpo-controller",
        "mia-dpo.io/stage=generate",
        "mia-dpo status --run-id multi-gpu --config /etc/mia-dpo/config.yaml",
        "helm test mia-dpo",
        "mia-dpo-train-0.mia-dpo-train:29500",
    ):
        assert line in notes


def test_rendezvous_port(tmp_path: Path) -> None:
    values = tmp_path / "v.yaml"
    values.write_text("train: {nodes: 3, gpusPerNode: 2, rendezvousPort: 29600}\n")
    r = render(values)
    spec = r.jobs["train"]["spec"]
    assert spec["completions"] == spec["parallelism"] == 3
    (c,) = spec["template"]["spec"]["containers"]
    endpoint = c["args"][c["args"].index("--rdzv-endpoint") + 1]
    assert endpoint == "mia-dpo-train-0.mia-dpo-train:29600"
    assert c["ports"] == [{"name": "c10d", "containerPort": 29600}]
    svc = r.get("Service", "mia-dpo-train")
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(29600, 29600)]
