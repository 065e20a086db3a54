"""The whole pipeline on the tiny model, augment -> ... -> train -> evaluate: the embedded
default vs a real redis-server + S3 server with 2 worker processes per stage (local
launcher) give the same pairs, and the distributed run leaves its adapter and its
evaluation report in the bucket."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mia_dpo.config import StoreConfig, load_config
from mia_dpo.controller import Controller
from mia_dpo.demo.synthetic import write_synthetic
from mia_dpo.runtime.queue import MemoryQueue
from mia_dpo.runtime.store import LocalStore, S3Store
from mia_dpo.stages import get_stage

pytestmark = pytest.mark.integration

N = 32
COMMON = {
    "seed": 5,
    "stages": ["augment", "generate", "score", "select", "train", "evaluate"],
    # small collages: the tiny model sees 64 px anyway
    "augment": {"grid_tile_px": 64, "grid_margin_px": 16, "grid_label_font_px": 12},
    "generate": {"max_new_tokens": 6, "batch_size": 3},
    "score": {"batch_size": 3},
    "select": {"min_pairs_for_fences": 4},
    "train": {"lora_r": 4, "lora_alpha": 8, "batch_size": 4, "gradient_accumulation_steps": 1,
              "max_length": 1024, "learning_rate": 1.0e-3},
    "evaluate": {"max_new_tokens": 4, "formats": ["sequence", "grid"]},
}  # fmt: skip


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pairs-src")
    write_synthetic(out, N, seed=11)
    return out


def pair_fields(rows: list[str], key: str = "image") -> list[dict]:
    """Records without image locations (local path vs s3:// URI)."""
    out = []
    for line in rows:
        rec = json.loads(line)
        rec[key] = [Path(u).name for u in rec[key]]
        out.append(rec)
    return out


def differences(a: list[dict], b: list[dict], rel: float = 1e-5) -> list[str]:
    """Per differing pair, its id and each field that differs (both values): what a
    failure has to show, since whole records are too long for pytest's diff.

    Measured values (attention ratio, perplexity) are compared to `rel`: CPU kernels may
    split a reduction differently when the machine is loaded (MKL's dynamic threads), and
    then a ratio moves in its 7th digit (0.37417447 vs 0.37417438 seen on 2 busy cores).
    Every decision (which answers, which pairs, chosen and rejected) must be equal."""
    out = [f"{len(a)} vs {len(b)} pairs"] if len(a) != len(b) else []
    for x, y in zip(a, b, strict=False):
        fields = {}
        for k in sorted(x.keys() | y.keys()):
            u, v = x.get(k), y.get(k)
            if isinstance(u, float) and isinstance(v, float):
                if u != pytest.approx(v, rel=rel):
                    fields[k] = (u, v)
            elif u != v:
                fields[k] = (u, v)
        if fields:
            out.append(f"{x.get('id')}: {fields}")
    return out


def test_distributed_pairs_equal_embedded(tmp_path, source, tiny_model_dir, s3_bucket, redis_url):
    base = {**COMMON, "model": {"path": str(tiny_model_dir)}}
    base["input"] = {"path": str(source / "data.json"), "image_root": str(source / "images"),
                     "shard_size": 8, "holdout_fraction": 0.2}  # fmt: skip

    # embedded default: in-process queue, worker threads, local store
    emb = {**base, "store": {"backend": "local", "root": str(tmp_path / "emb")},
           "launcher": {"default_workers": 2}}  # fmt: skip
    emb_path = tmp_path / "emb.yaml"
    emb_path.write_text(yaml.safe_dump(emb))
    cfg = load_config(emb_path, environ={})
    store = LocalStore(cfg.store.root)
    outcomes = Controller(
        cfg, "pairs", store, MemoryQueue(cfg.queue), stages=get_stage, progress=False
    ).run()
    assert [o.stage for o in outcomes] == COMMON["stages"]
    scored = outcomes[2].stats
    augmented = outcomes[0].stats.kept  # 20 % held out; a 9-image grid can lack distractors
    assert 0.5 * N <= augmented < N
    assert scored.total == augmented  # one greedy response per sample
    assert scored.kept + sum(scored.dropped.values()) == augmented
    embedded = store.get_jsonl("runs/pairs/select/pairs.jsonl")
    assert embedded, "the untrained tiny model should be confused by several images"

    # distributed: Redis + S3, 2 worker processes per stage
    dist = {**base, "store": {"backend": "s3", "bucket": s3_bucket["bucket"]},
            "queue": {"backend": "redis", "lease_seconds": 30, "poll_seconds": 0.1},
            "launcher": {"kind": "local", "default_workers": 2}}  # fmt: skip
    dist_path = tmp_path / "dist.yaml"
    dist_path.write_text(yaml.safe_dump(dist))
    env = dict(os.environ, MIA_DPO_REDIS_URL=redis_url, MIA_DPO_S3_ENDPOINT=s3_bucket["endpoint"],
               MIA_DPO_S3_ACCESS_KEY=s3_bucket["access_key"],
               MIA_DPO_S3_SECRET_KEY=s3_bucket["secret_key"], HF_HUB_OFFLINE="1")  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "mia_dpo", "run", str(dist_path), "--run-id", "pairs", "-q"],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    s3 = S3Store(StoreConfig(
        backend="s3", endpoint=s3_bucket["endpoint"], bucket=s3_bucket["bucket"],
        access_key=s3_bucket["access_key"], secret_key=s3_bucket["secret_key"],
    ))  # fmt: skip
    distributed = s3.get_jsonl("runs/pairs/select/pairs.jsonl")
    assert not differences(pair_fields(distributed), pair_fields(embedded))
    assert "select: kept" in proc.stdout
    # training and evaluation ran in worker processes and left their outputs in the bucket
    assert s3.exists("runs/pairs/train/adapter/adapter_config.json")
    assert s3.exists("runs/pairs/train/metadata.json")
    dist_report = s3.get_json("runs/pairs/evaluate/report.json")
    emb_report = store.get_json("runs/pairs/evaluate/report.json")
    items = "runs/pairs/evaluate/items.jsonl"  # the same benchmark, wherever its images live
    assert pair_fields(s3.get_jsonl(items), "images") == pair_fields(
        store.get_jsonl(items), "images"
    )
    assert set(dist_report["models"]) == {"base", "adapted"}
    assert dist_report["models"]["base"] == emb_report["models"]["base"]
    # the TRL file has one example per pair, each with its images
    trl = [json.loads(x) for x in s3.get_jsonl("runs/pairs/select/pairs.trl.jsonl")]
    assert len(trl) == len(distributed)
    for ex in trl:
        n_img = sum(p.get("type") == "image" for p in ex["prompt"][0]["content"])
        assert n_img == len(ex["images"])
