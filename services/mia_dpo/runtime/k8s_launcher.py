"""The kubernetes launcher: one Job per stage, made from the chart's template.

The Helm chart renders a complete batch/v1 Job manifest per stage into its
ConfigMap, mounted at `launcher.kubernetes.job_templates/<stage>.yaml`. The
controller fills in only what it alone knows (the run id, how many workers the
stage still needs, who owns the Job) and creates it with the official client, so
GPU pods exist only while their stage runs. It then follows the Job's status:

- Failed (backoffLimit or podFailurePolicy spent): the run stops with the Job's
  reason and the command that shows the failing pod's log;
- Complete while the stage still has work: the workers gave up early; same;
- after the stage closes, the workers drain and exit 0, the Job completes, and
  it is deleted per `cleanup`.

A Job of the same name that is still active and labelled with this run is
adopted, which is what a restarted controller pod needs; a finished one is
replaced.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from pathlib import Path
from typing import Any

import yaml

from mia_dpo.config import RunConfig
from mia_dpo.runtime.launchers import Launcher, LaunchError

log = logging.getLogger("mia_dpo.launcher.k8s")

RUN_LABEL = "mia-dpo.io/run-id"
STAGE_LABEL = "mia-dpo.io/stage"
# The stage's 1-based position in the run, zero-padded so that `kubectl get jobs
# --sort-by=.metadata.labels.mia-dpo\.io/stage-index` lists a run's stages in order.
INDEX_LABEL = "mia-dpo.io/stage-index"
MANAGED_BY = ("app.kubernetes.io/managed-by", "mia-dpo-controller")
SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
# The chart passes the controller's own Job (downward API) so stage Jobs are owned
# by it: deleting the controller Job (helm uninstall) garbage-collects them.
OWNER_ENV = ("MIA_DPO_OWNER_JOB", "MIA_DPO_OWNER_UID")


def load_job_template(path: Path, stage: str) -> dict[str, Any]:
    """A stage's Job manifest, checked enough that a broken template fails here,
    with the file named, and not as an opaque API error."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LaunchError(
            f"{path}: no Job template for stage {stage} "
            "(launcher.kubernetes.job_templates; the chart mounts one per stage)"
        ) from None
    except (OSError, yaml.YAMLError) as e:
        first = str(e).splitlines()[0]
        raise LaunchError(f"{path}: cannot read the Job template: {first}") from None
    if not isinstance(doc, dict) or doc.get("kind") != "Job" or doc.get("apiVersion") != "batch/v1":
        raise LaunchError(f"{path}: not a batch/v1 Job manifest")
    name = (doc.get("metadata") or {}).get("name")
    if not isinstance(name, str) or not name:
        raise LaunchError(f"{path}: metadata.name is missing")
    pod = ((doc.get("spec") or {}).get("template") or {}).get("spec") or {}
    if not isinstance(pod.get("containers"), list) or not pod["containers"]:
        raise LaunchError(f"{path}: spec.template.spec.containers is empty")
    return doc


def render_job(
    template: dict[str, Any],
    run_id: str,
    stage: str,
    workers: int,
    owner: dict[str, str] | None,
    index: int | None = None,
) -> dict[str, Any]:
    """The template with the run's facts filled in (a copy; the template is untouched).
    `index`: the stage's 1-based position in the run (None: the template's label stays)."""
    job = copy.deepcopy(template)
    own = {RUN_LABEL: run_id, STAGE_LABEL: stage}
    if index is not None:
        own[INDEX_LABEL] = f"{index:02d}"
    job["metadata"].setdefault("labels", {}).update({**own, MANAGED_BY[0]: MANAGED_BY[1]})
    pod_meta = job["spec"]["template"].setdefault("metadata", {})
    pod_meta.setdefault("labels", {}).update(own)
    spec = job["spec"]
    # Work-queue Jobs scale with the shards left; Indexed or fixed-completion Jobs
    # (multi-node torchrun) have a shape the chart decided.
    if spec.get("completionMode") != "Indexed" and spec.get("completions") is None:
        spec["parallelism"] = workers
    pod = spec["template"]["spec"]
    for container in pod["containers"] + (pod.get("initContainers") or []):
        # Kubernetes takes `nvidia.com/gpu: 1`; the Python client wants quantities as strings.
        for kind in ("limits", "requests"):
            quantities = (container.get("resources") or {}).get(kind) or {}
            quantities.update({k: str(v) for k, v in quantities.items()})
    for container in pod["containers"]:
        env = [e for e in container.get("env") or [] if e.get("name") != "MIA_DPO_RUN_ID"]
        container["env"] = [{"name": "MIA_DPO_RUN_ID", "value": run_id}, *env]
    if owner:
        job["metadata"]["ownerReferences"] = [
            {"apiVersion": "batch/v1", "kind": "Job", "name": owner["name"], "uid": owner["uid"],
             "controller": False, "blockOwnerDeletion": False}
        ]  # fmt: skip
    return job


