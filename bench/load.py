"""The Redis queue under load: many small tasks, worker processes, exactly-once check.

    .venv/bin/python bench/load.py [--tasks 10000] [--workers 1 4] [--lease-seconds 60]

A real redis-server (tests/servers, a free loopback port, stopped by PID). For each
worker count, on a fresh run id, the harness plays the controller: it stores the run
config, opens the stage, enqueues N tasks with RedisQueue.enqueue, starts the worker
PROCESSES, waits until every task has its marker in the store, then closes the stage.
Each worker process (bench/load_worker.py) is the runtime's own `Worker` (claim through
the Lua script, skip if marked, heartbeat thread, stage, marker, ack) on a LocalStore;
the only substitute is the stage function: a trivial one, handed to the Worker as its
`stage_fn`, that writes a one-line result.

Checked afterwards: every task ran once, was acked once (the ack script answered
'ok'), and has one marker; nothing is lost, duplicated or dead-lettered; the stream,
its pending list (PEL) and the live / attempts hashes are empty.

Reported, side by side for each worker count and as a ratio to the first:
- tasks/s, from the moment all workers are started and ready to the last ack
  (interpreter start-up and imports excluded);
- Redis commands per task from `INFO commandstats` deltas: every command Redis ran,
  including those inside the Lua scripts (EVALSHA is the client's call, XAUTOCLAIM,
  XREADGROUP, XACK ... run inside it), harness commands (INFO, close_stage) excluded;
- Redis's time in the scripts per task (EVALSHA's usec in `INFO commandstats`);
- client requests (round trips) per task, counted in the workers' redis client, and
  the queue calls per task (claim, ack, heartbeat, counts).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # bench.load_worker, tests.servers

from bench.load_worker import STAGE, run_config, worker_main  # noqa: E402

WORKER = REPO / "bench" / "load_worker.py"
RUN_PREFIX = "load"

# -------------------------------------------------------------------- harness side


@dataclass
class LoadResult:
    n_tasks: int
    n_workers: int
    seconds: float
    workers: list[dict[str, Any]]
    redis: dict[str, int]  # command -> calls during the run (harness commands excluded)
    script_usec: int  # Redis's time in the Lua scripts (EVALSHA's usec) during the run
    executions: Counter[str]  # task id -> stage runs
    acks: Counter[str]  # task id -> acks that the ack script answered 'ok'
    lost_acks: list[str]
    failures: list[str]
    markers: int
    expected: set[str] = field(repr=False)
    queue_after: dict[str, int] = field(default_factory=dict)

    @property
    def tasks_per_second(self) -> float:
        return self.n_tasks / self.seconds if self.seconds > 0 else float("inf")

    @property
    def redis_commands(self) -> int:
        return sum(self.redis.values())

    def client(self, key: str) -> int:
        """Requests or commands the workers' redis clients sent."""
        return sum(int(w[key]) for w in self.workers)

    def calls(self, name: str) -> int:
        return sum(int(w["calls"].get(name, 0)) for w in self.workers)

    def problems(self) -> list[str]:
        """Everything that breaks exactly-once; empty when the run was clean."""
        out = []

        def few(ids: Any) -> str:
            ids = sorted(ids)
            return ", ".join(ids[:5]) + (f" (+{len(ids) - 5})" if len(ids) > 5 else "")

        for what, seen in (("acked", self.acks), ("run", self.executions)):
            missing = self.expected - set(seen)
            twice = {t for t, n in seen.items() if n > 1}
            extra = set(seen) - self.expected
            if missing:
                out.append(f"{len(missing)} tasks never {what}: {few(missing)}")
            if twice:
                out.append(f"{len(twice)} tasks {what} more than once: {few(twice)}")
            if extra:
                out.append(f"{len(extra)} unknown task ids {what}: {few(extra)}")
        if self.lost_acks:
            out.append(f"{len(self.lost_acks)} acks found the lease lost: {few(self.lost_acks)}")
        if self.failures:
            out.append(f"{len(self.failures)} task failures: {self.failures[:3]}")
        if self.markers != self.n_tasks:
            out.append(f"{self.markers} markers for {self.n_tasks} tasks")
        left = {k: v for k, v in self.queue_after.items() if v}
        if left:
            out.append(f"queue not empty afterwards: {left}")
        if sum(int(w["processed"]) for w in self.workers) != self.n_tasks:
            out.append("the workers' processed counts do not add up to the tasks")
        return out


def _commandstats(r: Any) -> dict[str, int]:
    """command -> calls, and "evalsha:usec": Redis's time in the scripts."""
    stats = r.info("commandstats")
    out = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}
    out["evalsha:usec"] = int(stats.get("cmdstat_evalsha", {}).get("usec", 0))
    return out


