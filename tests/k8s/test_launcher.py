"""The kubernetes launcher against the kmock API emulator (a mock: no real API server
can run here). Jobs are created, read, patched and deleted over HTTP by the
official client; where a Job must run, tests/k8s/kubelet.py stands in for the
kubelet and the Job controller."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mia_dpo.config import RunConfig
from mia_dpo.runtime.k8s_launcher import (
    INDEX_LABEL,
    RUN_LABEL,
    STAGE_LABEL,
    KubernetesLauncher,
    load_job_template,
    render_job,
)
from mia_dpo.runtime.launcher_factory import make_launcher
from mia_dpo.runtime.launchers import LaunchError
from mia_dpo.stages import get_stage
from tests.k8s.emulator import KubeEmulator
from tests.k8s.kubelet import KubeletStandIn

NS = "mia"


def job_manifest(name: str, command: list[str], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/instance": "t"}},
        "spec": {
            "parallelism": 4,
            "backoffLimit": 2,
            **spec,
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/instance": "t"}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {"name": "worker", "image": "mia-dpo:dev", "command": command,
                         "env": [{"name": "MIA_DPO_RUN_ID", "value": "from-chart"},
                                 {"name": "KEEP", "value": "1"}]}
                    ],
                },
            },
        },
    }  # fmt: skip


@pytest.fixture(scope="module")
def emulator() -> Iterator[KubeEmulator]:
    emu = KubeEmulator()
    yield emu
    emu.close()


@pytest.fixture
def api(emulator: KubeEmulator) -> Iterator[Any]:
    batch = emulator.batch()
    yield batch
    for job in batch.list_namespaced_job(NS).items:
        batch.delete_namespaced_job(job.metadata.name, NS)


def make_cfg(templates: Path, **k8s: Any) -> RunConfig:
    kube = {"job_templates": str(templates), "poll_seconds": 0.05, "drain_seconds": 20} | k8s
    return RunConfig.model_validate(
        {"queue": {"backend": "redis"}, "launcher": {"kind": "kubernetes", "kubernetes": kube}}
    )


def write_template(folder: Path, stage: str, doc: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stage}.yaml").write_text(yaml.safe_dump(doc), encoding="utf-8")


# --- the template and what the controller fills in ----------------------------
def test_render_fills_in_run_labels_parallelism_and_owner() -> None:
    tpl = job_manifest("t-augment", ["mia-dpo"])
    job = render_job(tpl, "r1", "augment", 3, {"name": "t-controller", "uid": "u-1"})
    assert job["spec"]["parallelism"] == 3
    assert tpl["spec"]["parallelism"] == 4  # the template itself is not modified
    for meta in (job["metadata"], job["spec"]["template"]["metadata"]):
        assert meta["labels"][RUN_LABEL] == "r1"
        assert meta["labels"][STAGE_LABEL] == "augment"
        assert meta["labels"]["app.kubernetes.io/instance"] == "t"
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    assert [e for e in env if e["name"] == "MIA_DPO_RUN_ID"] == [
        {"name": "MIA_DPO_RUN_ID", "value": "r1"}
    ]
    assert {"name": "KEEP", "value": "1"} in env
    (owner,) = job["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("Job", "t-controller", "u-1")
    assert owner["blockOwnerDeletion"] is False


def test_render_labels_the_stage_index() -> None:
    """The chart's zero-padded stage-index label survives; the launcher writes the same
    value from the run's stage order, also into templates that lack it."""
    tpl = job_manifest("t-score", ["mia-dpo"])
    for meta in (tpl["metadata"], tpl["spec"]["template"]["metadata"]):
        meta["labels"][INDEX_LABEL] = "03"
    kept = render_job(tpl, "r1", "score", 1, None)
    filled = render_job(job_manifest("t-score", ["mia-dpo"]), "r1", "score", 1, None, index=3)
    for job in (kept, filled):
        for meta in (job["metadata"], job["spec"]["template"]["metadata"]):
            assert meta["labels"][INDEX_LABEL] == "03"
    assert INDEX_LABEL not in job_manifest("t-score", ["mia-dpo"])["metadata"]["labels"]


