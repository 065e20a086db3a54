"""Fault injection against the whole pipeline: real redis-server, real S3 (SeaweedFS),
the tiny model, `mia-dpo run` and its workers as separate processes.

A `Lab` holds what every trial shares: a Redis with append-only persistence and a
password, an S3 server that can be stopped and started again on the same ports and
data, the synthetic source data uploaded to the bucket (the run reads its index and
images from s3://, so an S3 outage hits every reader), and the tiny model.

A `Trial` is one run of all six stages under a new run id with the same seeds, while
one fault is injected at a random moment:

- `sigkill`: in every stage, a random worker holding a task is killed with SIGKILL at
  a random moment inside its task (up to 0.9 x the clean run's median task time);
- `controller`: the `mia-dpo run` process is killed with SIGKILL during a random stage
  and started again with the same command and run id;
- `redis`: redis-server is stopped (SIGKILL or SIGTERM, at random) during a random
  stage, kept down 0.5-6 s (often longer than a lease), and started again on its AOF;
- `s3`: the S3 server is stopped during a random stage, kept down >= 10 s, and started
  again on the same ports and data directory;
- `drain`: every worker of a random stage gets SIGTERM as a node drain sends it (half
  of them a second one soon after); each must exit 75 with its task finished or
  released; replacements are started afterwards.

With `launcher.kind: local` the controller starts (and restarts) the workers; the
harness finds them among the controller's children (/proc). With `external` the
harness starts `mia-dpo worker` processes itself, `workers` per open stage, and
replaces any that exit before their stage is closed, as a Job controller would.
Either way only processes started here, or their descendants, are ever signalled,
always by PID with its start time checked (never by name).

`audit` then counts, from the store and the Redis streams only (never from logs):
- lost: a shard of any stage without its marker or outputs, a task left in a stream
  without a marker, a dead letter; a planned sample missing from a stage's outputs;
- duplicated: a sample id appearing more often than planned in a stage's outputs, a
  shard whose outputs differ from the clean run's (processed again with another
  result), a task still queued or leased although its shard has a marker;
and checks that both pairs files are byte-identical to the clean run's (the run id
inside composed-image URIs, `s3://bucket/runs/{id}/...`, is the one difference
allowed; those images are compared by ETag), that every stage wrote `_SUCCESS` with
no dead shards, and that training left an adapter and evaluation a report.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import redis
import yaml

from mia_dpo.config import StoreConfig
from mia_dpo.errors import NotFound
from mia_dpo.records import SINGLE_TASK_STAGES, STAGE_ORDER
from mia_dpo.runtime import layout
from mia_dpo.runtime.store import S3Store
from tests.servers import RedisServer, SeaweedS3, find_weed, pid_alive, seaweed_server

STAGES: tuple[str, ...] = STAGE_ORDER
SHARDED = tuple(s for s in STAGES if s not in SINGLE_TASK_STAGES)
NAMESPACE = "mia-dpo"
REF_RUN = "ref"
EXIT_STOPPED = 75  # mia_dpo.cli.EXIT_STOPPED


class TrialError(RuntimeError):
    """The trial itself could not go on (a hang guard expired, a server did not start)."""


# ------------------------------------------------------------------------ processes


@dataclass(frozen=True)
class ProcStat:
    ppid: int
    start: int  # clock ticks since boot: with the pid, identifies one process
    state: str


def proc_stat(pid: int) -> ProcStat | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[1].split()  # fields[0] is field 3 (state)
    return ProcStat(ppid=int(fields[1]), start=int(fields[19]), state=fields[0])


def children(pid: int) -> set[int]:
    kids: set[int] = set()
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return kids
    for task in tasks:
        with contextlib.suppress(OSError):
            kids.update(int(x) for x in (task / "children").read_text().split())
    if not tasks or not (tasks[0] / "children").exists():  # no CONFIG_PROC_CHILDREN
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and (st := proc_stat(int(entry.name))) and st.ppid == pid:
                kids.add(int(entry.name))
    return kids


def descendants(pid: int) -> set[int]:
    out: set[int] = set()
    todo = [pid]
    while todo:
        for kid in children(todo.pop()):
            if kid not in out:
                out.add(kid)
                todo.append(kid)
    return out


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


@dataclass(frozen=True)
class Proc:
    """A process we started (or a descendant of one), pinned by pid AND start time so a
    recycled pid is never signalled."""

    pid: int
    start: int
    role: str  # controller | worker
    stage: str | None = None

    @classmethod
    def of(cls, pid: int, role: str, stage: str | None = None) -> Proc | None:
        st = proc_stat(pid)
        return None if st is None else cls(pid, st.start, role, stage)

    def alive(self) -> bool:
        st = proc_stat(self.pid)
        return st is not None and st.start == self.start and st.state not in ("Z", "X")

    def signal(self, sig: int) -> bool:
        if not self.alive():
            return False
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            return False
        return True


def wait_gone(procs: list[Proc], timeout: float) -> list[Proc]:
    """Wait until none of procs is alive; return those still alive at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in procs if p.alive()]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


