"""A worker reads and writes only inside its own run's prefix and the configured
input: forged queue messages are dead-lettered at once, and a record pointing
anywhere else is refused before a byte is read. Real redis-server for the queue."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from mia_dpo.config import RunConfig
from mia_dpo.controller import Controller, RunFailed
from mia_dpo.demo.synthetic import write_synthetic
from mia_dpo.records import Task
from mia_dpo.runtime import layout
from mia_dpo.runtime.queue_factory import open_queue
from mia_dpo.runtime.store import BlobReader, LocalStore, OutsideScope, open_store
from mia_dpo.runtime.worker import Worker, scoped_reader
from mia_dpo.stages import get_stage


def test_reader_allows_only_its_roots(tmp_path: Path) -> None:
    run = tmp_path / "store" / "runs" / "r1"
    other = tmp_path / "store" / "runs" / "r2"
    for d in (run, other):
        d.mkdir(parents=True)
        (d / "x.png").write_bytes(b"x")
    (run / "escape").symlink_to(other)
    reader = BlobReader(RunConfig().store, roots=[str(run), "s3://data/images"])
    assert reader.read(str(run / "x.png")) == b"x"
    for uri in (
        str(other / "x.png"),  # another run
        str(run / ".." / "r2" / "x.png"),  # climbing out
        str(run / "escape" / "x.png"),  # a symlink leading out
        str(run) + "-evil/x.png",  # a sibling sharing the prefix's spelling
        "/etc/hostname",
        "s3://data/images/../secrets/key",
        "s3://other-bucket/images/a.png",
    ):
        assert not reader.allowed(uri), uri
        with pytest.raises(OutsideScope, match="outside this run's prefix"):
            reader.read(uri)
    assert reader.allowed("s3://data/images/a/b.png")
    assert BlobReader(RunConfig().store).allowed("/etc/hostname")  # unscoped: user commands


def test_worker_reader_covers_run_prefix_and_input(tmp_path: Path) -> None:
    cfg = RunConfig.model_validate(
        {"input": {"path": str(tmp_path / "src/data.json"), "image_root": str(tmp_path / "img")},
         "store": {"root": str(tmp_path / "store")}}
    )  # fmt: skip
    reader = scoped_reader(open_store(cfg.store), cfg, "r1")
    assert reader.allowed(str(tmp_path / "store/runs/r1/augment/images/a.png"))
    assert reader.allowed(str(tmp_path / "img/colors/1.png"))
    assert reader.allowed(str(tmp_path / "src/data.json"))
    assert not reader.allowed(str(tmp_path / "store/runs/r2/augment/images/a.png"))
    assert not reader.allowed(str(tmp_path / "src/other.json"))


def forged_messages(run_id: str, stage: str) -> dict[str, str]:
    good = Task.make(run_id, stage, 0).model_dump()
    return {
        f"{run_id}/{stage}/00000": json.dumps(good | {"output_key": "runs/other/augment/x"}),
        f"{run_id}/{stage}/00001": json.dumps(
            Task.make(run_id, stage, 1).model_dump() | {"stage": "exfiltrate"}
        ),
        f"{run_id}/{stage}/00002": json.dumps(Task.make("someone-else", stage, 2).model_dump()),
        f"{run_id}/{stage}/00003": json.dumps(
            Task.make(run_id, stage, 3).model_dump() | {"run_id": "../../etc"}
        ),
        f"{run_id}/{stage}/00004": "{not json",
        f"{run_id}/{stage}/00005": json.dumps(Task.make(run_id, stage, 9).model_dump()),
    }


@pytest.mark.integration
def test_forged_queue_messages_are_dead_lettered_at_once(tmp_path: Path, redis_url: str) -> None:
    cfg = RunConfig.model_validate(
        {"queue": {"backend": "redis", "url": redis_url, "poll_seconds": 0.05},
         "store": {"root": str(tmp_path / "store")}, "launcher": {"kind": "external"}}
    )  # fmt: skip
    store, queue = LocalStore(tmp_path / "store"), open_queue(cfg.queue)
    queue.open_stage("scoped", "augment")
    messages = forged_messages("scoped", "augment")
    queue.enqueue("scoped", "augment", list(messages.items()))
    queue.close_stage("scoped", "augment")
    worker = Worker(
        cfg,
        "scoped",
        "augment",
        store,
        queue,
        stage_fn=get_stage("augment"),
        stop=threading.Event(),
    )
    worker.run()
    letters = {d.task_id: d for d in queue.dead_letters("scoped", "augment")}
    assert set(letters) == set(messages)
    for letter in letters.values():
        assert letter.error.startswith("invalid task message"), letter.error
        assert letter.attempts == 1  # no retry: a forged message does not get better
    assert worker.processed == 0
    assert not any(store.list("runs/"))  # nothing read or written for them


@pytest.mark.integration
def test_a_record_pointing_outside_is_refused_and_dead_lettered(
    tmp_path: Path, redis_url: str, tiny_model_dir: Path
) -> None:
    write_synthetic(tmp_path / "src", n=20, seed=0)
    (tmp_path / "secret.txt").write_text("do not read me")
    doc = {
        "input": {"path": str(tmp_path / "src/data.json"),
                  "image_root": str(tmp_path / "src/images"), "shard_size": 20},
        "store": {"root": str(tmp_path / "store")},
        "queue": {"backend": "redis", "url": redis_url, "poll_seconds": 0.05},
        "launcher": {"kind": "inline"},
        "model": {"path": str(tiny_model_dir)},
        "stages": ["augment"],
    }  # fmt: skip
    cfg = RunConfig.model_validate(doc)
    store = LocalStore(tmp_path / "store")
    Controller(cfg, "scope", store, open_queue(cfg.queue), stages=get_stage, progress=False).run()
    # someone with write access to the bucket edits a record to point elsewhere
    key = layout.shard_key("scope", "augment", 0)
    rows = [json.loads(line) for line in store.get_text(key).splitlines()]
    rows[0]["images"][0] = str(tmp_path / "secret.txt")
    store.put_text(key, "".join(json.dumps(r) + "\n" for r in rows))
    cfg = RunConfig.model_validate(doc | {"stages": ["generate"]})
    with pytest.raises(RunFailed, match="OutsideScope"):
        Controller(
            cfg, "scope", store, open_queue(cfg.queue), stages=get_stage, progress=False
        ).run()
    (letter,) = open_queue(cfg.queue).dead_letters("scope", "generate")
    assert letter.attempts == 1
    assert "secret.txt" in letter.error and "outside this run's prefix" in letter.error
    assert os.path.exists(tmp_path / "secret.txt")
