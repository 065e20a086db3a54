"""One run of all six stages under its own run id, with the processes it started.

With `launcher.kind: local` the controller starts (and restarts) the workers; the
trial finds them among the controller's descendants (psutil). With `external` the
trial starts `mia-dpo worker` processes itself, `workers` per open stage, and replaces
any that exit before their stage is closed, as a Job controller would. Either way only
processes started here, or their descendants, are ever signalled, always by PID with
its creation time checked (tests/faults/processes.py; never by name).
"""

from __future__ import annotations

import contextlib
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import redis
import yaml

from mia_dpo.records import SINGLE_TASK_STAGES
from mia_dpo.runtime import layout
from tests.faults.audit import Outcome, Reference, audit, stage_ends
from tests.faults.lab import EXIT_STOPPED, NAMESPACE, REF_RUN, STAGES, Lab, TrialError
from tests.faults.processes import Proc, wait_gone

# ----------------------------------------------------------------------- a trial


@dataclass
class LeaseView:
    task_id: str
    shard: int
    pid: int
    idle_ms: int


class Trial:
    """One run of the pipeline under its own run id, with the processes it started."""

    def __init__(self, lab: Lab, run_id: str, launcher: str = "local") -> None:
        self.lab, self.run_id, self.launcher = lab, run_id, launcher
        self.dir = lab.root / "trials" / run_id
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.dir / "run.yaml"
        self.config_path.write_text(yaml.safe_dump(lab.config(launcher)))
        self.env = lab.env()
        self.r = lab.redis_client()
        self.controllers: list[tuple[subprocess.Popen[bytes], Proc]] = []
        self.procs: dict[int, Proc] = {}  # every worker seen, by pid
        self.ext: dict[str, list[tuple[subprocess.Popen[bytes], Proc]]] = {}
        self.exits: Counter[int] = Counter()
        self._reaped: set[int] = set()
        self.deliveries: dict[str, int] = {}  # task id -> most claims seen
        self.expected_exits: set[int] = set()  # pids we SIGKILLed or drained
        self.paused: set[str] = set()
        self.orphans: list[Proc] = []
        self.leftover_dirs: set[Path] = set()
        self.wall0 = time.time()
        self.events: list[dict[str, Any]] = []
        self.t0 = time.monotonic()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True, name="watch")
        self._logs: list[Any] = []

    # -- processes ---------------------------------------------------------------------
    def _log(self, name: str) -> Any:
        f = open(self.dir / name, "ab")  # noqa: SIM115 - closed in cleanup()
        self._logs.append(f)
        return f

    def start_controller(self) -> Proc:
        n = len(self.controllers)
        argv = [sys.executable, "-m", "mia_dpo", "run", str(self.config_path),
                "--run-id", self.run_id, "-q"]  # fmt: skip
        p = subprocess.Popen(
            argv, env=self.env, stdout=self._log(f"controller-{n}.out"),
            stderr=self._log(f"controller-{n}.log"), stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        proc = Proc.of(p.pid, "controller") or Proc(p.pid, "controller")
        with self._lock:
            self.controllers.append((p, proc))
        return proc

    def start(self) -> None:
        self.start_controller()
        self._watcher.start()

    def _spawn_worker(self, stage: str) -> None:
        n = sum(len(v) for v in self.ext.values())
        argv = [sys.executable, "-m", "mia_dpo", "worker", "--stage", stage,
                "--run-id", self.run_id, "--config", str(self.config_path)]  # fmt: skip
        log = self._log(f"worker-{n:03d}-{stage}.log")
        p = subprocess.Popen(
            argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        proc = Proc.of(p.pid, "worker", stage) or Proc(p.pid, "worker", stage)
        self.ext.setdefault(stage, []).append((p, proc))
        self.procs[p.pid] = proc

    @property
    def controller(self) -> subprocess.Popen[bytes]:
        return self.controllers[-1][0]

    def running(self) -> bool:
        return self.controller.poll() is None

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                with self._lock:
                    if self.launcher == "local":
                        self._track_local()
                    else:
                        self._supervise()
                self._sample_attempts()
            except redis.RedisError:
                pass  # Redis is down (on purpose): look again later
            except Exception as e:  # never let the watcher die silently
                self.events.append({"event": "watcher_error", "error": repr(e)})
            self._stop.wait(0.1)

    def _sample_attempts(self) -> None:
        """Deliveries per task, sampled: the attempts hash is deleted at the ack."""
        pipe = self.r.pipeline(transaction=False)
        for stage in STAGES:
            pipe.hgetall(self.key(stage, "attempts"))
        for counts in pipe.execute():
            for tid, n in counts.items():
                self.deliveries[tid] = max(self.deliveries.get(tid, 0), int(n))

    def _track_local(self) -> None:
        for _, ctl in self.controllers:
            for kid in ctl.descendants("worker"):  # none once the controller is gone
                if kid.pid in self.procs and self.procs[kid.pid].alive():
                    continue
                argv = kid.cmdline()  # [] once it is gone
                if "worker" not in argv:
                    continue
                stage = argv[argv.index("--stage") + 1] if "--stage" in argv else None
                self.procs[kid.pid] = replace(kid, stage=stage)

    def _supervise(self) -> None:
        self._supervise_exits()
        for stage in STAGES:
            if stage in self.paused or not self.running():
                continue
            st = self.stage_state(stage)
            if st.get("opened") != "1" or st.get("closed") == "1":
                continue
            live = [1 for p, _ in self.ext.get(stage, []) if p.poll() is None]
            # as the local launcher: no more workers than the stage has tasks
            wanted = 1 if stage in SINGLE_TASK_STAGES else self.lab.spec.workers
            for _ in range(wanted - len(live)):
                self._spawn_worker(stage)

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 2)

    def workers(self, stage: str) -> list[Proc]:
        with self._lock:
            if self.launcher == "local":
                self._track_local()
            return [p for p in self.procs.values() if p.stage == stage and p.alive()]

    def owned(self, pid: int) -> Proc | None:
        with self._lock:
            if self.launcher == "local":
                self._track_local()
            proc = self.procs.get(pid)
            return proc if proc is not None and proc.alive() else None

    def kill(self, proc: Proc, sig: int) -> bool:
        with self._lock:
            self.expected_exits.add(proc.pid)
            return proc.signal(sig)

    # -- queue and store views ---------------------------------------------------------
    def key(self, stage: str, name: str) -> str:
        return f"{NAMESPACE}:{self.run_id}:{stage}:{name}"

    def stage_state(self, stage: str) -> dict[str, str]:
        return self.r.hgetall(self.key(stage, "state"))

    def leases(self, stage: str) -> list[LeaseView]:
        stream = self.key(stage, "stream")
        try:
            pending = self.r.xpending_range(stream, "workers", "-", "+", 200)
            out = []
            for p in pending:
                entry = self.r.xrange(stream, p["message_id"], p["message_id"])
                if not entry:
                    continue
                tid = entry[0][1]["id"]
                pid = int(p["consumer"].split("-")[-2])
                out.append(LeaseView(tid, int(tid.rsplit("/", 1)[1]), pid,
                                     int(p["time_since_delivered"])))  # fmt: skip
            return out
        except redis.RedisError:
            return []

    def marked(self, stage: str, shard: int) -> bool:
        return self.lab.store.exists(layout.marker_key(self.run_id, stage, shard))

    def in_flight(self, stage: str) -> list[tuple[LeaseView, Proc]]:
        """Tasks of the stage held by a live worker of ours, whose shard is not done."""
        out = []
        for lease in self.leases(stage):
            proc = self.owned(lease.pid)
            if proc is not None and not self.marked(stage, lease.shard):
                out.append((lease, proc))
        return out

    def _wait(self, what: str, cond: Callable[[], Any], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            got = cond()
            if got:
                return got
            if time.monotonic() > deadline:
                raise TrialError(f"{self.run_id}: waited {timeout:.0f}s for {what}")
            time.sleep(0.03)

    def stage_over(self, stage: str) -> bool:
        try:
            st = self.stage_state(stage)
        except redis.RedisError:
            return False
        if st.get("closed") == "1":
            return True
        return not self.running()

    def random_moment(
        self, stage: str, rng: random.Random, ref: Reference, timeout: float = 900
    ) -> list[tuple[LeaseView, Proc]]:
        """Wait until a task of `stage` is in flight, sleep a random time up to 0.9 x the
        clean run's longest task of the stage (a first task includes loading the model),
        then return the tasks in flight, waiting for the next one if none is.
        [] if the stage ended first."""

        def ready() -> Any:
            return self.in_flight(stage) or (["over"] if self.stage_over(stage) else None)

        if self._wait(f"a task of {stage} in flight", ready, timeout) == ["over"]:
            return []
        time.sleep(rng.uniform(0.0, 0.9 * ref.seconds.get(stage, 1.0)))
        got = self._wait(f"a task of {stage} in flight", ready, timeout)
        return [] if got == ["over"] else got

    # -- the end -------------------------------------------------------------------------
    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                p = self.controller
            try:
                return p.wait(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                if time.monotonic() > deadline:
                    raise TrialError(
                        f"{self.run_id}: the run did not finish in {timeout:.0f}s "
                        f"(hang guard); queue: {self.queue_snapshot()}"
                    ) from None

    def queue_snapshot(self) -> dict[str, Any]:
        snap = {}
        with contextlib.suppress(redis.RedisError):
            for stage in STAGES:
                snap[stage] = {
                    "state": self.stage_state(stage),
                    "stream": self.r.xlen(self.key(stage, "stream")),
                    "dead": self.r.hlen(self.key(stage, "dead")),
                }
        return snap

    def settle(self, timeout: float = 90.0) -> None:
        """After the controller exited: every worker must exit on its own (its stage is
        closed). One that does not is a hang; it is reported, then killed."""
        with self._lock:
            if self.launcher == "local":
                self._track_local()
            procs = [p for p in self.procs.values() if p.pid not in self.expected_exits]
        left = wait_gone(procs + self.orphans, timeout)
        if left:
            self.events.append(
                {
                    "event": "workers_left_running",
                    "pids": [p.pid for p in left],
                    "stages": [p.stage for p in left],
                }
            )
        with self._lock:
            self._supervise_exits()

    def _supervise_exits(self) -> None:
        for stage, lst in self.ext.items():
            for p, proc in lst:
                rc = p.poll()
                if rc is not None and proc.pid not in self._reaped:
                    self._reaped.add(proc.pid)
                    self.exits[rc] += 1
                    if rc not in (0, EXIT_STOPPED) and proc.pid not in self.expected_exits:
                        self.events.append(
                            {
                                "event": "worker_crash",
                                "stage": stage,
                                "pid": proc.pid,
                                "rc": rc,
                                "t": self.now(),
                            }
                        )

    def cleanup(self) -> None:
        """Kill whatever we started that is still alive (by pid + start time)."""
        self._stop.set()
        if self._watcher.is_alive():
            self._watcher.join(10)
        with self._lock:
            everything = [proc for _, proc in self.controllers] + list(self.procs.values())
            everything += self.orphans
        for proc in everything:
            proc.signal(signal.SIGKILL)
        wait_gone(everything, 20)
        for p, _ in self.controllers:
            with contextlib.suppress(Exception):
                p.wait(5)
        for lst in self.ext.values():
            for p, _ in lst:
                with contextlib.suppress(Exception):
                    p.wait(5)
        for f in self._logs:
            f.close()
        self.r.close()


# ----------------------------------------------------------------- the clean run


def run_reference(lab: Lab, hang_guard: float = 1800.0) -> tuple[Reference, Outcome]:
    """The clean run every trial is compared with (local launcher, no fault)."""
    trial = Trial(lab, REF_RUN, "local")
    out = Outcome(run_id=REF_RUN, fault="none", launcher="local")
    t0 = time.monotonic()
    try:
        trial.start()
        out.rc = trial.wait(hang_guard)
        trial.settle()
    finally:
        trial.cleanup()
    out.seconds = round(time.monotonic() - t0, 1)
    if out.rc != 0:
        log = (trial.dir / "controller-0.log").read_text(errors="replace")[-3000:]
        raise TrialError(f"the clean run failed with rc {out.rc}:\n{log}")
    ref = Reference.capture(lab)
    audit(lab, ref, out)  # the clean run must pass its own accounting
    out.stage_end_s = stage_ends(lab, REF_RUN, trial.wall0)
    return ref, out
