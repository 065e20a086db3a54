"""The runtime end to end on a real redis-server and a real S3 server (SeaweedFS),
with `mia-dpo run` and its worker subprocesses exactly as a user starts them."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import yaml

from mia_dpo.config import StoreConfig, load_config
from mia_dpo.controller import Controller, plan_run
from mia_dpo.demo.synthetic import write_synthetic
from mia_dpo.runtime import layout
from mia_dpo.runtime.queue import MemoryQueue
from mia_dpo.runtime.store import BlobReader, LocalStore, S3Store
from mia_dpo.stages import get_stage

pytestmark = pytest.mark.integration

N_SAMPLES = 48
SHARD = 6  # -> 8 shards


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("source")
    write_synthetic(out, N_SAMPLES, seed=3)
    return out


def upload_images(src: Path, s3: dict[str, str]) -> str:
    """Put the source images in the bucket: the distributed run reads them from s3://."""
    store = S3Store(s3_cfg(s3, prefix="inputs"))
    for path in sorted((src / "images").rglob("*.png")):
        store.put_bytes(f"images/{path.relative_to(src / 'images').as_posix()}", path.read_bytes())
    return f"s3://{s3['bucket']}/inputs/images"


def s3_cfg(s3: dict[str, str], prefix: str = "") -> StoreConfig:
    return StoreConfig(
        backend="s3", endpoint=s3["endpoint"], bucket=s3["bucket"], prefix=prefix,
        access_key=s3["access_key"], secret_key=s3["secret_key"],
    )  # fmt: skip


def distributed_config(tmp: Path, src: Path, s3: dict[str, str], redis_url: str, **augment) -> Path:
    cfg = {
        "seed": 7,
        "stages": ["augment"],
        "input": {"path": str(src / "data.json"), "image_root": upload_images(src, s3),
                  "shard_size": SHARD},
        "store": {"backend": "s3", "bucket": s3["bucket"], "prefix": "mia"},
        "queue": {"backend": "redis", "lease_seconds": 1.5, "max_attempts": 3,
                  "poll_seconds": 0.1},
        "launcher": {"kind": "local", "default_workers": 2},
        "augment": {"grid_tile_px": 448, **augment},
    }  # fmt: skip
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli_env(s3: dict[str, str], redis_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        MIA_DPO_REDIS_URL=redis_url, MIA_DPO_S3_ENDPOINT=s3["endpoint"],
        MIA_DPO_S3_ACCESS_KEY=s3["access_key"], MIA_DPO_S3_SECRET_KEY=s3["secret_key"],
        HF_HUB_OFFLINE="1",
    )  # fmt: skip
    return env


def mia(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "mia_dpo", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"mia-dpo {' '.join(args)} -> {proc.returncode}\n{proc.stderr[-3000:]}"
        )
    return proc


def records(store, blobs: BlobReader, run_id: str, n_shards: int) -> list[dict]:
    """All augment records, with each image replaced by the sha256 of its bytes, so runs
    on different stores (local paths vs s3:// URIs) compare on content."""
    rows = []
    for i in range(n_shards):
        for line in store.get_jsonl(layout.shard_key(run_id, "augment", i)):
            rec = json.loads(line)
            rec["images"] = [hashlib.sha256(blobs.read(u)).hexdigest() for u in rec["images"]]
            rows.append(rec)
    return rows