# ----------------------------------------------------------------------- servers


class FaultRedis(RedisServer):
    """RedisServer that can be taken down (crash or clean stop) and brought back."""

    def halt(self, hard: bool) -> None:
        if hard and self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while pid_alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            self.pid = None
        else:
            self.stop()

    def resume(self, timeout: float = 30.0) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise TrialError("redis-server vanished from PATH")
        self._spawn(exe, timeout)


class FaultS3(SeaweedS3):
    """SeaweedS3 that can be stopped and started again on the SAME ports and data
    directory (tests/servers picks new ports at every start)."""

    def halt(self) -> None:
        self.stop()  # keeps self.ports and self.dir

    def resume(self, timeout: float = 90.0) -> None:
        assert self.dir is not None and self.ports
        ports = [self.ports[k] for k in ("master", "volume", "filer", "s3")]
        # _spawn_once draws its ports from free_seaweed_ports: hand it the old ones.
        with mock.patch.object(seaweed_server, "free_seaweed_ports", lambda n: list(ports)):
            self._spawn_once(find_weed(), self.dir / "s3.json", self.dir / "data", timeout)


# --------------------------------------------------------------------------- the lab


@dataclass
class LabSpec:
    n_samples: int = 40
    shard_size: int = 6
    data_seed: int = 11
    seed: int = 5
    workers: int = 2
    lease_seconds: float = 3.0
    max_attempts: int = 5
    train_epochs: float = 0.5


class Lab:
    """Servers, source data in the bucket and the model: shared by every trial."""

    bucket = "faults"

    def __init__(self, root: Path, model_dir: Path, spec: LabSpec | None = None) -> None:
        self.root = Path(root)
        self.model_dir = Path(model_dir)
        self.spec = spec or LabSpec()
        self.redis = FaultRedis()
        self.s3 = FaultS3()
        self._store: S3Store | None = None

    # -- lifecycle ------------------------------------------------------------------
    def start(self) -> Lab:
        from mia_dpo.data.synthetic import write_synthetic

        self.root.mkdir(parents=True, exist_ok=True)
        self.redis.start(self.root / "redis", appendonly=True, password="pw" + secrets.token_hex(8))
        try:
            self.s3.start(self.root / "s3")
            src = self.root / "source"
            write_synthetic(src, self.spec.n_samples, seed=self.spec.data_seed)
            inputs = S3Store(self.store_config(prefix="inputs"))
            inputs.put_bytes("data.json", (src / "data.json").read_bytes())
            for path in sorted((src / "images").rglob("*.png")):
                rel = path.relative_to(src / "images").as_posix()
                inputs.put_bytes(f"images/{rel}", path.read_bytes())
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.s3.stop()
        with contextlib.suppress(Exception):
            self.redis.stop()

    def __enter__(self) -> Lab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- connections ------------------------------------------------------------------
    def store_config(self, prefix: str = "") -> StoreConfig:
        return StoreConfig(
            backend="s3", endpoint=self.s3.endpoint, bucket=self.bucket, prefix=prefix,
            access_key=self.s3.access_key, secret_key=self.s3.secret_key, retry_seconds=180,
        )  # fmt: skip

    @property
    def store(self) -> S3Store:
        if self._store is None:
            self._store = S3Store(self.store_config())
        return self._store

    def redis_client(self) -> redis.Redis:
        return redis.Redis.from_url(
            self.redis.url, decode_responses=True, socket_timeout=5, socket_connect_timeout=2
        )

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            MIA_DPO_REDIS_URL=self.redis.url,
            MIA_DPO_S3_ENDPOINT=self.s3.endpoint,
            MIA_DPO_S3_ACCESS_KEY=self.s3.access_key,
            MIA_DPO_S3_SECRET_KEY=self.s3.secret_key,
            HF_HUB_OFFLINE="1",
            # one intra-op thread per worker: 2 workers on 2 cores, in every run alike
            OMP_NUM_THREADS="1",
            TOKENIZERS_PARALLELISM="false",
            PYTHONWARNINGS="ignore",
        )
        return env

    def config(self, launcher: str) -> dict[str, Any]:
        s = self.spec
        return {
            "seed": s.seed,
            "stages": list(STAGES),
            "input": {
                "path": f"s3://{self.bucket}/inputs/data.json",
                "image_root": f"s3://{self.bucket}/inputs/images",
                "shard_size": s.shard_size,
                "holdout_fraction": 0.2,
            },
            "store": {"backend": "s3", "bucket": self.bucket},
            "queue": {
                "backend": "redis",
                "lease_seconds": s.lease_seconds,
                "max_attempts": s.max_attempts,
                "poll_seconds": 0.2,
            },
            "launcher": {"kind": launcher, "default_workers": s.workers, "max_restarts": 50},
            "model": {"path": str(self.model_dir)},
            # small collages: the tiny model sees 64 px anyway
            "augment": {"grid_tile_px": 64, "grid_margin_px": 16, "grid_label_font_px": 12},
            "generate": {"max_new_tokens": 6, "batch_size": 3},
            "score": {"batch_size": 3},
            "select": {"min_pairs_for_fences": 4},
            "train": {
                "lora_r": 4,
                "lora_alpha": 8,
                "batch_size": 4,
                "gradient_accumulation_steps": 1,
                "max_length": 1024,
                "learning_rate": 1.0e-3,
                "epochs": s.train_epochs,
                "save_steps": 2,
                "logging_steps": 1,
            },
            "evaluate": {"max_new_tokens": 4, "formats": ["sequence", "grid"]},
        }