def job_condition(status: Any) -> tuple[str, str] | None:
    """('Complete'|'Failed', 'reason: message') once the Job has finished, else None."""
    for c in (getattr(status, "conditions", None) or []) if status else []:
        if c.type in ("Complete", "Failed") and c.status == "True":
            detail = ": ".join(x for x in (c.reason, c.message) if x)
            return c.type, detail
    return None


def default_namespace() -> str:
    if SA_NAMESPACE.is_file():
        return SA_NAMESPACE.read_text(encoding="utf-8").strip()
    try:
        from kubernetes import config as kconfig

        _, context = kconfig.list_kube_config_contexts()
        return str(context.get("context", {}).get("namespace") or "default")
    except Exception:  # no kubeconfig either: the API's own default
        return "default"


def batch_api() -> Any:
    """BatchV1Api from the pod's service account, else from KUBECONFIG / ~/.kube/config."""
    from kubernetes import client
    from kubernetes import config as kconfig

    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            kconfig.load_incluster_config()
        else:
            kconfig.load_kube_config()
    except Exception as e:
        raise LaunchError(f"launcher.kubernetes: no Kubernetes API credentials: {e}") from None
    return client.BatchV1Api()


class KubernetesLauncher(Launcher):
    def __init__(self, cfg: RunConfig, api: Any | None = None, namespace: str | None = None):
        self.cfg = cfg
        self.kcfg = cfg.launcher.kubernetes
        self._api = api
        self.namespace = namespace or self.kcfg.namespace or default_namespace()
        self.job: str | None = None
        self.stage = ""
        self._last_check = 0.0
        self._finished_at: float | None = None
        self._api_down_since: float | None = None

    @property
    def api(self) -> Any:
        if self._api is None:
            self._api = batch_api()
        return self._api

    def _owner(self) -> dict[str, str] | None:
        name, uid = (os.environ.get(k, "") for k in OWNER_ENV)
        return {"name": name, "uid": uid} if name and uid else None

    def _read(self, name: str) -> Any | None:
        from kubernetes.client import ApiException

        try:
            return self.api.read_namespaced_job_status(name, self.namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def preflight(self, stages: list[str]) -> None:
        """Every stage's template readable and the API answering, before any work:
        a missing template or a Role without `list jobs` fails in the first second."""
        for stage in stages:
            load_job_template(Path(self.kcfg.job_templates) / f"{stage}.yaml", stage)
        self._call(lambda: self.api.list_namespaced_job(self.namespace, limit=1), "list")
        log.info("kubernetes launcher: namespace %s, templates %s",
                 self.namespace, self.kcfg.job_templates)  # fmt: skip

    def start(self, run_id: str, stage: str, n: int) -> None:
        path = Path(self.kcfg.job_templates) / f"{stage}.yaml"
        index = self.cfg.stages.index(stage) + 1 if stage in self.cfg.stages else None
        job = render_job(load_job_template(path, stage), run_id, stage, n, self._owner(), index)
        name = job["metadata"]["name"]
        self.job, self.stage, self._finished_at, self._last_check = name, stage, None, 0.0
        existing = self._call(lambda: self._read(name), "read")
        if existing is not None:
            labels = existing.metadata.labels or {}
            finished = job_condition(existing.status)
            if finished is None and labels.get(RUN_LABEL) == run_id:
                log.info("stage %s: adopting the running Job %s/%s", stage, self.namespace, name)
                return
            if finished is None:
                raise LaunchError(
                    f"stage {stage}: Job {self.namespace}/{name} is still running for run "
                    f"{labels.get(RUN_LABEL)!r}; wait for it or `kubectl delete job -n "
                    f"{self.namespace} {name}`"
                )
            self._delete(name, wait=True)
        self._call(lambda: self.api.create_namespaced_job(self.namespace, job), "create")
        log.info("stage %s: created Job %s/%s (parallelism %s)",
                 stage, self.namespace, name, job["spec"].get("parallelism"))  # fmt: skip

    def check(self) -> None:
        if self.job is None:
            return
        now = time.monotonic()
        if now - self._last_check < self.kcfg.poll_seconds:
            return
        self._last_check = now
        job = self._call(lambda: self._read(self.job or ""), "read", tolerate=True)
        if job is False:  # API briefly unreachable: tolerated up to api_retry_seconds
            return
        where = f"Job {self.namespace}/{self.job}"
        if job is None:
            raise LaunchError(f"stage {self.stage}: {where} was deleted while the stage ran")
        finished = job_condition(job.status)
        if finished is None:
            self._finished_at = None
            return
        kind, detail = finished
        hint = f"`kubectl describe job -n {self.namespace} {self.job}` and `kubectl logs -n "
        hint += f"{self.namespace} -l job-name={self.job} --tail=50`"
        if kind == "Failed":
            why = detail or "no reason given"
            raise LaunchError(f"stage {self.stage}: {where} failed ({why}); {hint}")
        # Complete before every shard is marked: give the store a moment (a
        # fixed-completion Job may finish just after our last look at the
        # markers), then the workers really left work behind.
        self._finished_at = self._finished_at or now
        if now - self._finished_at > max(10.0, 3 * self.kcfg.poll_seconds):
            raise LaunchError(
                f"stage {self.stage}: {where} completed while the stage still had work; {hint}"
            )

    def stop(self, timeout: float = 30.0) -> None:
        if self.job is None:
            return
        name, self.job = self.job, None
        deadline = time.monotonic() + self.kcfg.drain_seconds
        state: tuple[str, str] | None = None
        while time.monotonic() < deadline:
            job = self._call(lambda: self._read(name), "read", tolerate=True)
            if job is None:
                return
            state = job_condition(job.status) if job is not False else None
            if state is not None:
                break
            time.sleep(min(self.kcfg.poll_seconds, 1.0))
        if state is None:
            log.warning("stage %s: Job %s did not finish within %.0f s after the stage closed",
                        self.stage, name, self.kcfg.drain_seconds)  # fmt: skip
        policy = self.kcfg.cleanup
        if policy == "always" or (policy == "on_success" and state and state[0] == "Complete"):
            self._delete(name, wait=False)

    def _delete(self, name: str, wait: bool) -> None:
        from kubernetes.client import ApiException

        try:
            # Background propagation takes the Job's pods with it.
            self.api.delete_namespaced_job(name, self.namespace, propagation_policy="Background")
        except ApiException as e:
            if e.status != 404:
                msg = f"cannot delete Job {self.namespace}/{name}: {e.status} {e.reason}"
                raise LaunchError(msg) from None
        log.info("deleted Job %s/%s", self.namespace, name)
        deadline = time.monotonic() + self.kcfg.drain_seconds
        while wait and self._read(name) is not None:
            if time.monotonic() > deadline:
                raise LaunchError(f"Job {self.namespace}/{name} is still there after deletion")
            time.sleep(0.2)

    def _call(self, fn: Any, what: str, tolerate: bool = False) -> Any:
        """Run one API call; connection trouble and 5xx are retried by the caller's
        polling while they last less than api_retry_seconds (False = try later)."""
        from kubernetes.client import ApiException
        from urllib3.exceptions import HTTPError

        try:
            result = fn()
        except ApiException as e:
            if e.status in (401, 403):
                raise LaunchError(
                    f"launcher.kubernetes: {what} Job in namespace {self.namespace} refused "
                    f"({e.status} {e.reason}); the controller's Role must allow it"
                ) from None
            if not (tolerate and (e.status or 0) >= 500):
                detail = (e.body or e.reason or "").strip().splitlines()[0][:300]
                msg = f"Kubernetes API: {what} Job failed ({e.status}): {detail}"
                raise LaunchError(msg) from None
            return self._api_down(what, f"{e.status} {e.reason}")
        except (ValueError, TypeError) as e:  # the client refused the manifest itself
            first = str(e).replace("\n", " ")[:300]
            raise LaunchError(f"{what} Job: the manifest is not valid: {first}") from None
        except (HTTPError, OSError) as e:
            if not tolerate:
                raise LaunchError(f"Kubernetes API unreachable ({what} Job): {e}") from None
            return self._api_down(what, str(e))
        self._api_down_since = None
        return result

    def _api_down(self, what: str, detail: str) -> bool:
        now = time.monotonic()
        self._api_down_since = self._api_down_since or now
        if now - self._api_down_since > self.kcfg.api_retry_seconds:
            raise LaunchError(
                f"Kubernetes API unreachable for {self.kcfg.api_retry_seconds:.0f} s "
                f"({what} Job): {detail}"
            )
        log.warning("Kubernetes API: %s Job failed (%s); retrying", what, detail)
        return False
