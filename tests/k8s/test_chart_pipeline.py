"""The Helm chart's rendered objects run the pipeline, end to end.

What is real: the helm binary rendering charts/mia-dpo, redis-server (with a
password) and SeaweedFS for S3, the controller and every worker process with the
commands, arguments and environment (Secrets included) the chart rendered, and
the tiny model. What is emulated, because no Kubernetes cluster can run here:
the API server (kmock) and the kubelet + Job controller (tests/k8s/kubelet.py),
which runs each Job's pods as local processes and reports their status.

"helm install" is played by creating the rendered controller Job in the
emulator; everything after that is the controller's own doing: it reads its
ConfigMap, creates one Job per stage from the chart's templates, follows them
and deletes each after it succeeded.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mia_dpo.demo.synthetic import write_synthetic
from tests.k8s.emulator import KubeEmulator
from tests.k8s.kubelet import KubeletStandIn
from tests.servers import RedisServer

NS = "mia"
RELEASE = "mia-dpo"
CHART = Path(__file__).resolve().parents[2] / "charts" / "mia-dpo"
REDIS_PASSWORD = "k8s-e2e-redis-pw"

pytestmark = pytest.mark.integration


def helm() -> str:
    found = shutil.which("helm", path=str(Path(sys.executable).parent)) or shutil.which("helm")
    assert found, "helm not found: `make .venv` installs it (tools/get_helm.py)"
    return found


def render(values: dict[str, Any], tmp: Path) -> list[dict[str, Any]]:
    vfile = tmp / "values.yaml"
    vfile.write_text(yaml.safe_dump(values), encoding="utf-8")
    out = subprocess.run(
        [helm(), "template", RELEASE, str(CHART), "--namespace", NS, "-f", str(vfile)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def secured_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer().start(tmp_path_factory.mktemp("redis-pw"), password=REDIS_PASSWORD)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("k8s-source")
    write_synthetic(root, n=100, seed=0)
    return root


def chart_values(
    run_id: str, source: Path, model: Path, redis: RedisServer, s3: dict[str, str]
) -> dict[str, Any]:
    # Sizes as in the demo config (mia_dpo/demo/demo.yaml), scaled to 100 samples;
    # the rest is the chart's.
    return {
        "run": {"id": run_id},
        "config": {
            "seed": 0,
            "input": {"path": str(source / "data.json"), "image_root": str(source / "images"),
                      "shard_size": 25, "holdout_fraction": 0.2},
            "augment": {"grid_tile_px": 224},
            "model": {"path": str(model)},
            "generate": {"max_new_tokens": 6, "batch_size": 16},
            "score": {"batch_size": 8},
            "train": {"lora_r": 8, "lora_alpha": 16, "batch_size": 8,
                      "gradient_accumulation_steps": 1, "max_length": 1024},
            "evaluate": {"batch_size": 16, "max_new_tokens": 6},
        },
        "augment": {"parallelism": 2},
        "generate": {"parallelism": 2},
        "redis": {"enabled": False, "host": "127.0.0.1", "port": redis.port,
                  "password": REDIS_PASSWORD},
        "s3": {"minio": {"enabled": False}, "endpoint": s3["endpoint"], "bucket": s3["bucket"],
               "accessKey": s3["access_key"], "secretKey": s3["secret_key"]},
        "controller": {"backoffLimit": 0, "waitForServices": False},
    }  # fmt: skip


def base_env(kubeconfig: Path) -> dict[str, str]:
    keep = ("PATH", "LANG", "LC_ALL", "SYSTEMROOT")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env |= {"KUBECONFIG": str(kubeconfig), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    return env


def install(api: Any, objects: list[dict[str, Any]]) -> str:
    """What `helm install` does for the controller: create its Job (RBAC, ConfigMap and
    Secrets are objects the kubelet stand-in reads directly from the rendering)."""
    (controller,) = [
        o for o in objects
        if o["kind"] == "Job" and o["metadata"]["labels"].get("app.kubernetes.io/component")
        == "controller"
    ]  # fmt: skip
    api.create_namespaced_job(NS, controller)
    return str(controller["metadata"]["name"])


def wait_for(api: Any, name: str, kubelet: KubeletStandIn, seconds: float = 900) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        kubelet.check()
        job = api.read_namespaced_job_status(name, NS)
        if job.status and job.status.conditions:
            return job
        time.sleep(0.2)
    raise AssertionError(f"{name} did not finish; controller log:\n{kubelet.logs(name)[-3000:]}")


@contextlib.contextmanager
def installed(
    objects: list[dict[str, Any]], tmp: Path
) -> Iterator[tuple[Any, KubeletStandIn, str, Any]]:
    """A fresh API emulator and kubelet stand-in, the release "installed", the
    controller Job run to its end: yields (api, kubelet, controller name, its Job)."""
    emulator = KubeEmulator()
    try:
        api = emulator.batch()
        env = base_env(emulator.write_kubeconfig(tmp / "kubeconfig", NS))
        with KubeletStandIn(api, NS, objects, env=env, workdir=tmp / "pods") as kubelet:
            name = install(api, objects)
            job = wait_for(api, name, kubelet)
        yield api, kubelet, name, job
    finally:
        emulator.close()


def status_output(objects: list[dict[str, Any]], tmp: Path, run_id: str, s3: dict[str, str]) -> str:
    """What `mia-dpo status --run-id RUN_ID` prints, run by hand with the release's run
    config and credentials, as from `kubectl exec` into the controller."""
    (cm,) = [o for o in objects if o["kind"] == "ConfigMap"]
    config = tmp / "status-config.yaml"
    config.write_text(cm["data"]["config.yaml"], encoding="utf-8")
    env = base_env(tmp / "no-kubeconfig") | {
        "MIA_DPO_REDIS_PASSWORD": REDIS_PASSWORD,
        "MIA_DPO_S3_ACCESS_KEY": s3["access_key"],
        "MIA_DPO_S3_SECRET_KEY": s3["secret_key"],
    }
    argv = [sys.executable, "-m", "mia_dpo", "status", "--run-id", run_id, "--config", str(config)]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.rstrip()


def objects_in(s3_server: Any, bucket: str, prefix: str) -> list[str]:
    client = s3_server.client()
    return [o.object_name for o in client.list_objects(bucket, prefix=prefix, recursive=True)]


def test_the_rendered_chart_runs_every_stage(
    tmp_path, source, tiny_model_dir, secured_redis, s3_server, s3_bucket
) -> None:
    values = chart_values("k8s-e2e", source, tiny_model_dir, secured_redis, s3_bucket)
    objects = render(values, tmp_path)
    with installed(objects, tmp_path) as (api, kubelet, name, job):
        log = kubelet.logs(name)
        assert job.status.conditions[0].type == "Complete", log[-3000:]
        # one Job per stage, made by the controller from the chart's templates ...
        stage_jobs = [r for r in kubelet.history if r.name != name]
        stages = ["augment", "generate", "score", "select", "train", "evaluate"]
        assert [r.name for r in stage_jobs] == [f"{RELEASE}-{s}" for s in stages]
        for run, stage in zip(stage_jobs, stages, strict=True):
            labels = run.manifest["metadata"]["labels"]
            assert labels["mia-dpo.io/stage"] == stage
            assert labels["mia-dpo.io/run-id"] == "k8s-e2e"
            assert labels["app.kubernetes.io/instance"] == RELEASE
            assert run.manifest["metadata"]["ownerReferences"][0]["name"] == name
            assert set(run.exit_codes) == {0}, kubelet.logs(run.name)[-2000:]
        # `kubectl get jobs -l mia-dpo.io/run-id=k8s-e2e --sort-by=<stage-index>`: in order
        index = "mia-dpo.io/stage-index"
        for meta in ("metadata", "pods"):
            got = [(r.manifest["metadata"] if meta == "metadata"
                    else r.manifest["spec"]["template"]["metadata"])["labels"][index]
                   for r in stage_jobs]  # fmt: skip
            assert got == ["01", "02", "03", "04", "05", "06"], meta
        # the controller's log ends with what `mia-dpo status` prints
        status = status_output(objects, tmp_path, "k8s-e2e", s3_bucket)
        assert status.startswith("run k8s-e2e: 100 input records"), status
        assert log.rstrip().endswith("$ mia-dpo status --run-id k8s-e2e\n" + status), log[-3000:]
        # augment: 80 training samples in 4 shards, 2 workers asked and 2 started
        assert stage_jobs[0].manifest["spec"]["parallelism"] == 2
        assert stage_jobs[0].started == 2
        # ... and each deleted once it succeeded (controller.cleanup: on_success)
        assert api.list_namespaced_job(NS).items[0].metadata.name == name
        assert len(api.list_namespaced_job(NS).items) == 1
        # the outputs are in the bucket
        keys = objects_in(s3_server, s3_bucket["bucket"], "runs/k8s-e2e/")
        assert any(k.endswith("pairs.trl.jsonl") for k in keys), keys
        assert any("adapter_model.safetensors" in k for k in keys), keys
        report = [k for k in keys if k.endswith("evaluate/report.json")]
        assert report, keys
        body = s3_server.client().get_object(s3_bucket["bucket"], report[0]).read()
        assert json.loads(body)
        # no credential reached a log or the stored run config
        stored = s3_server.client().get_object(s3_bucket["bucket"], "runs/k8s-e2e/config.json")
        text = stored.read().decode() + "".join(kubelet.logs(r.name) for r in kubelet.history)
        for secret in (REDIS_PASSWORD, s3_bucket["secret_key"], s3_bucket["access_key"]):
            assert secret not in text


def test_a_stage_job_that_fails_stops_the_run_with_a_report(
    tmp_path, source, tiny_model_dir, secured_redis, s3_server, s3_bucket
) -> None:
    values = chart_values("k8s-fail", source, tiny_model_dir, secured_redis, s3_bucket)
    values["run"]["stages"] = ["augment", "generate"]
    # A broken setting only the generate pods get: every one exits 2 (bad config),
    # which the chart's podFailurePolicy turns into a failed Job at once.
    values["generate"]["extraEnv"] = [{"name": "MIA_DPO_S3_SECURE", "value": "maybe"}]
    objects = render(values, tmp_path)
    with installed(objects, tmp_path) as (api, kubelet, name, job):
        log = kubelet.logs(name)
        assert job.status.conditions[0].type == "Failed"
        assert "run failed: stage generate: Job mia/mia-dpo-generate failed" in log, log[-3000:]
        assert "kubectl logs -n mia -l job-name=mia-dpo-generate" in log
        assert "Traceback" not in log
        # ... and then where the run stands, as `mia-dpo status` prints it
        status = status_output(objects, tmp_path, "k8s-fail", s3_bucket)
        assert log.rstrip().endswith("$ mia-dpo status --run-id k8s-fail\n" + status), log[-3000:]
        assert log.index("mia-dpo: run failed: stage generate") < log.rindex(status)
        assert "generate  running" in status or "generate  pending" in status, status
        generate = [r for r in kubelet.history if r.name == f"{RELEASE}-generate"][-1]
        assert set(generate.exit_codes) == {2}
        assert "store.secure" in kubelet.logs(generate.name)
        # the failed Job stays for `kubectl logs`; augment's finished and was deleted
        names = {j.metadata.name for j in api.list_namespaced_job(NS).items}
        assert names == {name, f"{RELEASE}-generate"}


def test_multi_node_training_runs_as_an_indexed_job_with_c10d(
    tmp_path, source, tiny_model_dir, secured_redis, s3_server, s3_bucket
) -> None:
    """train.nodes 2: the chart's Indexed Job runs torchrun on two "nodes" (pods 0 and
    1, one CPU process each) that meet through c10d rendezvous at pod 0's name on the
    headless Service (resolved to loopback by the stand-in, as that Service's DNS
    would), train one model together, and rank 0 writes it."""
    from tests.servers import free_port

    values = chart_values("k8s-ddp", source, tiny_model_dir, secured_redis, s3_bucket)
    values["run"]["stages"] = ["augment", "generate", "score", "select", "train"]
    port = free_port()
    values["train"] = {"nodes": 2, "gpusPerNode": 1, "rendezvousPort": port, "resources": {}}
    objects = render(values, tmp_path)
    (service,) = [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"]
                  == f"{RELEASE}-train"]  # fmt: skip
    assert service["spec"]["clusterIP"] == "None"
    with installed(objects, tmp_path) as (_, kubelet, name, job):
        log = kubelet.logs(name)
        assert job.status.conditions[0].type == "Complete", log[-3000:]
        (train,) = [r for r in kubelet.history if r.name == f"{RELEASE}-train"]
        assert train.manifest["spec"]["completionMode"] == "Indexed"
        assert sorted(train.done_indexes) == [0, 1]
        keys = objects_in(s3_server, s3_bucket["bucket"], "runs/k8s-ddp/train/")
        assert any("adapter_model.safetensors" in k for k in keys), keys
        (meta_key,) = [k for k in keys if k.endswith("metadata.json")]
        meta = json.loads(s3_server.client().get_object(s3_bucket["bucket"], meta_key).read())
        assert meta["world_size"] == 2, kubelet.logs(train.name)[-3000:]
