"""One behaviour suite, run on the in-process queue and on a real redis-server."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from mia_dpo.config import QueueConfig
from mia_dpo.runtime.queue import MemoryQueue, Queue
from mia_dpo.runtime.redis_queue import RedisQueue

RUN, STAGE = "r1", "augment"


@pytest.fixture(params=["memory", "redis"])
def make_queue(request: pytest.FixtureRequest) -> Iterator:
    """Factory: make_queue(**QueueConfig fields) -> Queue; redis ones share one clean db."""
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    shared: dict[str, Queue] = {}

    def make(**kw: object) -> Queue:
        cfg = QueueConfig(backend=request.param, **({"url": url} if url else {}), **kw)
        if request.param == "redis":
            return RedisQueue(cfg)
        # memory queues are per process: hand out the same one
        return shared.setdefault("q", MemoryQueue(cfg))

    yield make


def tasks(n: int) -> list[tuple[str, str]]:
    return [(f"{RUN}/{STAGE}/{i:05d}", f'{{"shard": {i}}}') for i in range(n)]


def test_claim_ack_in_order_and_idempotent_enqueue(make_queue) -> None:
    q = make_queue()
    q.open_stage(RUN, STAGE)
    assert q.enqueue(RUN, STAGE, tasks(3)) == 3
    assert q.enqueue(RUN, STAGE, tasks(3)) == 0  # live tasks are not queued twice
    c = q.counts(RUN, STAGE)
    assert (c.queued, c.leased, c.dead, c.opened, c.closed) == (3, 0, 0, True, False)
    got = []
    while (lease := q.claim(RUN, STAGE, "w1")) is not None:
        assert lease.attempt == 1
        assert q.counts(RUN, STAGE).leased == 1
        assert q.ack(RUN, STAGE, lease)
        got.append(lease.task_id)
    assert got == [t for t, _ in tasks(3)]
    c = q.counts(RUN, STAGE)
    assert (c.queued, c.leased, c.dead) == (0, 0, 0)


def test_expired_lease_is_reclaimed_and_old_owner_cannot_ack(make_queue) -> None:
    q = make_queue(lease_seconds=0.3)
    q.open_stage(RUN, STAGE)
    q.enqueue(RUN, STAGE, tasks(1))
    first = q.claim(RUN, STAGE, "dead-worker")
    assert first is not None
    assert q.claim(RUN, STAGE, "w2") is None  # still leased
    time.sleep(0.4)
    second = q.claim(RUN, STAGE, "w2")
    assert second is not None and second.task_id == first.task_id and second.attempt == 2
    assert not q.ack(RUN, STAGE, first)  # the lease moved on
    assert not q.heartbeat(RUN, STAGE, first)
    assert q.ack(RUN, STAGE, second)
    assert q.counts(RUN, STAGE).leased == 0


def test_heartbeat_keeps_the_lease(make_queue) -> None:
    q = make_queue(lease_seconds=0.4)
    q.open_stage(RUN, STAGE)
    q.enqueue(RUN, STAGE, tasks(1))
    lease = q.claim(RUN, STAGE, "w1")
    for _ in range(4):  # 0.8 s in all: twice the lease
        time.sleep(0.2)
        assert q.heartbeat(RUN, STAGE, lease)
        assert q.claim(RUN, STAGE, "w2") is None
    assert q.ack(RUN, STAGE, lease)


def test_failures_retry_then_dead_letter_with_error(make_queue) -> None:
    q = make_queue(max_attempts=3)
    q.open_stage(RUN, STAGE)
    q.enqueue(RUN, STAGE, tasks(1))
    outcomes = []
    for attempt in (1, 2, 3):
        lease = q.claim(RUN, STAGE, "w1")
        assert lease is not None and lease.attempt == attempt
        outcomes.append(q.fail(RUN, STAGE, lease, f"ValueError: boom {attempt}", "Traceback ..."))
    assert outcomes == ["retry", "retry", "dead"]
    assert q.claim(RUN, STAGE, "w1") is None
    (dead,) = q.dead_letters(RUN, STAGE)
    assert dead.task_id == tasks(1)[0][0] and dead.attempts == 3
    assert dead.error == "ValueError: boom 3" and dead.traceback == "Traceback ..."
    assert dead.task == tasks(1)[0][1]
    assert q.enqueue(RUN, STAGE, tasks(1)) == 0  # dead tasks wait for an explicit requeue
    assert q.requeue_dead(RUN, STAGE) == 1
    again = q.claim(RUN, STAGE, "w1")
    assert again is not None and again.attempt == 1
    assert q.counts(RUN, STAGE).dead == 0


def test_lost_worker_every_attempt_ends_dead(make_queue) -> None:
    q = make_queue(lease_seconds=0.15, max_attempts=2)
    q.open_stage(RUN, STAGE)
    q.enqueue(RUN, STAGE, tasks(1))
    assert q.claim(RUN, STAGE, "a") is not None
    time.sleep(0.2)
    assert q.claim(RUN, STAGE, "b").attempt == 2
    time.sleep(0.2)
    assert q.claim(RUN, STAGE, "c") is None  # third delivery would exceed max_attempts
    (dead,) = q.dead_letters(RUN, STAGE)
    assert "lease expired" in dead.error and dead.attempts == 2


def test_final_failure_and_release(make_queue) -> None:
    q = make_queue(max_attempts=5)
    q.open_stage(RUN, STAGE)
    q.enqueue(RUN, STAGE, tasks(2))
    a = q.claim(RUN, STAGE, "w")
    assert q.fail(RUN, STAGE, a, "invalid task message", "", final=True) == "dead"
    b = q.claim(RUN, STAGE, "w")
    q.release(RUN, STAGE, b)  # graceful shutdown: not an attempt
    again = q.claim(RUN, STAGE, "w2")
    assert again.task_id == b.task_id and again.attempt == 1


def test_concurrent_claims_deliver_each_task_once(make_queue) -> None:
    q = make_queue()
    q.open_stage(RUN, STAGE)
    q.enqueue(RUN, STAGE, tasks(200))
    seen: list[str] = []
    lock = threading.Lock()

    def work(name: str) -> None:
        mine = make_queue() if isinstance(q, RedisQueue) else q  # own connection per worker
        while (lease := mine.claim(RUN, STAGE, name)) is not None:
            assert mine.ack(RUN, STAGE, lease)
            with lock:
                seen.append(lease.task_id)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seen) == sorted(t for t, _ in tasks(200))


def test_closed_stage_ends_wait(make_queue) -> None:
    q = make_queue(poll_seconds=0.05)
    q.open_stage(RUN, STAGE)
    stop = threading.Event()
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(q.wait_for_work(RUN, STAGE, "w", stop)))
    t.start()
    time.sleep(0.2)
    assert t.is_alive()  # open and empty: keeps waiting
    q.close_stage(RUN, STAGE)
    t.join(5)
    assert not t.is_alive() and result == [None]
    assert q.counts(RUN, STAGE).closed


def test_stages_and_runs_are_isolated(make_queue) -> None:
    q = make_queue()
    for run in ("r1", "r2"):
        q.open_stage(run, STAGE)
    q.enqueue("r1", STAGE, tasks(2))
    assert q.claim("r2", STAGE, "w") is None
    assert q.counts("r2", STAGE).queued == 0 and q.counts("r1", STAGE).queued == 2


def test_discard_forgets_queued_and_leased_tasks(make_queue) -> None:
    """The controller discards the tasks of finished shards: a worker killed between a
    shard's marker and its ack leaves nothing pending behind."""
    q = make_queue()
    q.open_stage(RUN, STAGE)
    q.enqueue(RUN, STAGE, tasks(3))
    held = q.claim(RUN, STAGE, "killed-after-marker")
    assert held is not None
    assert q.discard(RUN, STAGE, [held.task_id, f"{RUN}/{STAGE}/00002", "no/such/task"]) == 2
    c = q.counts(RUN, STAGE)
    assert (c.queued, c.leased, c.dead) == (1, 0, 0)
    assert not q.ack(RUN, STAGE, held)  # its lease is gone: the shard was done anyway
    left = q.claim(RUN, STAGE, "w2")
    assert left is not None and left.task_id == f"{RUN}/{STAGE}/00001"
    assert q.claim(RUN, STAGE, "w2") is None
