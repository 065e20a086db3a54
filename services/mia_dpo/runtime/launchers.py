"""Launchers decide only WHERE workers run; the worker loop is the same everywhere.

- inline: worker threads in the controller process (the embedded default, with
  the in-process queue);
- local: `mia-dpo worker` subprocesses on this machine, restarted if they crash;
- external: someone else runs the workers (Docker Compose);
- kubernetes: one Job per stage from the chart's template (k8s_launcher.py).

`launcher_factory.make_launcher` picks one from the config.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import threading
from abc import ABC, abstractmethod
from pathlib import Path

import yaml

from mia_dpo.config import RunConfig
from mia_dpo.runtime.context import StageResolver
from mia_dpo.runtime.queue import Queue
from mia_dpo.runtime.store import Store
from mia_dpo.runtime.worker import Worker

log = logging.getLogger("mia_dpo.launcher")


class LaunchError(RuntimeError):
    pass


class Launcher(ABC):
    @abstractmethod
    def start(self, run_id: str, stage: str, n: int) -> None: ...

    def preflight(self, stages: list[str]) -> None:  # noqa: B027 - optional hook
        """Called once before any work: raise LaunchError if a stage could not be launched."""

    def check(self) -> None:  # noqa: B027 - optional hook, most launchers need nothing
        """Called while waiting: keep workers alive, raise LaunchError when it cannot."""

    @abstractmethod
    def stop(self, timeout: float = 30.0) -> None:
        """The stage is closed: wait for the workers to drain and exit."""


class InlineLauncher(Launcher):
    def __init__(self, cfg: RunConfig, store: Store, queue: Queue, stages: StageResolver) -> None:
        self.cfg, self.store, self.queue, self.stages = cfg, store, queue, stages
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []
        self.stop_event = threading.Event()

    def start(self, run_id: str, stage: str, n: int) -> None:
        self.stop_event.clear()
        for i in range(n):
            worker = Worker(
                self.cfg, run_id, stage, self.store, self.queue,
                stage_fn=self.stages(stage), stop=self.stop_event,
            )  # fmt: skip
            t = threading.Thread(
                target=self._run, args=(worker,), name=f"{stage}-worker-{i}", daemon=True
            )
            t.start()
            self.threads.append(t)

    def _run(self, worker: Worker) -> None:
        try:
            worker.run()
        except BaseException as e:  # surfaced by check(), not lost in a thread
            self.errors.append(e)

    def check(self) -> None:
        if self.errors:
            raise LaunchError(f"worker thread crashed: {self.errors[0]}") from self.errors[0]
        if self.threads and not any(t.is_alive() for t in self.threads):
            raise LaunchError("all worker threads exited while the stage still had work")

    def stop(self, timeout: float = 30.0) -> None:
        for t in self.threads:
            t.join(timeout)
        self.threads.clear()

    def interrupt(self) -> None:
        self.stop_event.set()


class LocalLauncher(Launcher):
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.procs: list[subprocess.Popen[bytes]] = []
        self.restarts = 0
        self._argv: list[str] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def _worker_config(self) -> str:
        """The controller's effective config (file + overrides + env) for the workers:
        without credentials, which travel in the child's environment instead."""
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="mia-dpo-launcher-")
            path = Path(self._tmp.name, "worker.yaml")
            path.write_text(yaml.safe_dump(self.cfg.model_dump(mode="json")), encoding="utf-8")
            path.chmod(0o600)
        return str(Path(self._tmp.name, "worker.yaml"))

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        secrets = {
            "MIA_DPO_REDIS_PASSWORD": self.cfg.queue.password,
            "MIA_DPO_S3_ACCESS_KEY": self.cfg.store.access_key,
            "MIA_DPO_S3_SECRET_KEY": self.cfg.store.secret_key,
        }
        env.update({k: v.get_secret_value() for k, v in secrets.items() if v is not None})
        return env

    def _spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self._argv, env=self._env())

    def start(self, run_id: str, stage: str, n: int) -> None:
        self._argv = [sys.executable, "-m", "mia_dpo", "worker", "--stage", stage,
                      "--run-id", run_id, "--config", self._worker_config()]  # fmt: skip
        self.restarts = 0
        self.procs = [self._spawn() for _ in range(n)]

    def check(self) -> None:
        for i, p in enumerate(self.procs):
            rc = p.poll()
            if rc is None or rc == 0:
                continue
            # A crashed worker's lease expires and another worker reclaims its
            # task; replacing the process keeps the stage's parallelism.
            if self.restarts >= self.cfg.launcher.max_restarts:
                raise LaunchError(
                    f"worker exited with code {rc}; {self.restarts} restarts already "
                    f"(launcher.max_restarts={self.cfg.launcher.max_restarts})"
                )
            self.restarts += 1
            log.warning("worker pid %d exited with code %d; restarting", p.pid, rc)
            self.procs[i] = self._spawn()
        if self.procs and all(p.poll() == 0 for p in self.procs):
            raise LaunchError("all workers exited while the stage still had work")

    def stop(self, timeout: float = 30.0) -> None:
        for p in self.procs:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.terminate()
                p.wait(10)
        self.procs.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def interrupt(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()


class ExternalLauncher(Launcher):
    def start(self, run_id: str, stage: str, n: int) -> None:
        log.info("stage %s: waiting for externally started workers", stage)

    def stop(self, timeout: float = 30.0) -> None:
        pass
