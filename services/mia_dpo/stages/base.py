"""The stage contract: run(task, ctx) -> ShardStats.

A stage reads its inputs and writes its outputs only through `ctx.store` (and
reads user images through `ctx.blobs`); it never imports redis, minio or
kubernetes. Outputs go to deterministic keys, so a redelivered task overwrites
what a crashed attempt left behind. The worker writes the marker, not the stage.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from mia_dpo.config import RunConfig
from mia_dpo.records import ShardStats, Task
from mia_dpo.runtime import layout
from mia_dpo.runtime.store import BlobReader, Store


@dataclass
class StageContext:
    store: Store
    blobs: BlobReader
    config: RunConfig
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("mia_dpo.stage"))
    # Per-process memo for data every shard of a run shares (e.g. distractor pools);
    # a cache, not state: losing it only costs a re-read.
    cache: dict[str, object] = field(default_factory=dict)


StageFn = Callable[[Task, StageContext], ShardStats]

# Import paths, so a worker imports only its own stage (the augment worker has no torch).
_STAGES: dict[str, str] = {
    "augment": "mia_dpo.stages.augment:run_shard",
    "generate": "mia_dpo.stages.generate:run_shard",
    "score": "mia_dpo.stages.score:run_shard",
    "select": "mia_dpo.stages.select:run_shard",
    "train": "mia_dpo.stages.train:run_shard",
    "evaluate": "mia_dpo.stages.evaluate:run_shard",
}


def get_stage(name: str) -> StageFn:
    try:
        module, attr = _STAGES[name].split(":")
    except KeyError:
        raise ValueError(f"unknown stage {name!r} (known: {', '.join(_STAGES)})") from None
    return getattr(importlib.import_module(module), attr)


class DropLog:
    """Collects dropped samples of one shard with their reasons, for stats and the log file."""

    def __init__(self, stats: ShardStats) -> None:
        self.stats = stats
        self.rows: list[str] = []

    def drop(self, sample_id: str, reason: str, detail: str) -> None:
        self.stats.drop(reason)
        self.rows.append(json.dumps({"id": sample_id, "reason": reason, "detail": detail}))

    def write(self, store: Store, task: Task) -> None:
        store.put_jsonl(layout.dropped_key(task.run_id, task.stage, task.shard), self.rows)