# ----------------------------------------------------------------- the clean run


def _norm(data: bytes, run_id: str) -> bytes:
    """The run id appears in composed-image URIs (s3://bucket/runs/{id}/augment/...)."""
    return data.replace(f"/runs/{run_id}/".encode(), b"/runs/{RUN}/")


def _compared(rel: str) -> str | None:
    """Which of a run's objects must be identical to the clean run's: 'bytes', 'etag'
    (images) or None (stats with timings, markers, training outputs, ...)."""
    stage, _, name = rel.partition("/")
    if stage in ("augment", "evaluate") and name.startswith("images/"):
        return "etag"
    if stage == "plan" and name != "plan.json" and name != "stats.json":
        return "bytes"
    if stage in SHARDED and name.startswith("shard-") and name.endswith(".jsonl"):
        return "bytes"
    if stage == "select" and name.endswith(".jsonl"):
        return "bytes"
    if stage == "evaluate" and name == "items.jsonl":
        return "bytes"
    return None


def _objects(lab: Lab, run_id: str) -> dict[str, str]:
    """rel key (under runs/{id}/) -> ETag, from one listing."""
    prefix = layout.run_prefix(run_id)
    client = lab.store.client
    return {
        o.object_name[len(prefix) :]: (o.etag or "").strip('"')
        for o in client.list_objects(lab.bucket, prefix=prefix, recursive=True)
    }


@dataclass
class Reference:
    run_id: str
    files: dict[str, bytes]  # rel key -> normalised bytes
    etags: dict[str, str]  # rel key -> ETag (images)
    shards: dict[str, list[int]]
    seconds: dict[str, float]  # longest task per stage (from the markers' stats)

    @classmethod
    def capture(cls, lab: Lab, run_id: str = REF_RUN) -> Reference:
        objs = _objects(lab, run_id)
        files, etags = {}, {}
        for rel, etag in objs.items():
            kind = _compared(rel)
            if kind == "bytes":
                files[rel] = _norm(lab.store.get_bytes(layout.run_prefix(run_id) + rel), run_id)
            elif kind == "etag":
                etags[rel] = etag
        shards: dict[str, list[int]] = {}
        seconds: dict[str, float] = {}
        for stage in STAGES:
            done = sorted(
                int(rel.rsplit("shard-", 1)[1][:-5])
                for rel in objs
                if rel.startswith(f"{stage}/shard-") and rel.endswith(".done")
            )
            shards[stage] = done
            secs = [
                json.loads(lab.store.get_text(layout.marker_key(run_id, stage, i)))["seconds"]
                for i in done
            ]
            seconds[stage] = max(secs) if secs else 1.0
        return cls(run_id, files, etags, shards, seconds)


