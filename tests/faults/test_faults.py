"""Fault injection, CI size: the whole pipeline on the tiny model (augment -> generate ->
score -> select -> train -> evaluate, 2 workers per stage) against a real redis-server
(append-only) and a real S3 server, with every fault kind injected at least once; each
run completes, loses and duplicates nothing (counted from the store and the Redis
streams), writes pairs files byte-identical to the clean run's, and trains and
evaluates. tests/faults/faults.py says how each fault is made, tests/faults/audit.py how
work is counted; `bench/faults.py` runs many trials of each kind separately.

To keep CI short the faults share two runs:
- local launcher (the controller starts and restarts its worker processes): a worker
  SIGKILLed in every stage, and the controller SIGKILLed during score, then restarted;
- external workers (started by the harness, as Compose or Kubernetes would): a worker
  SIGKILLed in augment and evaluate, every generate worker drained with SIGTERM,
  redis-server crashed during score and kept down longer than a lease, the S3 server
  down for 10+ seconds during train.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.faults.audit import Outcome, Reference
from tests.faults.faults import run_trial
from tests.faults.lab import EXIT_STOPPED, STAGES, Lab, LabSpec
from tests.faults.trial import run_reference

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    # Its own servers: these tests stop and restart them.
    with Lab(tmp_path_factory.mktemp("faults"), tiny_model_dir, LabSpec()) as lab:
        yield lab


@pytest.fixture(scope="module")
def clean(lab: Lab) -> tuple[Reference, Outcome]:
    return run_reference(lab)


def assert_nothing_lost(out: Outcome) -> None:
    detail = out.summary()
    assert out.error is None, detail
    assert out.completed, detail
    assert out.lost_tasks == [] and out.lost_samples == [], detail
    assert out.dup_tasks == [] and out.dup_samples == [], detail
    assert out.differing == [], detail
    assert out.pairs_identical, detail
    assert out.train_ok and out.evaluate_ok, detail
    assert out.problems == [], detail
    assert out.ok


def events(out: Outcome, name: str) -> list[dict]:
    return [e for e in out.events if e["event"] == name]


def test_clean_run_accounts_for_every_shard_and_sample(clean):
    ref, out = clean
    assert_nothing_lost(out)
    n_shards = len(ref.shards["augment"])
    assert 4 <= n_shards <= 8
    assert ref.shards["generate"] == ref.shards["score"] == ref.shards["augment"]
    assert all(ref.shards[s] == [0] for s in ("select", "train", "evaluate"))
    assert ref.files["select/pairs.jsonl"], "the untrained tiny model should give pairs"


def test_local_launcher_worker_sigkills_and_controller_restart(lab, clean):
    ref, _ = clean
    schedule = [("sigkill", None, {}), ("controller", "score", {})]
    out = run_trial(lab, ref, schedule, "ci-local", random.Random(1), launcher="local")
    assert_nothing_lost(out)
    kills = [e for e in events(out, "sigkill") if e["killed"]]
    assert kills, out.events
    (ctl,) = events(out, "controller_sigkill")
    assert ctl["killed"]


def test_external_workers_drain_redis_crash_s3_outage(lab, clean):
    ref, _ = clean
    schedule = [
        ("sigkill", "augment", {}),
        ("drain", "generate", {}),
        ("redis", "score", {"hard": True, "down": 4.0}),  # longer than a 3 s lease
        ("s3", "train", {}),
        ("sigkill", "evaluate", {}),
    ]
    out = run_trial(lab, ref, schedule, "ci-external", random.Random(2), launcher="external")
    assert_nothing_lost(out)
    (drain,) = events(out, "drain")
    assert drain["workers"] >= 1 and not drain["still_running"]
    for victim in drain["victims"]:
        if victim["task"]:  # its task was finished or handed back
            assert victim["fate"] in ("finished", "released"), drain
        if victim["task"] and not victim["twice"]:  # and it said "stopped"
            assert victim["rc"] == EXIT_STOPPED, drain
    (redis_down,) = events(out, "redis_restart")
    assert redis_down["hard"] and redis_down["down_s"] >= 4.0
    (s3_down,) = events(out, "s3_outage")
    assert s3_down["down_s"] >= 10.0
    assert set(out.stage_end_s) == set(STAGES)
