"""The stage contract: run(task, ctx) -> ShardStats.

The runtime defines the contract and never imports a stage: the composition root
(the CLI) hands the worker a `StageResolver` that maps a stage name to its function.

A stage reads its inputs and writes its outputs only through `ctx.store` (and
reads user images through `ctx.blobs`); it never imports redis, minio or
kubernetes. Outputs go to deterministic keys, so a redelivered task overwrites
what a crashed attempt left behind. The worker writes the marker, not the stage.
"""

from __future__ import annotations

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
# Stage name -> its function; raises ValueError for an unknown name.
StageResolver = Callable[[str], StageFn]


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
