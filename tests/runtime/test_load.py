"""The Redis queue under load (bench/load.py at CI size): 2,000 small tasks drained by 4
worker PROCESSES running the runtime's Worker (claim script, heartbeat thread, marker,
ack) against the session's real redis-server. Exactly once, nothing left pending; the
throughput is printed, never asserted."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.integration

LOAD = Path(__file__).resolve().parents[2] / "bench" / "load.py"
N_TASKS = 2_000
N_WORKERS = 4


def _load_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mia_dpo_bench_load", LOAD)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def test_every_task_acked_exactly_once(redis_url: str, tmp_path: Path) -> None:
    load = _load_module()
    result = load.run_load(redis_url, tmp_path, n_tasks=N_TASKS, n_workers=N_WORKERS)

    assert result.problems() == []
    expected = {f"{load.RUN_PREFIX}-{N_WORKERS}w/augment/{i:05d}" for i in range(N_TASKS)}
    assert result.expected == expected
    # acked exactly once (the ack script answered 'ok'), run exactly once, one marker each
    assert set(result.acks) == expected and set(result.acks.values()) == {1}
    assert set(result.executions) == expected and set(result.executions.values()) == {1}
    assert result.lost_acks == [] and result.failures == []
    assert result.markers == N_TASKS
    # the stream, its pending list and the bookkeeping hashes are empty, the stage closed
    assert result.queue_after == {"pending": 0, "stream": 0, "live": 0, "dead": 0,
                                  "attempts": 0, "queued": 0, "leased": 0}  # fmt: skip
    # four processes ran, their counts add up, and the work was shared (how evenly
    # depends on the scheduler, so only "more than one took part" is asserted)
    assert len(result.workers) == N_WORKERS
    assert len({w["pid"] for w in result.workers}) == N_WORKERS
    assert sum(w["processed"] for w in result.workers) == N_TASKS
    assert sum(w["processed"] > 0 for w in result.workers) >= 2
    assert result.calls("claim") == result.calls("ack") == N_TASKS
    # Redis did the work through the scripts: one claim and one ack script per task
    # (plus idle polls), each task read from the stream once and acked once
    assert result.redis["xreadgroup"] >= N_TASKS
    assert result.redis["xack"] == N_TASKS
    assert result.redis["evalsha"] >= 2 * N_TASKS
    print(f"\n{N_TASKS} tasks, {N_WORKERS} worker processes: {result.tasks_per_second:,.0f} "
          f"tasks/s, {result.redis_commands / N_TASKS:.2f} Redis commands/task, "
          f"{result.client('requests') / N_TASKS:.2f} client requests/task")  # fmt: skip
