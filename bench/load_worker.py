"""One worker process of the Redis queue load benchmark (bench/load.py starts them).

    python bench/load_worker.py --redis-url URL --store DIR --run-id ID --logs DIR \
        --index N --lease-seconds S

(`bench/load.py worker ...` runs the same.) It builds the runtime's own `Worker` on a
LocalStore with the real RedisQueue, counting the queue calls and the redis client's
requests; the only substitute is the stage function, `noop_shard`. Protocol with the
harness: print `{"ready": pid}` once set up, wait for a line ("go") on stdin, run until
the stage is closed and drained, then print one JSON summary line. Every stage run
goes to logs/exec-N.log and every ack's outcome to logs/ack-N.log, one task a line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

# Task.stage must be one of the pipeline's stages: the worker processes run this name,
# with the stage function replaced by `noop_shard` in their registry.
STAGE = "augment"

_exec_log: Any = None  # the worker process's log of stage runs (one task id a line)


def noop_shard(task: Any, ctx: Any) -> Any:
    """A trivial stage: one small result per task, through the store like a real one."""
    from mia_dpo.records import ShardStats
    from mia_dpo.runtime import layout

    ctx.store.put_text(layout.shard_key(task.run_id, task.stage, task.shard), task.task_id + "\n")
    _exec_log.write(task.task_id + "\n")
    _exec_log.flush()
    return ShardStats(stage=task.stage, shard=task.shard, total=1, kept=1)


def _count_redis_requests() -> dict[str, int]:
    """Patch redis-py in this process to count requests (round trips) and the commands
    they carry: a single command is one of each, a pipeline one request of N commands."""
    import redis
    import redis.client

    counts = {"requests": 0, "commands": 0}
    single = redis.Redis.execute_command
    pipelined = redis.client.Pipeline.execute

    def execute_command(self: Any, *args: Any, **options: Any) -> Any:
        counts["requests"] += 1
        counts["commands"] += 1
        return single(self, *args, **options)

    def execute(self: Any, raise_on_error: bool = True) -> Any:
        if self.command_stack:
            counts["requests"] += 1
            counts["commands"] += len(self.command_stack)
        return pipelined(self, raise_on_error)

    redis.Redis.execute_command = execute_command  # type: ignore[method-assign]
    redis.client.Pipeline.execute = execute  # type: ignore[method-assign]
    return counts


def _counting_queue(cfg: Any, ack_log: Any) -> Any:
    """The real RedisQueue, logging each ack's outcome and counting the queue calls."""
    from mia_dpo.runtime.redis_queue import RedisQueue

    class CountingQueue(RedisQueue):
        def __init__(self) -> None:
            super().__init__(cfg)
            self.calls: Counter[str] = Counter()
            self.last_ack = 0.0
            self._lock = threading.Lock()  # the heartbeat runs in its own thread

        def _count(self, name: str) -> None:
            with self._lock:
                self.calls[name] += 1

        def claim(self, run_id: str, stage: str, consumer: str) -> Any:
            lease = super().claim(run_id, stage, consumer)
            self._count("claim" if lease else "claim_empty")
            return lease

        def heartbeat(self, run_id: str, stage: str, lease: Any) -> bool:
            self._count("heartbeat")
            return super().heartbeat(run_id, stage, lease)

        def ack(self, run_id: str, stage: str, lease: Any) -> bool:
            ok = super().ack(run_id, stage, lease)
            self._count("ack")
            self.last_ack = time.monotonic()
            ack_log.write(f"{'ack' if ok else 'lost'} {lease.task_id}\n")
            ack_log.flush()
            return ok

        def fail(self, run_id: str, stage: str, lease: Any, error: str, tb: str,
                 final: bool = False) -> str:  # fmt: skip
            self._count("fail")
            ack_log.write(f"fail {lease.task_id} {error}\n")
            ack_log.flush()
            return super().fail(run_id, stage, lease, error, tb, final)

        def release(self, run_id: str, stage: str, lease: Any) -> None:
            self._count("release")
            super().release(run_id, stage, lease)

        def counts(self, run_id: str, stage: str) -> Any:
            self._count("counts")
            return super().counts(run_id, stage)

    return CountingQueue()


def run_config(redis_url: str, store_root: Path, lease_seconds: float) -> Any:
    """The run config of the harness and of every worker: the Redis queue and a local
    store, nothing taken from the environment."""
    from mia_dpo.config import load_config

    return load_config(
        None,
        overrides={
            "stages": [STAGE],
            "queue.backend": "redis",
            "queue.url": redis_url,
            "queue.lease_seconds": lease_seconds,
            "store.backend": "local",
            "store.root": str(store_root),
        },
        environ={},
    )


def worker_main(argv: list[str]) -> int:
    """One worker process: ready -> (wait for 'go' on stdin) -> Worker.run() -> summary."""
    global _exec_log
    p = argparse.ArgumentParser(prog="load_worker.py")
    p.add_argument("--redis-url", required=True)
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--run-id", required=True)
    p.add_argument("--logs", type=Path, required=True)
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--lease-seconds", type=float, required=True)
    args = p.parse_args(argv)

    requests = _count_redis_requests()
    from mia_dpo.runtime.store import LocalStore
    from mia_dpo.runtime.worker import Worker

    cfg = run_config(args.redis_url, args.store, args.lease_seconds)
    _exec_log = open(args.logs / f"exec-{args.index}.log", "a", encoding="utf-8")  # noqa: SIM115
    ack_log = open(args.logs / f"ack-{args.index}.log", "a", encoding="utf-8")  # noqa: SIM115
    queue = _counting_queue(cfg.queue, ack_log)
    worker = Worker(cfg, args.run_id, STAGE, LocalStore(args.store), queue,
                    stage_fn=noop_shard, consumer=f"load-{args.index}-{os.getpid()}")  # fmt: skip
    worker._context()  # read the stored run config now, not on the clock
    requests.update(requests=0, commands=0)
    queue.calls.clear()
    print(json.dumps({"ready": os.getpid()}), flush=True)
    sys.stdin.readline()  # "go"
    start = time.monotonic()
    worker.run()
    summary = {
        "index": args.index,
        "pid": os.getpid(),
        "processed": worker.processed,
        "start": start,
        "last_ack": queue.last_ack,
        "requests": requests["requests"],
        "commands": requests["commands"],
        "calls": dict(queue.calls),
    }
    _exec_log.close()
    ack_log.close()
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
