"""Opens the configured queue backend: the one place that knows every queue class."""

from __future__ import annotations

from mia_dpo.config import QueueConfig
from mia_dpo.runtime.queue import MemoryQueue, Queue
from mia_dpo.runtime.redis_queue import RedisQueue


def open_queue(cfg: QueueConfig) -> Queue:
    if cfg.backend == "redis":
        return RedisQueue(cfg)
    return MemoryQueue(cfg)