def _markers(store_root: Path, run_id: str) -> int:
    folder = store_root / "runs" / run_id / STAGE
    try:
        with os.scandir(folder) as it:
            return sum(1 for e in it if e.name.endswith(".done"))
    except FileNotFoundError:
        return 0


def _lines(paths: list[Path]) -> list[str]:
    out: list[str] = []
    for path in paths:
        if path.is_file():
            out += [line for line in path.read_text(encoding="utf-8").splitlines() if line]
    return out


def run_load(
    redis_url: str,
    workdir: Path,
    n_tasks: int,
    n_workers: int,
    run_id: str | None = None,
    lease_seconds: float = 60.0,
) -> LoadResult:
    """Enqueue n_tasks, drain them with n_workers worker processes, verify, measure."""
    import redis as redis_lib

    from mia_dpo.controller import store_run_config
    from mia_dpo.records import Task
    from mia_dpo.runtime.redis_queue import GROUP, RedisQueue
    from mia_dpo.runtime.store import LocalStore

    run_id = run_id or f"{RUN_PREFIX}-{n_workers}w"
    store_root, logs = workdir / "store", workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cfg = run_config(redis_url, store_root, lease_seconds)
    store_run_config(LocalStore(store_root), cfg, run_id)
    queue = RedisQueue(cfg.queue)
    tasks = [Task.make(run_id, STAGE, i) for i in range(n_tasks)]
    queue.open_stage(run_id, STAGE)
    added = queue.enqueue(run_id, STAGE, [(t.task_id, t.model_dump_json()) for t in tasks])
    if added != n_tasks:
        raise RuntimeError(f"enqueued {added} of {n_tasks} tasks (run id {run_id} reused?)")

    r = redis_lib.Redis.from_url(redis_url, decode_responses=True)
    procs: list[subprocess.Popen[str]] = []
    try:
        for i in range(n_workers):
            cmd = [sys.executable, str(WORKER),
                   "--redis-url", redis_url, "--store", str(store_root), "--run-id", run_id,
                   "--logs", str(logs), "--index", str(i),
                   "--lease-seconds", str(lease_seconds)]  # fmt: skip
            with open(logs / f"worker-{i}.err", "w", encoding="utf-8") as err:
                procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                              stderr=err, text=True, cwd=REPO))  # fmt: skip
        for i, p in enumerate(procs):
            assert p.stdout is not None
            line = p.stdout.readline()
            if not line.startswith('{"ready"'):
                tail = (logs / f"worker-{i}.err").read_text(encoding="utf-8")[-2000:]
                raise RuntimeError(f"worker {i} did not start (exit {p.poll()}):\n{tail}")
        before = _commandstats(r)
        t_go = time.monotonic()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.close()
        # The controller's part: every shard marked -> close the stage -> workers drain.
        while _markers(store_root, run_id) < n_tasks:
            dead = [(i, p.returncode) for i, p in enumerate(procs) if p.poll() is not None]
            if dead:
                raise RuntimeError(f"worker exited early before the stage closed: {dead}")
            time.sleep(0.1)
        queue.close_stage(run_id, STAGE)
        workers = []
        for i, p in enumerate(procs):
            assert p.stdout is not None
            out = p.stdout.read()
            if p.wait() != 0:
                tail = (logs / f"worker-{i}.err").read_text(encoding="utf-8")[-2000:]
                raise RuntimeError(f"worker {i} exited {p.returncode}:\n{tail}")
            workers.append(json.loads(out.strip().splitlines()[-1]))
        after = _commandstats(r)
    finally:
        for p in procs:
            if p.poll() is None:  # only our own children, by their Popen handle
                p.kill()
                p.wait()

    delta = {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}
    delta.pop("info", None)  # the harness's snapshots
    script_usec = delta.pop("evalsha:usec", 0)
    delta["hset"] = delta.get("hset", 0) - 1  # the harness's close_stage
    delta = {k: n for k, n in delta.items() if n}

    ack_lines = [line.split(" ", 2) for line in _lines(sorted(logs.glob("ack-*.log")))]
    stream, live, dead, attempts = (f"{cfg.queue.namespace}:{run_id}:{STAGE}:{n}"
                                    for n in ("stream", "live", "dead", "attempts"))  # fmt: skip
    pending = r.xpending(stream, GROUP)["pending"]
    queue_after = {"pending": int(pending), "stream": r.xlen(stream), "live": r.hlen(live),
                   "dead": r.hlen(dead), "attempts": r.hlen(attempts)}  # fmt: skip
    counts = queue.counts(run_id, STAGE)
    queue_after.update(queued=counts.queued, leased=counts.leased)
    if not counts.closed:
        queue_after["not_closed"] = 1
    r.close()
    return LoadResult(
        n_tasks=n_tasks,
        n_workers=n_workers,
        seconds=max(float(w["last_ack"]) for w in workers) - t_go,
        workers=workers,
        redis=delta,
        script_usec=script_usec,
        executions=Counter(_lines(sorted(logs.glob("exec-*.log")))),
        acks=Counter(parts[1] for parts in ack_lines if parts[0] == "ack"),
        lost_acks=[parts[1] for parts in ack_lines if parts[0] == "lost"],
        failures=[" ".join(parts[1:]) for parts in ack_lines if parts[0] == "fail"],
        markers=_markers(store_root, run_id),
        expected={t.task_id for t in tasks},
        queue_after=queue_after,
    )


