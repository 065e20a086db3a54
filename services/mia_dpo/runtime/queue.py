"""Task queues: one interface, an in-process backend and a Redis backend.

Semantics every backend keeps (the tests run the same suite on both):
- at-least-once: a claimed task is held under a lease, never only in a worker's
  memory; a lease not renewed within `lease_seconds` is reclaimed by another worker;
- each claim counts an attempt; a task claimed more than `max_attempts` times, or
  failing on its last attempt, moves to the dead-letter set with its error;
- enqueue is idempotent per task id while the task is live (queued or leased);
- a stage is opened, then closed by the controller once every shard is accounted
  for; workers exit when their stage is closed and nothing is left to claim.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from pydantic import BaseModel

from mia_dpo.config import QueueConfig


@dataclass
class Lease:
    task_json: str
    task_id: str
    attempt: int
    consumer: str
    handle: str  # backend-specific: the stream entry id, or the memory token
    lost: bool = field(default=False)


class DeadLetter(BaseModel):
    task_id: str
    task: str
    attempts: int
    error: str
    traceback: str = ""
    at: float


class QueueCounts(BaseModel):
    queued: int
    leased: int
    dead: int
    opened: bool
    closed: bool


class Queue(ABC):
    def __init__(self, cfg: QueueConfig) -> None:
        self.cfg = cfg

    @abstractmethod
    def open_stage(self, run_id: str, stage: str) -> None: ...

    @abstractmethod
    def close_stage(self, run_id: str, stage: str) -> None: ...

    @abstractmethod
    def enqueue(self, run_id: str, stage: str, tasks: list[tuple[str, str]]) -> int:
        """tasks: (task_id, task_json). Returns how many were newly queued."""

    @abstractmethod
    def claim(self, run_id: str, stage: str, consumer: str) -> Lease | None:
        """Reclaim an expired lease or take the next queued task; None when idle."""

    @abstractmethod
    def heartbeat(self, run_id: str, stage: str, lease: Lease) -> bool:
        """Renew the lease; False when it was lost to another worker."""

    @abstractmethod
    def ack(self, run_id: str, stage: str, lease: Lease) -> bool:
        """The task is done; False when the lease had been lost meanwhile."""

    @abstractmethod
    def fail(
        self, run_id: str, stage: str, lease: Lease, error: str, tb: str, final: bool = False
    ) -> str:
        """The task raised: 'retry' (queued again), 'dead' (dead-lettered; at once when
        final, e.g. a malformed message) or 'lost' (the lease had expired)."""

    @abstractmethod
    def release(self, run_id: str, stage: str, lease: Lease) -> None:
        """Give the task back without counting the attempt (graceful shutdown)."""

    @abstractmethod
    def counts(self, run_id: str, stage: str) -> QueueCounts: ...

    @abstractmethod
    def dead_letters(self, run_id: str, stage: str) -> list[DeadLetter]: ...

    @abstractmethod
    def requeue_dead(self, run_id: str, stage: str) -> int:
        """Move dead-lettered tasks back to the queue with a fresh attempt count."""

    @abstractmethod
    def discard(self, run_id: str, stage: str, task_ids: list[str]) -> int:
        """Forget these tasks, queued or leased (their shards are done; a worker still
        holding one finds its lease lost). Returns how many were found."""

    def wait_for_work(
        self, run_id: str, stage: str, consumer: str, stop: threading.Event
    ) -> Lease | None:
        """claim(), polling with backoff up to poll_seconds until work or stop or closed."""
        delay = 0.02
        while not stop.is_set():
            lease = self.claim(run_id, stage, consumer)
            if lease is not None:
                return lease
            c = self.counts(run_id, stage)
            if c.closed and c.queued == 0 and c.leased == 0:
                return None
            stop.wait(delay)
            delay = min(delay * 2, self.cfg.poll_seconds)
        return None


@dataclass
class _MemStage:
    opened: bool = False
    closed: bool = False
    ready: list[str] = field(default_factory=list)  # task ids, FIFO
    tasks: dict[str, str] = field(default_factory=dict)  # live task id -> json
    attempts: dict[str, int] = field(default_factory=dict)
    leases: dict[str, tuple[str, float, str]] = field(
        default_factory=dict
    )  # id -> (consumer, expiry, token)
    dead: dict[str, DeadLetter] = field(default_factory=dict)


class MemoryQueue(Queue):
    """In-process queue for the embedded default: same semantics, one process."""

    def __init__(self, cfg: QueueConfig) -> None:
        super().__init__(cfg)
        self._lock = threading.Lock()
        self._stages: dict[tuple[str, str], _MemStage] = {}
        self._tokens = 0

    def _st(self, run_id: str, stage: str) -> _MemStage:
        return self._stages.setdefault((run_id, stage), _MemStage())

    def open_stage(self, run_id: str, stage: str) -> None:
        with self._lock:
            st = self._st(run_id, stage)
            st.opened, st.closed = True, False

    def close_stage(self, run_id: str, stage: str) -> None:
        with self._lock:
            self._st(run_id, stage).closed = True

    def enqueue(self, run_id: str, stage: str, tasks: list[tuple[str, str]]) -> int:
        added = 0
        with self._lock:
            st = self._st(run_id, stage)
            for task_id, body in tasks:
                if task_id in st.tasks or task_id in st.dead:
                    continue
                st.tasks[task_id] = body
                st.ready.append(task_id)
                added += 1
        return added

    def _dead(self, st: _MemStage, task_id: str, error: str, tb: str) -> None:
        st.dead[task_id] = DeadLetter(
            task_id=task_id,
            task=st.tasks.pop(task_id),
            attempts=st.attempts.get(task_id, 0),
            error=error,
            traceback=tb,
            at=time.time(),
        )
        st.leases.pop(task_id, None)

    def claim(self, run_id: str, stage: str, consumer: str) -> Lease | None:
        now = time.monotonic()
        with self._lock:
            st = self._st(run_id, stage)
            task_id = None
            for tid, (_owner, expiry, _tok) in list(st.leases.items()):
                if expiry <= now:
                    st.leases.pop(tid)
                    if st.attempts[tid] >= self.cfg.max_attempts:
                        self._dead(
                            st, tid, f"lease expired {st.attempts[tid]} times (worker lost)", ""
                        )
                        continue
                    task_id = tid
                    break
            if task_id is None:
                if not st.ready:
                    return None
                task_id = st.ready.pop(0)
            st.attempts[task_id] = st.attempts.get(task_id, 0) + 1
            self._tokens += 1
            token = str(self._tokens)
            st.leases[task_id] = (consumer, now + self.cfg.lease_seconds, token)
            return Lease(st.tasks[task_id], task_id, st.attempts[task_id], consumer, token)

    def _owned(self, st: _MemStage, lease: Lease) -> bool:
        held = st.leases.get(lease.task_id)
        return held is not None and held[2] == lease.handle

    def heartbeat(self, run_id: str, stage: str, lease: Lease) -> bool:
        with self._lock:
            st = self._st(run_id, stage)
            if not self._owned(st, lease):
                return False
            st.leases[lease.task_id] = (
                lease.consumer,
                time.monotonic() + self.cfg.lease_seconds,
                lease.handle,
            )
            return True

    def ack(self, run_id: str, stage: str, lease: Lease) -> bool:
        with self._lock:
            st = self._st(run_id, stage)
            if not self._owned(st, lease):
                return False
            st.leases.pop(lease.task_id)
            st.tasks.pop(lease.task_id)
            st.attempts.pop(lease.task_id, None)
            return True

    def fail(
        self, run_id: str, stage: str, lease: Lease, error: str, tb: str, final: bool = False
    ) -> str:
        with self._lock:
            st = self._st(run_id, stage)
            if not self._owned(st, lease):
                return "lost"
            if final or st.attempts[lease.task_id] >= self.cfg.max_attempts:
                self._dead(st, lease.task_id, error, tb)
                return "dead"
            st.leases.pop(lease.task_id)
            st.ready.append(lease.task_id)
            return "retry"

    def release(self, run_id: str, stage: str, lease: Lease) -> None:
        with self._lock:
            st = self._st(run_id, stage)
            if self._owned(st, lease):
                st.leases.pop(lease.task_id)
                st.attempts[lease.task_id] -= 1
                st.ready.insert(0, lease.task_id)

    def counts(self, run_id: str, stage: str) -> QueueCounts:
        with self._lock:
            st = self._st(run_id, stage)
            return QueueCounts(
                queued=len(st.ready),
                leased=len(st.leases),
                dead=len(st.dead),
                opened=st.opened,
                closed=st.closed,
            )

    def dead_letters(self, run_id: str, stage: str) -> list[DeadLetter]:
        with self._lock:
            return list(self._st(run_id, stage).dead.values())

    def requeue_dead(self, run_id: str, stage: str) -> int:
        with self._lock:
            st = self._st(run_id, stage)
            n = len(st.dead)
            for task_id, d in st.dead.items():
                st.tasks[task_id] = d.task
                st.attempts.pop(task_id, None)
                st.ready.append(task_id)
            st.dead.clear()
            return n

    def discard(self, run_id: str, stage: str, task_ids: list[str]) -> int:
        with self._lock:
            st = self._st(run_id, stage)
            found = 0
            for task_id in task_ids:
                if st.tasks.pop(task_id, None) is None:
                    continue
                found += 1
                st.leases.pop(task_id, None)
                st.attempts.pop(task_id, None)
                if task_id in st.ready:
                    st.ready.remove(task_id)
            return found