# ----------------------------------------------------------------------- a trial


@dataclass
class LeaseView:
    task_id: str
    shard: int
    pid: int
    idle_ms: int


@dataclass
class Outcome:
    run_id: str
    fault: str
    launcher: str
    rc: int | None = None
    completed: bool = False
    seconds: float = 0.0
    lost_tasks: list[str] = field(default_factory=list)
    lost_samples: list[str] = field(default_factory=list)
    dup_tasks: list[str] = field(default_factory=list)
    dup_samples: list[str] = field(default_factory=list)
    differing: list[str] = field(default_factory=list)  # objects unlike the clean run's
    pairs_identical: bool = False
    train_ok: bool = False
    evaluate_ok: bool = False
    requeued: dict[str, int] = field(default_factory=dict)  # XADDs beyond the first enqueue
    redelivered: list[str] = field(default_factory=list)  # tasks seen claimed twice or more
    problems: list[str] = field(default_factory=list)  # anything else that is wrong
    events: list[dict[str, Any]] = field(default_factory=list)
    worker_exits: dict[str, int] = field(default_factory=dict)
    stage_end_s: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return (
            self.completed
            and not self.lost_tasks
            and not self.lost_samples
            and not self.dup_tasks
            and not self.dup_samples
            and not self.differing
            and self.pairs_identical
            and self.train_ok
            and self.evaluate_ok
            and not self.problems
            and self.error is None
        )

    def summary(self) -> str:
        return json.dumps(asdict(self), indent=1, default=str)[:6000]


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
        proc = Proc.of(p.pid, "controller") or Proc(p.pid, -1, "controller")
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
        proc = Proc.of(p.pid, "worker", stage) or Proc(p.pid, -1, "worker", stage)
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
            if not ctl.alive():
                continue
            for pid in descendants(ctl.pid):
                if pid in self.procs and self.procs[pid].alive():
                    continue
                argv = cmdline(pid)
                if "worker" not in argv:
                    continue
                stage = argv[argv.index("--stage") + 1] if "--stage" in argv else None
                if (proc := Proc.of(pid, "worker", stage)) is not None:
                    self.procs[pid] = proc

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


# ------------------------------------------------------------------------ the faults

Fault = Callable[..., None]  # (trial, rng, ref, stage=None)


def fault_none(trial: Trial, rng: random.Random, ref: Reference, stage: str | None = None) -> None:
    """The clean run."""


def fault_sigkill(
    trial: Trial, rng: random.Random, ref: Reference, stage: str | None = None
) -> None:
    """In every stage (or only `stage`): SIGKILL a random worker holding a task, at a
    random moment inside the task."""
    for st in [stage] if stage else STAGES:
        in_flight = trial.random_moment(st, rng, ref)
        if not in_flight:
            workers = trial.workers(st)
            if not workers:
                trial.events.append({"event": "missed", "fault": "sigkill", "stage": st})
                continue
            victim, lease = rng.choice(workers), None
        else:
            lease, victim = rng.choice(in_flight)
        killed = trial.kill(victim, signal.SIGKILL)
        # a task whose marker is there right after the kill had finished before it
        mid_task = lease is not None and not trial.marked(st, lease.shard)
        trial.events.append(
            {
                "event": "sigkill",
                "stage": st,
                "pid": victim.pid,
                "killed": killed,
                "task": lease.task_id if lease else None,
                "mid_task": mid_task,
                "t": trial.now(),
            }
        )