def test_render_gives_the_client_quantities_as_strings() -> None:
    tpl = job_manifest("t-generate", ["mia-dpo"])
    tpl["spec"]["template"]["spec"]["containers"][0]["resources"] = {
        "limits": {"nvidia.com/gpu": 1, "memory": "4Gi"},
        "requests": {"cpu": 0.5},
    }
    job = render_job(tpl, "r1", "generate", 1, None)
    resources = job["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources == {"limits": {"nvidia.com/gpu": "1", "memory": "4Gi"},
                         "requests": {"cpu": "0.5"}}  # fmt: skip


def test_render_leaves_an_indexed_job_its_shape() -> None:
    tpl = job_manifest("t-train", ["torchrun"], completionMode="Indexed", completions=2)
    tpl["spec"]["parallelism"] = 2
    job = render_job(tpl, "r1", "train", 1, None)
    assert (job["spec"]["parallelism"], job["spec"]["completions"]) == (2, 2)
    assert "ownerReferences" not in job["metadata"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no Job template for stage augment"),
        ("kind: [unclosed", "cannot read the Job template"),
        ("kind: Deployment\napiVersion: apps/v1\n", "not a batch/v1 Job manifest"),
        ("kind: Job\napiVersion: batch/v1\nmetadata: {}\n", "metadata.name is missing"),
        ("kind: Job\napiVersion: batch/v1\nmetadata: {name: j}\nspec: {template: {spec: {}}}\n",
         "containers is empty"),
    ],
)  # fmt: skip
def test_bad_templates_are_named_in_one_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "augment.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(LaunchError, match=message) as err:
        load_job_template(path, "augment")
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_make_launcher_picks_kubernetes(tmp_path: Path) -> None:
    launcher = make_launcher(make_cfg(tmp_path, namespace="x"), None, None, get_stage)  # type: ignore[arg-type]
    assert isinstance(launcher, KubernetesLauncher)
    assert launcher.namespace == "x"


# --- against the emulator -------------------------------------------------------
def test_start_creates_the_job_from_the_template(api: Any, tmp_path: Path) -> None:
    write_template(tmp_path, "augment", job_manifest("t-augment", ["true"]))
    launcher = KubernetesLauncher(make_cfg(tmp_path), api=api, namespace=NS)
    launcher.start("r1", "augment", 2)
    job = api.read_namespaced_job("t-augment", NS)
    assert job.spec.parallelism == 2
    assert job.metadata.labels[RUN_LABEL] == "r1"
    assert job.metadata.labels["app.kubernetes.io/managed-by"] == "mia-dpo-controller"
    assert job.metadata.labels[INDEX_LABEL] == "01"  # augment: the run's first stage
    launcher.check()  # no status yet: running, nothing to report


def test_a_running_job_of_this_run_is_adopted_not_duplicated(api: Any, tmp_path: Path) -> None:
    write_template(tmp_path, "augment", job_manifest("t-augment", ["true"]))
    KubernetesLauncher(make_cfg(tmp_path), api=api, namespace=NS).start("r1", "augment", 2)
    api.patch_namespaced_job("t-augment", NS, {"metadata": {"annotations": {"mark": "first"}}})
    # the controller pod restarts and starts the same stage again
    KubernetesLauncher(make_cfg(tmp_path), api=api, namespace=NS).start("r1", "augment", 3)
    job = api.read_namespaced_job("t-augment", NS)
    assert job.metadata.annotations == {"mark": "first"}  # the same object
    assert job.spec.parallelism == 2


