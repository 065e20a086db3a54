"""SIGTERM as a node drain sends it: the first finishes the current task and exits 75
(stopped, not drained), a second releases the task uncounted. Real redis-server, worker
subprocesses started by hand as an external launcher (Compose, Kubernetes) would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
import yaml

from mia_dpo.cli.pipeline import EXIT_STOPPED
from mia_dpo.config import load_config
from mia_dpo.controller import Controller
from mia_dpo.demo.synthetic import write_synthetic
from mia_dpo.runtime import layout
from mia_dpo.runtime.queue_factory import open_queue
from mia_dpo.runtime.store import LocalStore
from mia_dpo.stages import get_stage

pytestmark = pytest.mark.integration


def setup_run(tmp: Path, redis_url: str, run_id: str) -> tuple[Path, Controller, threading.Thread]:
    src = tmp / "src"
    write_synthetic(src, 30, seed=1)
    cfg = {
        "stages": ["augment"],
        "input": {
            "path": str(src / "data.json"),
            "image_root": str(src / "images"),
            "shard_size": 6,
        },
        "store": {"backend": "local", "root": str(tmp / "store")},
        "queue": {"backend": "redis", "url": redis_url, "lease_seconds": 30, "poll_seconds": 0.1},
        "launcher": {"kind": "external"},
        # slow shards (9-image collages of 448 px tiles) so a signal lands mid-task
        "augment": {"formats": {"grid": 1.0}, "grid_counts": {9: 1.0}},
    }
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_cfg = load_config(path, environ={})
    ctl = Controller(
        run_cfg, run_id, LocalStore(tmp / "store"), open_queue(run_cfg.queue),
        stages=get_stage, progress=False,
    )  # fmt: skip
    thread = threading.Thread(target=ctl.run, daemon=True)
    thread.start()
    return path, ctl, thread


def start_worker(cfg: Path, run_id: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "mia_dpo", "worker", "--stage", "augment", "--run-id", run_id,
         "--config", str(cfg)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_for_lease(r: redis.Redis, stream: str, pid: int) -> str:
    """The task id the worker process `pid` holds, once it holds one."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            for p in r.xpending_range(stream, "workers", "-", "+", 10):
                if p["consumer"].split("-")[-2] == str(pid):
                    return r.xrange(stream, p["message_id"], p["message_id"])[0][1]["id"]
        except redis.ResponseError:
            pass
        time.sleep(0.005)
    raise AssertionError("worker never claimed a task")


def test_first_sigterm_finishes_the_task_then_exits_stopped(tmp_path, redis_url):
    cfg, ctl, thread = setup_run(tmp_path, redis_url, "drain")
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    stream = "mia-dpo:drain:augment:stream"
    w = start_worker(cfg, "drain")
    task_id = wait_for_lease(r, stream, w.pid)
    shard = int(task_id[-5:])
    assert not ctl.store.exists(layout.marker_key("drain", "augment", shard))
    w.send_signal(signal.SIGTERM)
    _, err = w.communicate(timeout=120)
    assert w.returncode == EXIT_STOPPED, err[-2000:]
    # the task it held was finished and acked, and it took no other
    assert ctl.store.exists(layout.marker_key("drain", "augment", shard))
    done = [k for k in ctl.store.list("runs/drain/augment/") if k.endswith(".done")]
    assert len(done) == 1
    counts = ctl.queue.counts("drain", "augment")
    assert (counts.queued, counts.leased, counts.dead) == (4, 0, 0)
    # fresh workers finish the stage and exit 0 on their own once it is closed
    workers = [start_worker(cfg, "drain") for _ in range(2)]
    thread.join(timeout=300)
    assert not thread.is_alive()
    for w2 in workers:
        assert w2.wait(timeout=60) == 0
    assert ctl.store.exists(layout.stage_done_key("drain", "augment"))


def test_second_sigterm_releases_the_task_uncounted(tmp_path, redis_url):
    cfg, ctl, thread = setup_run(tmp_path, redis_url, "hard")
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    stream = "mia-dpo:hard:augment:stream"
    w = start_worker(cfg, "hard")
    task_id = wait_for_lease(r, stream, w.pid)
    os.kill(w.pid, signal.SIGTERM)
    time.sleep(0.05)
    os.kill(w.pid, signal.SIGTERM)
    _, err = w.communicate(timeout=60)
    assert w.returncode == EXIT_STOPPED, err[-2000:]
    assert not ctl.store.exists(layout.marker_key("hard", "augment", int(task_id[-5:])))
    counts = ctl.queue.counts("hard", "augment")
    assert (counts.queued, counts.leased) == (5, 0)  # back in the queue, not leased
    assert r.hget("mia-dpo:hard:augment:attempts", task_id) in (None, "0")
    finisher = start_worker(cfg, "hard")
    thread.join(timeout=300)
    assert finisher.wait(timeout=60) == 0
    assert ctl.store.exists(layout.stage_done_key("hard", "augment"))


def test_sigterm_while_starting_exits_stopped_not_killed(tmp_path, redis_url):
    """A worker still connecting (here: riding out an unreachable S3 endpoint) when
    the drain comes exits 75 at once; dying by the signal (143) would count as a
    failed pod."""
    from tests.servers import free_port

    cfg = {
        "store": {"backend": "s3", "endpoint": f"127.0.0.1:{free_port()}", "bucket": "unreached"},
        "queue": {"backend": "redis", "url": redis_url},
        "launcher": {"kind": "external"},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, MIA_DPO_S3_ACCESS_KEY="k", MIA_DPO_S3_SECRET_KEY="s")
    w = subprocess.Popen(
        [sys.executable, "-m", "mia_dpo", "worker", "--stage", "augment", "--run-id", "starting",
         "--config", str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    time.sleep(2.0)  # past imports, inside the store's retry loop
    assert w.poll() is None
    w.send_signal(signal.SIGTERM)
    _, err = w.communicate(timeout=60)
    assert w.returncode == EXIT_STOPPED, err[-2000:]
    assert "stopped while starting" in err
