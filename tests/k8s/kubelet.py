"""A test-side stand-in for the kubelet and the Job controller.

The kmock emulator stores Jobs but nothing runs them. This stand-in watches the
emulator's Jobs and, for each, runs every pod's first container as a local
process, exactly as the manifest says: `command` + `args` with `$(VAR)`
expansion, `env` values, `secretKeyRef` / `configMapKeyRef` (resolved from the
chart's rendered Secrets and ConfigMaps), downward-API `fieldRef`s, and
configMap / emptyDir volumes materialised in a temp folder (mount paths in
arguments and env are rewritten to those folders). Then it patches the Job's
status like the Job controller would: `active`, `succeeded`, `failed`, and a
Complete or Failed condition, honouring parallelism, completions, Indexed
completion (JOB_COMPLETION_INDEX), backoffLimit and podFailurePolicy exit-code
rules. Images, resources, node selectors and security contexts are not
emulated: the processes run in this test's environment.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes.client import ApiException, BatchV1Api

BIN = Path(sys.executable).parent
SEEN = "kubelet-standin/seen"


@dataclass
class Pod:
    proc: subprocess.Popen[bytes]
    index: int
    log: Path


@dataclass
class JobRun:
    name: str
    namespace: str
    manifest: dict[str, Any]
    root: Path
    pods: list[Pod] = field(default_factory=list)
    succeeded: int = 0
    failed: int = 0
    done_indexes: set[int] = field(default_factory=set)
    started: int = 0
    finished: bool = False
    exit_codes: list[int] = field(default_factory=list)


class KubeletStandIn:
    def __init__(
        self,
        api: BatchV1Api,
        namespace: str,
        objects: list[dict[str, Any]],
        env: dict[str, str] | None = None,
        workdir: Path | None = None,
    ) -> None:
        """`objects`: the rendered chart (Secrets and ConfigMaps are read from it);
        `env`: the environment every process starts from (PATH, HF_HUB_OFFLINE...)."""
        self.api, self.namespace = api, namespace
        self.secrets = {o["metadata"]["name"]: o for o in objects if o.get("kind") == "Secret"}
        self.configmaps = {
            o["metadata"]["name"]: o for o in objects if o.get("kind") == "ConfigMap"
        }
        self.base_env = dict(env or os.environ)
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="kubelet-"))
        self.jobs: dict[str, JobRun] = {}
        self.history: list[JobRun] = []
        self._stop = threading.Event()
        self._seq = 0
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._loop, name="kubelet", daemon=True)

    def __enter__(self) -> KubeletStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        for run in self.jobs.values():
            self._kill(run)
        self.check()

    # --- the loop -------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception as e:  # surfaced by check() and on exit, not lost in a thread
                self.errors.append(e)
                return
            self._stop.wait(0.1)

    def check(self) -> None:
        if self.errors:
            first = self.errors[0]
            raise AssertionError(f"kubelet stand-in crashed: {first!r}") from first

    def _tick(self) -> None:
        listed = self.api.list_namespaced_job(self.namespace).items
        present = {j.metadata.name for j in listed}
        for name in list(self.jobs):
            if name not in present:  # deleted: background propagation kills its pods
                self._kill(self.jobs.pop(name))
        for job in listed:
            annotations = job.metadata.annotations or {}
            run = self.jobs.get(job.metadata.name)
            if run is None or SEEN not in annotations:
                if run is not None:  # recreated under the same name
                    self._kill(run)
                run = self._adopt(job.metadata.name)
            if not run.finished:
                self._advance(run)

    def _adopt(self, name: str) -> JobRun:
        manifest = self.api.api_client.sanitize_for_serialization(
            self.api.read_namespaced_job(name, self.namespace)
        )
        self._seq += 1
        self.api.patch_namespaced_job(
            name, self.namespace, {"metadata": {"annotations": {SEEN: str(self._seq)}}}
        )
        root = self.workdir / f"{name}-{self._seq}"
        root.mkdir(parents=True)
        run = JobRun(name, self.namespace, manifest, root)
        self.jobs[name] = run
        self.history.append(run)
        return run

    # --- the Job controller's part -------------------------------------------
    def _advance(self, run: JobRun) -> None:
        spec = run.manifest["spec"]
        indexed = spec.get("completionMode") == "Indexed"
        completions = spec.get("completions")
        parallelism = spec.get("parallelism", 1)
        backoff = spec.get("backoffLimit", 6)
        for pod in [p for p in run.pods if p.proc.poll() is not None]:
            run.pods.remove(pod)
            rc = pod.proc.returncode
            run.exit_codes.append(rc)
            if rc == 0:
                run.succeeded += 1
                run.done_indexes.add(pod.index)
                continue
            action = self._failure_action(spec, rc)
            if action == "FailJob":
                why = f"container exited with code {rc}, matching a FailJob rule"
                return self._finish(run, "Failed", "PodFailurePolicy", why)
            if action != "Ignore":
                run.failed += 1
            if run.failed > backoff:
                return self._finish(run, "Failed", "BackoffLimitExceeded",
                                    "Job has reached the specified backoff limit")  # fmt: skip
        if indexed or completions is not None:
            wanted = completions or 1
            complete = (len(run.done_indexes) if indexed else run.succeeded) >= wanted
        else:  # work queue: success once any pod succeeded and none is left running
            complete = run.succeeded > 0 and not run.pods
        if complete:
            return self._finish(run, "Complete", "", "")
        if not (run.succeeded > 0 and not indexed and completions is None):
            # (a work-queue Job starts no new pods once one has succeeded)
            busy = {p.index for p in run.pods} | run.done_indexes
            todo = [i for i in range(completions or parallelism) if i not in busy]
            free = parallelism - len(run.pods)
            for i in todo[: max(free, 0)]:
                run.pods.append(self._start_pod(run, i if indexed else 0))
        self._patch_status(run, {"active": len(run.pods), "succeeded": run.succeeded,
                                 "failed": run.failed})  # fmt: skip

    @staticmethod
    def _failure_action(spec: dict[str, Any], rc: int) -> str:
        for rule in (spec.get("podFailurePolicy") or {}).get("rules", []):
            codes = rule.get("onExitCodes")
            if not codes:
                continue
            hit = rc in codes.get("values", [])
            if hit == (codes.get("operator", "In") == "In"):
                return str(rule["action"])
        return "Count"

    def _finish(self, run: JobRun, kind: str, reason: str, message: str) -> None:
        self._kill(run)
        run.finished = True
        cond = {"type": kind, "status": "True", "reason": reason or None,
                "message": message or None}  # fmt: skip
        self._patch_status(run, {"active": 0, "succeeded": run.succeeded, "failed": run.failed,
                                 "conditions": [cond]})  # fmt: skip

    def _patch_status(self, run: JobRun, status: dict[str, Any]) -> None:
        try:
            self.api.patch_namespaced_job_status(run.name, run.namespace, {"status": status})
        except ApiException as e:
            if e.status != 404:
                raise

    def _kill(self, run: JobRun) -> None:
        for pod in run.pods:
            if pod.proc.poll() is None:
                pod.proc.kill()
                pod.proc.wait(30)
        run.pods.clear()

    # --- the kubelet's part ---------------------------------------------------
    def _start_pod(self, run: JobRun, index: int) -> Pod:
        run.started += 1
        pod_dir = run.root / f"pod-{run.started}"
        pod_dir.mkdir(parents=True)
        pod_spec = run.manifest["spec"]["template"]["spec"]
        pod_meta = run.manifest["spec"]["template"].get("metadata") or {}
        mounts = self._volumes(pod_spec, pod_dir)
        container = pod_spec["containers"][0]
        env = dict(self.base_env)
        env.update({"JOB_COMPLETION_INDEX": str(index), "HOSTNAME": f"{run.name}-{index}"})
        for var in container.get("env") or []:
            env[var["name"]] = self._env_value(var, pod_meta, run, mounts, env)
        argv = [expand(a, env, mounts) for a in (container.get("command") or [])]
        argv += [expand(a, env, mounts) for a in (container.get("args") or [])]
        # DNS of an Indexed Job's pods on its headless Service: <job>-<i>.<subdomain>
        if pod_spec.get("subdomain"):
            pod_name = re.escape(run.name) + r"-\d+\." + re.escape(pod_spec["subdomain"])
            argv = [re.sub(pod_name + r"(\.[\w.-]+)?(?=:)", "127.0.0.1", a) for a in argv]
        argv[0] = str(BIN / argv[0]) if (BIN / argv[0]).exists() else argv[0]
        log = pod_dir / "log.txt"
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=mounts.get("/tmp", str(pod_dir)))  # fmt: skip
        return Pod(proc, index, log)

    def _volumes(self, pod_spec: dict[str, Any], pod_dir: Path) -> dict[str, str]:
        """mountPath -> local folder, for the first container's mounts."""
        volumes = {v["name"]: v for v in pod_spec.get("volumes") or []}
        mounts: dict[str, str] = {}
        for m in pod_spec["containers"][0].get("volumeMounts") or []:
            local = pod_dir / "volumes" / m["name"]
            local.mkdir(parents=True, exist_ok=True)
            path = local / m["subPath"] if m.get("subPath") else local
            mounts[m["mountPath"].rstrip("/") or "/"] = str(path)
        cm_mounts = {
            m["mountPath"].rstrip("/"): mounts[m["mountPath"].rstrip("/")]
            for m in pod_spec["containers"][0].get("volumeMounts") or []
            if "configMap" in volumes[m["name"]]
        }
        for name in {m["name"] for m in pod_spec["containers"][0].get("volumeMounts") or []}:
            vol = volumes[name]
            if "configMap" not in vol:
                continue
            data = self.configmaps[vol["configMap"]["name"]].get("data") or {}
            items = vol["configMap"].get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                target = pod_dir / "volumes" / name / item["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                # The one liberty taken: configMap mount paths named inside these
                # files (the run config's job_templates) point at the local folders.
                text = rewrite_paths(data[item["key"]], cm_mounts)
                target.write_text(text, encoding="utf-8")
        return mounts

    def _env_value(
        self,
        var: dict[str, Any],
        meta: dict[str, Any],
        run: JobRun,
        mounts: dict[str, str],
        env: dict[str, str],
    ) -> str:
        if "value" in var:
            return expand(str(var["value"]), env, mounts)
        src = var.get("valueFrom") or {}
        if "secretKeyRef" in src:
            ref = src["secretKeyRef"]
            secret = self.secrets[ref["name"]]
            data = secret.get("stringData") or {}
            if ref["key"] in data:
                return str(data[ref["key"]])
            import base64

            return base64.b64decode(secret["data"][ref["key"]]).decode()
        if "configMapKeyRef" in src:
            ref = src["configMapKeyRef"]
            return str(self.configmaps[ref["name"]]["data"][ref["key"]])
        if "fieldRef" in src:
            path = src["fieldRef"]["fieldPath"]
            labels = run.manifest["metadata"].get("labels") or {}
            fields = {
                "metadata.namespace": run.namespace,
                "metadata.name": f"{run.name}-pod",
                "metadata.uid": f"uid-{run.name}",
                "spec.nodeName": "standin-node",
                "status.podIP": "127.0.0.1",
            }
            if path in fields:
                return fields[path]
            m = re.fullmatch(r"metadata\.labels\['(.+)'\]", path)
            if m:
                pod_labels = dict(meta.get("labels") or {})
                pod_labels.setdefault("job-name", run.name)
                pod_labels.setdefault("batch.kubernetes.io/job-name", run.name)
                pod_labels.setdefault("controller-uid", f"uid-{run.name}")
                pod_labels.setdefault("batch.kubernetes.io/controller-uid", f"uid-{run.name}")
                return str(pod_labels.get(m.group(1), labels.get(m.group(1), "")))
        if "resourceFieldRef" in src:
            return "1"
        raise AssertionError(f"kubelet stand-in: unsupported env source {var}")

    def logs(self, name: str) -> str:
        runs = [r for r in self.history if r.name == name]
        return "\n".join(p.read_text(errors="replace") for r in runs
                         for p in sorted(r.root.glob("pod-*/log.txt")))  # fmt: skip

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def expand(text: str, env: dict[str, str], mounts: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion, then mount paths mapped to their local folders."""
    text = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), text)
    for mount, local in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
        if text == mount or text.startswith(mount + "/"):
            return local + text[len(mount) :]
    return text


def rewrite_paths(text: str, mounts: dict[str, str]) -> str:
    for mount, local in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
        text = re.sub(re.escape(mount) + r"(?=[/\s\"']|$)", local, text, flags=re.M)
    return text