def fault_controller(
    trial: Trial, rng: random.Random, ref: Reference, stage: str | None = None
) -> None:
    """SIGKILL `mia-dpo run` during a random stage; start it again, same run id."""
    stage = stage or rng.choice(STAGES)
    in_flight = trial.random_moment(stage, rng, ref)
    with trial._lock:
        if trial.launcher == "local":
            trial._track_local()
        _, ctl = trial.controllers[-1]
        workers = [p for p in trial.procs.values() if p.alive()]
        for w in workers:  # its local launcher's temp config folder, left behind
            argv = cmdline(w.pid)
            if "--config" in argv:
                trial.leftover_dirs.add(Path(argv[argv.index("--config") + 1]).parent)
        killed = trial.kill(ctl, signal.SIGKILL)
        trial.controller.wait(30)
    # The old controller's workers are orphans now: they go on with their stage until
    # the new controller closes it, then exit 0 by themselves (checked by settle()).
    trial.orphans += workers
    time.sleep(rng.uniform(0.2, 3.0))
    new = trial.start_controller()
    trial.events.append(
        {
            "event": "controller_sigkill",
            "stage": stage,
            "killed": killed,
            "mid_task": bool(in_flight),
            "orphaned_workers": len(workers),
            "new_pid": new.pid,
            "t": trial.now(),
        }
    )


def fault_redis(
    trial: Trial,
    rng: random.Random,
    ref: Reference,
    stage: str | None = None,
    hard: bool | None = None,
    down: float | None = None,
) -> None:
    """Take redis-server down during a random stage (SIGKILL or SIGTERM, at random),
    bring it back on its append-only file after 0.5-6 s (a lease is 3 s)."""
    stage = stage or rng.choice(STAGES)
    in_flight = trial.random_moment(stage, rng, ref)
    hard = rng.random() < 0.5 if hard is None else hard
    down = rng.uniform(0.5, 6.0) if down is None else down
    t0 = time.monotonic()
    trial.lab.redis.halt(hard=hard)
    time.sleep(down)
    trial.lab.redis.resume()
    trial.events.append(
        {
            "event": "redis_restart",
            "stage": stage,
            "hard": hard,
            "mid_task": bool(in_flight),
            "down_s": round(time.monotonic() - t0, 2),
            "t": trial.now(),
        }
    )


def fault_s3(
    trial: Trial,
    rng: random.Random,
    ref: Reference,
    stage: str | None = None,
    down: float = 10.0,
) -> None:
    """Stop the S3 server during a random stage; keep it down >= `down` seconds; start it
    again on the same ports and data."""
    stage = stage or rng.choice(STAGES)
    in_flight = trial.random_moment(stage, rng, ref)
    trial.lab.s3.halt()
    t_down = time.monotonic()
    time.sleep(down)
    trial.lab.s3.resume()
    trial.events.append(
        {
            "event": "s3_outage",
            "stage": stage,
            "mid_task": bool(in_flight),
            "down_s": round(time.monotonic() - t_down, 2),
            "t": trial.now(),
        }
    )


def fault_drain(trial: Trial, rng: random.Random, ref: Reference, stage: str | None = None) -> None:
    """SIGTERM every worker of a stage as a node drain does; to about half of those
    still running a task, a second SIGTERM 0.3-1.2 s later (sooner, both may reach the
    worker while its main thread is inside one long torch call, and Python runs the
    handler once). Each must exit 75 with its task finished (marker) or released
    (queued again, not leased); then replacements start."""
    if trial.launcher != "external":
        raise TrialError("the drain fault needs launcher external (the harness's workers)")
    stage = stage or rng.choice(STAGES)
    in_flight = trial.random_moment(stage, rng, ref)
    with trial._lock:
        trial.paused.add(stage)
        popens = {proc.pid: p for p, proc in trial.ext.get(stage, [])}
        victims = trial.workers(stage)
        held = {p.pid: lease for lease, p in in_flight if p in victims}
        for v in victims:
            trial.kill(v, signal.SIGTERM)
    time.sleep(rng.uniform(0.3, 1.2))
    twice = [
        v
        for v in victims
        if v.pid in held and rng.random() < 0.5 and not trial.marked(stage, held[v.pid].shard)
    ]
    for v in twice:
        v.signal(signal.SIGTERM)
    left = []
    for v in victims:  # our children: wait() says when they are really gone
        try:
            popens[v.pid].wait(900)
        except subprocess.TimeoutExpired:
            left.append(v)
    with trial._lock:
        trial._supervise_exits()
    rcs = {v.pid: popens[v.pid].returncode for v in victims}
    # where did each held task go?
    pending = {lease.task_id for lease in trial.leases(stage)}
    live = trial.r.hgetall(trial.key(stage, "live"))
    detail = []
    for v in victims:
        lease = held.get(v.pid)
        fate = None
        if lease is not None:
            if trial.marked(stage, lease.shard):
                fate = "finished"
            elif lease.task_id in live and lease.task_id not in pending:
                fate = "released"
            else:
                fate = "neither"
        detail.append(
            {
                "pid": v.pid,
                "twice": v in twice,
                "task": lease.task_id if lease else None,
                "fate": fate,
                "rc": rcs.get(v.pid),
            }
        )
    with trial._lock:
        trial.paused.discard(stage)
    fates = Counter(d["fate"] for d in detail if d["task"])
    trial.events.append(
        {
            "event": "drain",
            "stage": stage,
            "workers": len(victims),
            "twice": len(twice),
            "held": len(held),
            "finished": fates["finished"],
            "released": fates["released"],
            "exit_codes": sorted(Counter(d["rc"] for d in detail).items(), key=str),
            # killed by the signal's default action (see tests/faults/README.md): while
            # still starting, before the handlers are installed (it held no task), or by
            # the second signal while exiting after its task was finished
            "killed_starting": sum(d["rc"] == -signal.SIGTERM and not d["task"] for d in detail),
            "killed_exiting": sum(
                d["rc"] == -signal.SIGTERM and d["fate"] == "finished" for d in detail
            ),
            "victims": detail,
            "still_running": [p.pid for p in left],
            "t": trial.now(),
        }
    )