def test_a_running_job_of_another_run_is_refused(api: Any, tmp_path: Path) -> None:
    write_template(tmp_path, "augment", job_manifest("t-augment", ["true"]))
    KubernetesLauncher(make_cfg(tmp_path), api=api, namespace=NS).start("r1", "augment", 2)
    with pytest.raises(LaunchError, match=r"still running for run 'r1'.*kubectl delete job"):
        KubernetesLauncher(make_cfg(tmp_path), api=api, namespace=NS).start("r2", "augment", 2)


def test_a_finished_job_is_replaced(api: Any, tmp_path: Path) -> None:
    write_template(tmp_path, "augment", job_manifest("t-augment", ["true"]))
    KubernetesLauncher(make_cfg(tmp_path), api=api, namespace=NS).start("r1", "augment", 2)
    done = {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}
    api.patch_namespaced_job_status("t-augment", NS, {"status": done})
    KubernetesLauncher(make_cfg(tmp_path), api=api, namespace=NS).start("r2", "augment", 1)
    job = api.read_namespaced_job_status("t-augment", NS)
    assert job.metadata.labels[RUN_LABEL] == "r2"
    assert not job.status or not job.status.conditions


def test_a_failed_job_stops_the_stage_with_its_reason(api: Any, tmp_path: Path) -> None:
    write_template(tmp_path, "generate", job_manifest("t-generate", ["true"]))
    launcher = KubernetesLauncher(make_cfg(tmp_path), api=api, namespace=NS)
    launcher.start("r1", "generate", 1)
    failed = {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
              "message": "Job has reached the specified backoff limit"}  # fmt: skip
    api.patch_namespaced_job_status("t-generate", NS, {"status": {"conditions": [failed]}})
    launcher._last_check = 0.0
    with pytest.raises(LaunchError) as err:
        launcher.check()
    text = str(err.value)
    assert "stage generate: Job mia/t-generate failed (BackoffLimitExceeded" in text
    assert "kubectl logs -n mia -l job-name=t-generate" in text
    # a failed Job stays for `kubectl logs` under the default cleanup policy
    launcher.stop()
    assert api.read_namespaced_job("t-generate", NS).metadata.name == "t-generate"


def test_a_job_deleted_under_the_stage_is_reported(api: Any, tmp_path: Path) -> None:
    write_template(tmp_path, "score", job_manifest("t-score", ["true"]))
    launcher = KubernetesLauncher(make_cfg(tmp_path), api=api, namespace=NS)
    launcher.start("r1", "score", 1)
    api.delete_namespaced_job("t-score", NS)
    with pytest.raises(LaunchError, match="was deleted while the stage ran"):
        launcher.check()


@pytest.mark.parametrize(("policy", "kept"), [("on_success", False), ("never", True)])
def test_cleanup_policy_after_success(api: Any, tmp_path: Path, policy: str, kept: bool) -> None:
    write_template(tmp_path, "select", job_manifest("t-select", ["true"]))
    launcher = KubernetesLauncher(make_cfg(tmp_path, cleanup=policy), api=api, namespace=NS)
    launcher.start("r1", "select", 1)
    complete = {"conditions": [{"type": "Complete", "status": "True"}]}
    api.patch_namespaced_job_status("t-select", NS, {"status": complete})
    launcher.stop()
    names = [j.metadata.name for j in api.list_namespaced_job(NS).items]
    assert ("t-select" in names) is kept


def test_an_unreachable_api_is_a_clear_error(tmp_path: Path) -> None:
    from kubernetes import client

    cfg = client.Configuration()
    cfg.host = "http://127.0.0.1:9"  # discard port: connection refused
    api = client.BatchV1Api(client.ApiClient(cfg))
    write_template(tmp_path, "augment", job_manifest("t-augment", ["true"]))
    launcher = KubernetesLauncher(make_cfg(tmp_path), api=api, namespace=NS)
    cfg.retries = 0
    with pytest.raises(LaunchError, match="Kubernetes API unreachable"):
        launcher.start("r1", "augment", 1)


