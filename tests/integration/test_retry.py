"""`mia-dpo retry RUN_ID --dead`: a run that went on past a poison shard (within its
failure budget) gets that shard processed after the fix. Real redis-server and
SeaweedFS; the stage-reopening rules are also checked on a local store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mia_dpo.config import load_config
from mia_dpo.controller import plan_run
from mia_dpo.records import ShardStats
from mia_dpo.retry import retry_dead
from mia_dpo.runtime import layout
from mia_dpo.runtime.queue import DeadLetter
from mia_dpo.runtime.store import BlobReader, LocalStore, S3Store
from tests.integration import test_pipeline
from tests.integration.test_pipeline import cli_env, distributed_config, mia

source = test_pipeline.source  # the module's source-data fixture, shared


@pytest.mark.integration
def test_retry_dead_processes_a_shard_the_budget_let_through(
    tmp_path,
    source,
    s3_bucket,
    redis_url,
) -> None:
    cfg_path = distributed_config(tmp_path, source, s3_bucket, redis_url)
    doc = yaml.safe_load(cfg_path.read_text())
    doc["launcher"]["failure_budget"] = 0.25  # 2 of 8 shards may die and the run goes on
    cfg_path.write_text(yaml.safe_dump(doc))
    env = cli_env(s3_bucket, redis_url)
    cfg = load_config(cfg_path, environ=env)
    store = S3Store(cfg.store)
    plan_run(store, BlobReader(cfg.store), cfg, "budget")
    good = store.get_bytes(layout.shard_key("budget", "plan", 2))
    store.put_bytes(layout.shard_key("budget", "plan", 2), b"{not json\n")
    assert mia("run", str(cfg_path), "--run-id", "budget", env=env).returncode == 0
    assert store.exists(layout.stage_done_key("budget", "augment"))
    assert not store.exists(layout.marker_key("budget", "augment", 2))

    store.put_bytes(layout.shard_key("budget", "plan", 2), good)  # the fix
    # a plain rerun does not touch a stage that is done ...
    mia("run", str(cfg_path), "--run-id", "budget", env=env)
    assert not store.exists(layout.marker_key("budget", "augment", 2))
    # ... retry reopens it
    out = mia("retry", "--run-id", "budget", "--dead", "--config", str(cfg_path), env=env).stdout
    assert "augment: 1 dead task(s) requeued with fresh attempts: budget/augment/00002" in out
    assert f"mia-dpo run {cfg_path} --run-id budget" in out
    assert not store.exists(layout.stage_done_key("budget", "augment"))
    mia("run", str(cfg_path), "--run-id", "budget", env=env)
    assert all(store.exists(layout.marker_key("budget", "augment", i)) for i in range(8))
    status = mia("status", "--run-id", "budget", "--config", str(cfg_path), env=env).stdout
    assert "dead letter" not in status
    again = mia("retry", "--run-id", "budget", "--dead", "--config", str(cfg_path), env=env)
    assert "nothing to retry" in again.stdout


def test_retry_reopens_the_dead_stage_and_everything_after_it(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    stages = ["augment", "generate", "score", "select", "train"]
    store.put_json(layout.config_key("r"), {"stages": stages})
    for stage in stages:
        store.put_json(layout.stage_done_key("r", stage), {"dead_shards": []})
    for stage in ("select", "train"):
        stats = ShardStats(stage=stage, shard=0)
        store.put_text(layout.marker_key("r", stage, 0), stats.model_dump_json())
    store.put_text(layout.marker_key("r", "generate", 1), "{}")
    letter = DeadLetter(task_id="r/generate/00003", task="{}", attempts=3, error="OOM", at=0.0)
    store.put_json(layout.dead_key("r", "generate"), [letter.model_dump()])

    plan = retry_dead(store, None, "r")
    assert plan.requeued == {"generate": ["r/generate/00003"]}
    assert plan.reopened == ["generate", "score", "select", "train"]
    assert store.exists(layout.stage_done_key("r", "augment"))  # upstream untouched
    for stage in plan.reopened:
        assert not store.exists(layout.stage_done_key("r", stage))
    assert store.exists(layout.marker_key("r", "generate", 1))  # finished shards stay
    assert not store.exists(layout.marker_key("r", "select", 0))  # built without shard 3
    assert not store.exists(layout.marker_key("r", "train", 0))
    assert json.loads(store.get_text(layout.dead_key("r", "generate"))) == []
    assert retry_dead(store, None, "r").requeued == {}


def test_retry_refuses_an_unknown_run_or_stage(tmp_path: Path) -> None:
    from mia_dpo.errors import UserError

    store = LocalStore(tmp_path)
    with pytest.raises(UserError, match="run 'nope': not found"):
        retry_dead(store, None, "nope")
    store.put_json(layout.config_key("r"), {"stages": ["augment"]})
    with pytest.raises(UserError, match="--stage: 'train' is not a stage of run 'r'"):
        retry_dead(store, None, "r", ["train"])