FAULTS: dict[str, tuple[Fault, str | None]] = {
    # name: (injector, the launcher it needs; None: either)
    "none": (fault_none, None),
    "sigkill": (fault_sigkill, None),
    "controller": (fault_controller, "local"),
    "redis": (fault_redis, None),
    "s3": (fault_s3, None),
    "drain": (fault_drain, "external"),
}

# A schedule: (fault, stage, options) steps, run in the pipeline order of their stages;
# stage None: a sigkill in every stage, any other fault in a random stage.
Step = tuple[str, str | None, dict[str, Any]]


def expand(schedule: list[Step], rng: random.Random) -> list[tuple[str, str, dict[str, Any]]]:
    steps: list[tuple[str, str, dict[str, Any]]] = []
    for fault, stage, opts in schedule:
        if stage is not None:
            steps.append((fault, stage, opts))
        elif fault == "sigkill":
            steps += [(fault, s, opts) for s in STAGES]
        elif fault != "none":
            steps.append((fault, rng.choice(STAGES), opts))
    return sorted(steps, key=lambda step: STAGES.index(step[1]))


def launcher_for(schedule: list[Step], default: str = "local") -> str:
    needs = {FAULTS[f][1] for f, _, _ in schedule} - {None}
    if len(needs) > 1:
        raise ValueError(f"faults {schedule} need different launchers {needs}")
    return needs.pop() if needs else default


# ------------------------------------------------------------------------ the audit


def _rows(lab: Lab, key: str) -> list[dict[str, Any]]:
    try:
        return [json.loads(x) for x in lab.store.get_jsonl(key)]
    except NotFound:
        return []


def _multiset_diff(expected: list[str], got: list[str], what: str, out: Outcome) -> None:
    exp, have = Counter(expected), Counter(got)
    out.lost_samples += [f"{what}:{k}" for k, n in (exp - have).items() for _ in range(n)]
    out.dup_samples += [f"{what}:{k}" for k, n in (have - exp).items() for _ in range(n)]