# --- with the kubelet stand-in running the Job's pods ---------------------------
def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def wait_finished(launcher: KubernetesLauncher, api: Any, name: str) -> Any:
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = api.read_namespaced_job_status(name, NS)
        if job.status and job.status.conditions:
            return job
        time.sleep(0.05)
    raise AssertionError(f"{name} never finished")


def test_pods_failing_past_backoff_limit_fail_the_job(api: Any, tmp_path: Path) -> None:
    tpl = job_manifest("t-augment", py("import sys; sys.exit(3)"), backoffLimit=2)
    write_template(tmp_path, "augment", tpl)
    launcher = KubernetesLauncher(make_cfg(tmp_path), api=api, namespace=NS)
    with KubeletStandIn(api, NS, []) as kubelet:
        launcher.start("r1", "augment", 2)
        job = wait_finished(launcher, api, "t-augment")
        assert job.status.conditions[0].reason == "BackoffLimitExceeded"
        assert job.status.failed == 3  # backoffLimit 2: the third failure ends it
        with pytest.raises(LaunchError, match="BackoffLimitExceeded"):
            launcher.check()
    assert set(kubelet.history[-1].exit_codes) == {3}


def test_pod_failure_policy_exit_codes(api: Any, tmp_path: Path) -> None:
    """Exit 2 (bad config) fails the Job at once; exit 75 (stopped by a signal) is
    not counted against backoffLimit. The chart renders these rules."""
    rules = {
        "rules": [
            {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [2]}},
            {"action": "Ignore", "onExitCodes": {"operator": "In", "values": [75]}},
        ]
    }
    tpl = job_manifest("t-augment", py("import sys; sys.exit(2)"), podFailurePolicy=rules)
    write_template(tmp_path, "augment", tpl | {"spec": tpl["spec"] | {"backoffLimit": 5}})
    launcher = KubernetesLauncher(make_cfg(tmp_path), api=api, namespace=NS)
    with KubeletStandIn(api, NS, []):
        launcher.start("r1", "augment", 1)
        job = wait_finished(launcher, api, "t-augment")
        assert job.status.conditions[0].reason == "PodFailurePolicy"
        assert not job.status.failed
        # a worker stopped by a drain (75) is replaced, then one that drains succeeds
        marker = tmp_path / "stopped-once"
        code = f"import os,sys; p={str(marker)!r}; os.path.exists(p) or (open(p,'w'), sys.exit(75))"
        tpl = job_manifest("t-augment", py(code), podFailurePolicy=rules)
        write_template(tmp_path, "augment", tpl | {"spec": tpl["spec"] | {"backoffLimit": 0}})
        launcher.start("r1", "augment", 1)
        job = wait_finished(launcher, api, "t-augment")
        assert job.status.conditions[0].type == "Complete"
        assert (job.status.succeeded, job.status.failed or 0) == (1, 0)


def test_preflight_names_a_missing_template_before_any_work(api: Any, tmp_path: Path) -> None:
    write_template(tmp_path, "augment", job_manifest("t-augment", ["true"]))
    launcher = KubernetesLauncher(make_cfg(tmp_path), api=api, namespace=NS)
    launcher.preflight(["augment"])
    with pytest.raises(LaunchError, match=r"generate\.yaml: no Job template for stage generate"):
        launcher.preflight(["augment", "generate"])
    assert api.list_namespaced_job(NS).items == []


def test_preflight_reports_a_role_that_refuses(tmp_path: Path) -> None:
    import kmock

    write_template(tmp_path, "augment", job_manifest("t-augment", ["true"]))
    emulator = KubeEmulator()  # its own: the refusal below stays for its lifetime
    try:
        forbidden = kmock.KubernetesError(status=403, reason="Forbidden", message="forbidden")
        emulator.handler["list", kmock.resource("batch/v1/jobs")] << forbidden
        launcher = KubernetesLauncher(make_cfg(tmp_path), api=emulator.batch(), namespace=NS)
        with pytest.raises(LaunchError, match=r"list Job in namespace mia refused \(403"):
            launcher.preflight(["augment"])
    finally:
        emulator.close()