def embedded_records(tmp: Path, src: Path, **augment) -> list[dict]:
    overrides = {
        "seed": 7, "stages": ["augment"], "input.path": str(src / "data.json"),
        "input.image_root": str(src / "images"), "input.shard_size": SHARD,
        "store.root": str(tmp / "embedded"),
        "augment.grid_tile_px": 448, **{f"augment.{k}": v for k, v in augment.items()},
    }  # fmt: skip
    cfg = load_config(None, overrides=overrides, environ={})
    store = LocalStore(cfg.store.root)
    Controller(cfg, "ref", store, MemoryQueue(cfg.queue), stages=get_stage, progress=False).run()
    return records(store, BlobReader(cfg.store), "ref", N_SAMPLES // SHARD)


def test_two_worker_processes_match_the_embedded_default(tmp_path, source, s3_bucket, redis_url):
    cfg_path = distributed_config(tmp_path, source, s3_bucket, redis_url)
    env = cli_env(s3_bucket, redis_url)
    out = mia("run", str(cfg_path), "--run-id", "dist", env=env)
    assert f"augment: kept {N_SAMPLES} of {N_SAMPLES}" in out.stdout
    store = S3Store(s3_cfg(s3_bucket, prefix="mia"))
    got = records(store, BlobReader(s3_cfg(s3_bucket)), "dist", N_SAMPLES // SHARD)
    assert got == embedded_records(tmp_path, source)
    assert {r["format"] for r in got} == {"sequence", "grid", "pic_in_pic"}
    # every image a record names resolves as given: s3:// URIs into the bucket
    assert all(u.startswith(f"s3://{s3_bucket['bucket']}/") for line in store.get_jsonl(
        layout.shard_key("dist", "augment", 0)) for u in json.loads(line)["images"])  # fmt: skip

    # A second run of the same id does no work: nothing in the store or queue changes.
    client = S3Store(s3_cfg(s3_bucket)).client
    before = {
        o.object_name: o.etag for o in client.list_objects(s3_bucket["bucket"], recursive=True)
    }
    r = redis.Redis.from_url(redis_url)
    stream = "mia-dpo:dist:augment:stream"
    entries_before = r.xinfo_stream(stream)["entries-added"]
    again = mia("run", str(cfg_path), "--run-id", "dist", env=env)
    assert "(already done)" in again.stdout
    after = {
        o.object_name: o.etag for o in client.list_objects(s3_bucket["bucket"], recursive=True)
    }
    assert after == before
    assert r.xinfo_stream(stream)["entries-added"] == entries_before


def test_worker_killed_mid_shard_loses_and_duplicates_nothing(
    tmp_path, source, s3_bucket, redis_url
):
    # 9-image collages at 448 px tiles make each shard take long enough to be caught mid-way.
    augment = {"formats": {"grid": 1.0}, "grid_counts": {9: 1.0}}
    cfg_path = distributed_config(tmp_path, source, s3_bucket, redis_url, **augment)
    env = cli_env(s3_bucket, redis_url)
    store = S3Store(s3_cfg(s3_bucket, prefix="mia"))
    ctl = subprocess.Popen(
        [sys.executable, "-m", "mia_dpo", "run", str(cfg_path), "--run-id", "kill", "-q"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    stream = "mia-dpo:kill:augment:stream"
    killed: tuple[int, int] | None = None
    deadline = time.monotonic() + 120
    while killed is None and time.monotonic() < deadline and ctl.poll() is None:
        try:
            pending = r.xpending_range(stream, "workers", "-", "+", 10)
        except redis.ResponseError:
            pending = []  # stage not opened yet
        for p in pending:
            shard = int(r.xrange(stream, p["message_id"], p["message_id"])[0][1]["id"][-5:])
            if not store.exists(layout.marker_key("kill", "augment", shard)):
                pid = int(p["consumer"].split("-")[-2])  # consumer = host-pid-random
                os.kill(pid, signal.SIGKILL)
                killed = (pid, shard)
                break
        time.sleep(0.01)
    assert killed is not None, "never caught a worker holding a lease"
    assert not store.exists(layout.marker_key("kill", "augment", killed[1]))  # truly mid-shard
    _, err = ctl.communicate(timeout=300)
    assert ctl.returncode == 0, err[-3000:]
    got = records(store, BlobReader(s3_cfg(s3_bucket)), "kill", N_SAMPLES // SHARD)
    ids = [g["sample_id"] for g in got]
    assert len(ids) == len(set(ids)) == N_SAMPLES  # none lost, none duplicated
    assert got == embedded_records(tmp_path, source, **augment)
    assert r.xlen(stream) == 0 and r.hlen("mia-dpo:kill:augment:dead") == 0


def test_poison_shard_is_dead_lettered_and_status_shows_it(tmp_path, source, s3_bucket, redis_url):
    cfg_path = distributed_config(tmp_path, source, s3_bucket, redis_url)
    env = cli_env(s3_bucket, redis_url)
    cfg = load_config(cfg_path, environ=env)
    store = S3Store(cfg.store)
    # Plan the run, then corrupt one planned shard: every attempt on it must fail.
    plan_run(store, BlobReader(cfg.store), cfg, "poison")
    store.put_bytes(layout.shard_key("poison", "plan", 2), b"{not json\n")
    proc = mia("run", str(cfg_path), "--run-id", "poison", env=env, check=False)
    assert proc.returncode == 1
    assert "1 of 8 shards dead-lettered" in proc.stderr and "Traceback" not in proc.stderr
    # the other shards all finished
    for i in range(8):
        assert store.exists(layout.marker_key("poison", "augment", i)) == (i != 2)
    status = mia("status", "--run-id", "poison", "--config", str(cfg_path), env=env).stdout
    assert "dead letter poison/augment/00002 after 3 attempts: JSONDecodeError" in status
    row = next(line for line in status.splitlines() if line.startswith("augment"))
    assert row.split()[1:3] == ["failed", "7/8"]
    st = json.loads(
        mia("status", "--run-id", "poison", "--config", str(cfg_path), "--json", env=env).stdout
    )
    assert st["stages"][0]["dead"][0]["traceback"].startswith("Traceback")

    # After the fix, rerunning the same id retries the dead shard and completes the run.
    plan_rows = json.loads((Path(source) / "data.json").read_text())[12:18]
    store.put_jsonl(
        layout.shard_key("poison", "plan", 2),
        [json.dumps({"line": 13 + i, "raw": raw}) for i, raw in enumerate(plan_rows)],
    )
    mia("run", str(cfg_path), "--run-id", "poison", env=env)
    assert store.exists(layout.stage_done_key("poison", "augment"))
    assert "done" in mia("status", "--run-id", "poison", "--config", str(cfg_path), env=env).stdout