def audit(lab: Lab, ref: Reference, out: Outcome) -> Outcome:
    """Count lost and duplicated work of out.run_id from the store and Redis."""
    run_id = out.run_id
    objs = _objects(lab, run_id)
    prefix = layout.run_prefix(run_id)

    # 1. every stage finished, with no dead shards
    for stage in STAGES:
        if f"{stage}/_SUCCESS" not in objs:
            out.problems.append(f"{stage}: no _SUCCESS")
        dead = _rows_json(lab, layout.dead_key(run_id, stage))
        for d in dead or []:
            out.lost_tasks.append(f"{d.get('task_id')} (dead letter)")
    out.completed = out.rc == 0 and all(f"{s}/_SUCCESS" in objs for s in STAGES)

    # 2. every shard of every stage has its marker and outputs
    for stage in STAGES:
        for i in ref.shards[stage]:
            name = f"{stage}/shard-{i:05d}"
            need = [".done"] + ([".jsonl", ".dropped.jsonl"] if stage != "evaluate" else [])
            if any(name + suffix not in objs for suffix in need):
                out.lost_tasks.append(f"{run_id}/{stage}/{i:05d}")
        extra = [
            rel for rel in objs if rel.startswith(f"{stage}/shard-") and rel.endswith(".done")
            and int(rel.rsplit("shard-", 1)[1][:-5]) not in ref.shards[stage]
        ]  # fmt: skip
        out.dup_tasks += [f"{stage}: unexpected {rel}" for rel in extra]

    # 3. outputs identical to the clean run's
    for rel, want in ref.files.items():
        if rel not in objs:
            continue  # counted as lost above (or a plan file: below)
        got = _norm(lab.store.get_bytes(prefix + rel), run_id)
        if got != want:
            out.differing.append(rel)
    for rel, etag in ref.etags.items():
        if objs.get(rel) != etag:
            out.differing.append(rel)
    missing_plan = [rel for rel in ref.files if rel.startswith("plan/") and rel not in objs]
    out.lost_tasks += [f"plan file {rel}" for rel in missing_plan]
    pairs = ("select/pairs.jsonl", "select/pairs.trl.jsonl")
    out.pairs_identical = all(rel in objs and rel not in out.differing for rel in pairs)
    # a shard with outputs unlike the clean run's was (re)done with another result
    for rel in out.differing:
        stage, _, name = rel.partition("/")
        if name.startswith("shard-"):
            out.dup_tasks.append(f"{run_id}/{stage}/{name[6:11]} (outputs differ)")

    # 4. sample ids through the stages: planned -> augment -> generate -> score -> pairs
    planned = [
        str(r["raw"]["id"])
        for i in ref.shards["augment"]
        for r in _rows(lab, layout.shard_key(run_id, "plan", i))
    ]
    aug_src, aug_ids, gen_ids, gen_expected, score_ids = [], [], [], [], []
    drops: dict[str, list[str]] = {s: [] for s in SHARDED}
    for stage in SHARDED:
        for i in ref.shards[stage]:
            drops[stage] += [str(d["id"]) for d in _rows(lab, layout.dropped_key(run_id, stage, i))]
    for i in ref.shards["augment"]:
        for r in _rows(lab, layout.shard_key(run_id, "augment", i)):
            aug_src.append(str(r["source_id"]))
            aug_ids.append(r["sample_id"])
    for i in ref.shards["generate"]:
        for r in _rows(lab, layout.shard_key(run_id, "generate", i)):
            gen_ids.append(r["sample"]["sample_id"])
            gen_expected += [f"{r['sample']['sample_id']}-r{k}" for k in range(len(r["responses"]))]
    for i in ref.shards["score"]:
        for r in _rows(lab, layout.shard_key(run_id, "score", i)):
            score_ids.append(f"{r['sample']['sample_id']}-r{r['response_index']}")
    _multiset_diff(planned, aug_src + drops["augment"], "augment", out)
    _multiset_diff(aug_ids, gen_ids + drops["generate"], "generate", out)
    _multiset_diff(gen_expected, score_ids, "score", out)
    pair_ids = [str(r["id"]) for r in _rows(lab, f"{prefix}select/pairs.jsonl")]
    out.dup_samples += [f"select:{k}" for k, n in Counter(pair_ids).items() for _ in range(n - 1)]

    # 5. training and evaluation finished and left their outputs
    meta = _rows_json(lab, f"{prefix}train/metadata.json")
    out.train_ok = (
        isinstance(meta, dict)
        and meta.get("steps", 0) > 0
        and "train/adapter/adapter_config.json" in objs
        and any(rel.startswith("train/adapter/adapter_model") for rel in objs)
    )
    report = _rows_json(lab, f"{prefix}evaluate/report.json")
    out.evaluate_ok = isinstance(report, dict) and set(report.get("models", {})) == {
        "base",
        "adapted",
    }

    # 6. the queue: every task acked, nothing queued or leased, no dead letters
    r = lab.redis_client()
    try:
        for stage in STAGES:
            k = f"{NAMESPACE}:{run_id}:{stage}:"
            for eid, fields in r.xrange(k + "stream"):
                shard = int(fields["id"].rsplit("/", 1)[1])
                if (f"{stage}/shard-{shard:05d}.done") in objs:
                    out.dup_tasks.append(f"{fields['id']} still in the stream (entry {eid})")
                else:
                    out.lost_tasks.append(f"{fields['id']} never finished (entry {eid})")
            for tid in r.hkeys(k + "dead"):
                out.lost_tasks.append(f"{tid} dead-lettered")
            if r.hlen(k + "live") or r.hlen(k + "attempts"):
                out.problems.append(
                    f"{stage}: live {r.hkeys(k + 'live')} attempts {r.hkeys(k + 'attempts')}"
                )
            if r.hget(k + "state", "closed") != "1":
                out.problems.append(f"{stage}: queue not closed")
            if r.exists(k + "stream"):
                added = int(r.xinfo_stream(k + "stream")["entries-added"])
                out.requeued[stage] = added - len(ref.shards[stage])
    finally:
        r.close()
    out.lost_tasks = sorted(set(out.lost_tasks))
    out.dup_tasks = sorted(set(out.dup_tasks))
    return out


