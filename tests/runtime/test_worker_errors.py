"""How a worker fails a task: a configuration error (UserError) is dead-lettered at
its first attempt, any other exception is retried up to queue.max_attempts."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from mia_dpo.config import RunConfig
from mia_dpo.errors import UserError
from mia_dpo.records import ShardStats, Task
from mia_dpo.runtime import layout
from mia_dpo.runtime.context import StageContext
from mia_dpo.runtime.queue import MemoryQueue
from mia_dpo.runtime.store import LocalStore
from mia_dpo.runtime.worker import Worker


def _run(tmp_path: Path, error: Exception) -> tuple[list, int]:
    cfg = RunConfig.model_validate(
        {"store": {"root": str(tmp_path / "store")}, "queue": {"poll_seconds": 0.01}}
    )
    store, queue = LocalStore(tmp_path / "store"), MemoryQueue(cfg.queue)
    store.put_json(layout.config_key("r"), cfg.model_dump(mode="json"))
    calls = []

    def stage_fn(task: Task, ctx: StageContext) -> ShardStats:
        calls.append(task.shard)
        raise error

    queue.open_stage("r", "generate")
    task = Task.make("r", "generate", 0)
    queue.enqueue("r", "generate", [(task.task_id, task.model_dump_json())])
    queue.close_stage("r", "generate")
    worker = Worker(cfg, "r", "generate", store, queue, stage_fn=stage_fn, stop=threading.Event())
    worker.run()
    return queue.dead_letters("r", "generate"), len(calls)


@pytest.mark.parametrize(
    ("error", "attempts"),
    [(UserError("model.path: llava-next is not supported"), 1), (ValueError("flaky"), 3)],
)
def test_configuration_errors_are_not_retried(
    tmp_path: Path, error: Exception, attempts: int
) -> None:
    letters, calls = _run(tmp_path, error)
    (letter,) = letters
    assert letter.attempts == calls == attempts
    assert type(error).__name__ in letter.error