# --------------------------------------------------------------------------- report


def format_report(results: list[LoadResult]) -> str:
    base = results[0]
    head = ["", *[f"{r.n_workers} worker{'s' * (r.n_workers > 1)}" for r in results]]
    head += [f"{r.n_workers}w / {base.n_workers}w" for r in results[1:]]
    rows: list[list[str]] = [head]

    def row(name: str, values: list[float], fmt: str, ratio: bool = False) -> None:
        cells = [format(v, fmt) for v in values]
        ratios = [f"{v / values[0]:.2f}x" if ratio and values[0] else "" for v in values[1:]]
        rows.append([name, *cells, *ratios])

    def per_task(count: Any) -> list[float]:
        return [count(r) / r.n_tasks for r in results]

    row("tasks", [r.n_tasks for r in results], ",d")
    row("seconds (go -> last ack)", [r.seconds for r in results], ".2f", ratio=True)
    row("tasks/s", [r.tasks_per_second for r in results], ",.0f", ratio=True)
    rows.append(["exactly once, 0 pending", *["NO" if r.problems() else "yes" for r in results]])
    row("Redis commands / task (incl. in scripts)", per_task(lambda r: r.redis_commands), ".2f",
        ratio=True)  # fmt: skip
    row("client requests / task (round trips)", per_task(lambda r: r.client("requests")), ".2f",
        ratio=True)  # fmt: skip
    row("Redis time in scripts / task (us)", per_task(lambda r: r.script_usec), ".1f")
    for call in ("claim", "claim_empty", "ack", "heartbeat", "counts"):
        row(f"  queue.{call} / task", per_task(lambda r, c=call: r.calls(c)), ".3f")
    rows.append(["Redis commands / task, by command"])
    totals = Counter[str]()
    for r in results:
        totals.update(r.redis)
    for cmd, _ in totals.most_common():
        row(f"  {cmd.upper()}", per_task(lambda r, c=cmd: r.redis.get(c, 0)), ".3f")
    width = max(map(len, rows))
    rows = [r + [""] * (width - len(r)) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(width)]
    lines = []
    for r in rows:
        cells = [r[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        return worker_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=10_000)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 4])
    p.add_argument("--lease-seconds", type=float, default=60.0)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)

    from tests.servers import RedisServer

    results: list[LoadResult] = []
    with tempfile.TemporaryDirectory(prefix="mia-load-") as tmp:
        server = RedisServer().start(Path(tmp) / "redis")
        try:
            version = server.client().info("server")["redis_version"]
            for n in args.workers:
                result = run_load(server.url, Path(tmp) / f"w{n}", args.tasks, n,
                                  lease_seconds=args.lease_seconds)  # fmt: skip
                print(f"{n} worker(s): {result.tasks_per_second:,.0f} tasks/s, "
                      f"problems: {result.problems() or 'none'}", flush=True)  # fmt: skip
                results.append(result)
        finally:
            server.stop()
    print()
    print(f"Redis queue load: {args.tasks:,} tasks, redis-server {version}, "
          f"{os.cpu_count()} CPUs, lease {args.lease_seconds:g} s")  # fmt: skip
    print(format_report(results))
    if args.json:
        args.json.write_text(json.dumps([
            {"workers": r.n_workers, "tasks": r.n_tasks, "seconds": r.seconds,
             "tasks_per_second": r.tasks_per_second, "redis_commands": r.redis,
             "redis_script_usec": r.script_usec,
             "client_requests": r.client("requests"), "client_commands": r.client("commands"),
             "queue_calls": {c: r.calls(c) for c in ("claim", "claim_empty", "ack",
                                                      "heartbeat", "counts")},
             "problems": r.problems()} for r in results], indent=1) + "\n")  # fmt: skip
    return 1 if any(r.problems() for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