def _rows_json(lab: Lab, key: str) -> Any:
    try:
        return lab.store.get_json(key)
    except NotFound:
        return None


# ------------------------------------------------------------------------ one trial


def run_trial(
    lab: Lab,
    ref: Reference,
    schedule: list[Step] | str,
    run_id: str,
    rng: random.Random,
    launcher: str | None = None,
    hang_guard: float = 1800.0,
) -> Outcome:
    """Run the whole pipeline under `run_id`, injecting the faults of `schedule` (or
    of one fault name: a sigkill in every stage, any other fault in a random stage);
    then audit the run against the clean one."""
    if isinstance(schedule, str):
        schedule = [(schedule, None, {})]
    launcher = launcher or launcher_for(schedule)
    steps = expand(schedule, rng)
    name = "+".join(dict.fromkeys(f for f, _, _ in schedule))
    out = Outcome(run_id=run_id, fault=name, launcher=launcher)
    trial = Trial(lab, run_id, launcher)
    t0 = time.monotonic()
    try:
        trial.start()
        for fault, stage, opts in steps:
            FAULTS[fault][0](trial, rng, ref, stage=stage, **opts)
        out.rc = trial.wait(hang_guard)
        trial.settle()
    except TrialError as e:
        out.error = str(e)
    finally:
        trial.cleanup()
        _remove_launcher_dirs(trial)
    out.seconds = round(time.monotonic() - t0, 1)
    out.events = trial.events
    out.worker_exits = {str(k): v for k, v in sorted(trial.exits.items())}
    out.redelivered = sorted(t for t, n in trial.deliveries.items() if n > 1)
    for ev in trial.events:
        if ev["event"] in ("worker_crash", "workers_left_running", "watcher_error"):
            out.problems.append(json.dumps(ev))
        if ev["event"] == "drain":
            for v in ev["victims"]:
                # A worker holding a task must finish or release it, then exit 75. Dying
                # of the signal is a known flaw of the exit code only (README.md) when it
                # held nothing (still starting) or had finished its task (exiting).
                excused = not v["task"] or (v["twice"] and v["fate"] == "finished")
                ok_rc = (EXIT_STOPPED, -signal.SIGTERM) if excused else (EXIT_STOPPED,)
                if v["fate"] == "neither" or v["rc"] not in ok_rc:
                    out.problems.append(f"drain: {json.dumps(v)}")
            if ev["still_running"]:
                out.problems.append(f"drain: workers still running {ev['still_running']}")
    if out.error is None:
        audit(lab, ref, out)
        out.stage_end_s = stage_ends(lab, run_id, trial.wall0)
    return out


def stage_ends(lab: Lab, run_id: str, wall0: float) -> dict[str, float]:
    """When each stage's _SUCCESS was written, in seconds from the trial's start."""
    ends = {}
    for stage in STAGES:
        marker = _rows_json(lab, layout.stage_done_key(run_id, stage))
        if isinstance(marker, dict) and "at" in marker:
            ends[stage] = round(marker["at"] - wall0, 1)
    return ends


def _remove_launcher_dirs(trial: Trial) -> None:
    """A SIGKILLed controller cannot remove its local launcher's temp config folder
    (found on its workers' command lines when it was killed)."""
    for folder in trial.leftover_dirs:
        if folder.name.startswith("mia-dpo-launcher-"):
            shutil.rmtree(folder, ignore_errors=True)


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


@contextlib.contextmanager
def lab_session(root: Path, model_dir: Path, spec: LabSpec | None = None) -> Iterator[Lab]:
    lab = Lab(root, model_dir, spec)
    with lab:
        yield lab
