"""Workers started by someone else (Compose services, one per stage, all at once)
never wait forever: a stage the store says is done is closed in the queue even when
Redis lost its state, and the stages a failed run will not reach are closed too.
Real redis-server."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import redis

from mia_dpo.config import RunConfig
from mia_dpo.controller import Controller, RunFailed, plan_run
from mia_dpo.demo.synthetic import write_synthetic
from mia_dpo.runtime import layout
from mia_dpo.runtime.queue_factory import open_queue
from mia_dpo.runtime.store import BlobReader, LocalStore
from mia_dpo.runtime.worker import Worker
from mia_dpo.stages import get_stage

pytestmark = pytest.mark.integration


def config(tmp: Path, redis_url: str, stages: list[str]) -> RunConfig:
    write_synthetic(tmp / "src", n=12, seed=1)
    return RunConfig.model_validate({
        "stages": stages,
        "input": {"path": str(tmp / "src/data.json"), "image_root": str(tmp / "src/images"),
                  "shard_size": 4},
        "store": {"root": str(tmp / "store")},
        "queue": {"backend": "redis", "url": redis_url, "poll_seconds": 0.05, "max_attempts": 1},
        "launcher": {"kind": "inline"},
        "model": {"path": "unused-here"},
    })  # fmt: skip


def external_worker(cfg: RunConfig, run_id: str, stage: str, store: LocalStore) -> threading.Thread:
    worker = Worker(cfg, run_id, stage, store, open_queue(cfg.queue), stage_fn=get_stage(stage))
    t = threading.Thread(target=worker.run, daemon=True)
    t.start()
    return t


def test_a_done_stage_is_closed_even_if_redis_forgot_it(tmp_path: Path, redis_url: str) -> None:
    cfg = config(tmp_path, redis_url, ["augment"])
    store = LocalStore(tmp_path / "store")
    Controller(cfg, "ext", store, open_queue(cfg.queue), stages=get_stage, progress=False).run()
    redis.Redis.from_url(redis_url).flushall()  # Redis restarted without its data
    waiting = external_worker(cfg, "ext", "augment", store)
    waiting.join(0.5)
    assert waiting.is_alive()  # nothing tells it the stage is over yet
    (outcome,) = Controller(
        cfg, "ext", store, open_queue(cfg.queue), stages=get_stage, progress=False
    ).run()
    assert outcome.skipped
    waiting.join(30)
    assert not waiting.is_alive()


def test_stages_a_failed_run_will_not_reach_are_closed(tmp_path: Path, redis_url: str) -> None:
    cfg = config(tmp_path, redis_url, ["augment", "generate", "score"])
    store = LocalStore(tmp_path / "store")
    plan_run(store, BlobReader(cfg.store), cfg, "fail")
    store.put_bytes(layout.shard_key("fail", "plan", 1), b"{poison\n")
    later = [external_worker(cfg, "fail", s, store) for s in ("generate", "score")]
    with pytest.raises(RunFailed, match="stage augment: 1 of 3 shards dead-lettered"):
        Controller(
            cfg, "fail", store, open_queue(cfg.queue), stages=get_stage, progress=False
        ).run()
    for t in later:
        t.join(30)
        assert not t.is_alive()
    assert not any(store.list("runs/fail/generate/"))


def test_tasks_the_queue_lost_are_offered_again(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis lost what the stage had written (a restart without its data, a failover
    to a replica that missed the last writes): the waiting controller enqueues the
    shards without a marker again, and the run finishes."""
    import mia_dpo.controller as controller_mod

    monkeypatch.setattr(controller_mod, "HEAL_SECONDS", 0.5)
    doc = config(tmp_path, redis_url, ["augment"]).model_dump(mode="json")
    cfg = RunConfig.model_validate(doc | {"launcher": {"kind": "external"}})
    store = LocalStore(tmp_path / "store")
    ctl = Controller(cfg, "heal", store, open_queue(cfg.queue), stages=get_stage, progress=False)
    run = threading.Thread(target=ctl.run, daemon=True)
    run.start()
    r = redis.Redis.from_url(redis_url)
    while not r.exists("mia-dpo:heal:augment:live"):  # the stage is open and enqueued
        run.join(0.05)
    r.flushall()
    worker = external_worker(cfg, "heal", "augment", store)
    run.join(120)
    assert not run.is_alive()
    worker.join(30)
    assert not worker.is_alive()
    assert all(store.exists(layout.marker_key("heal", "augment", i)) for i in range(3))
    assert store.exists(layout.stage_done_key("heal", "augment"))
