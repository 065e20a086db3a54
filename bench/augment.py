"""Augment-stage throughput, measured side by side in one run.

    .venv/bin/python bench/augment.py [--n 600] [--image-px 320]

Variants, on the same synthetic source data and the paper's defaults (448 px tiles):
- floor: a loop that only decodes every source image a sample uses and encodes an
  output of the same size with PIL, no composition, no queue, no store writes;
- augment with 1 and 2 worker processes (local launcher, real redis-server);
- the embedded default (in-process queue, 2 worker threads).
Prints samples/s and the ratios to the floor and between worker counts. Timings
cover the stage only (plan excluded), worker start-up included.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.servers

from mia_dpo.config import load_config
from mia_dpo.controller import Controller, plan_run, store_run_config
from mia_dpo.data.images import decode_image
from mia_dpo.demo.synthetic import write_synthetic
from mia_dpo.runtime import layout
from mia_dpo.runtime.queue_factory import open_queue
from mia_dpo.runtime.store import BlobReader, LocalStore
from mia_dpo.stages import get_stage
from tests.servers import RedisServer


def run_variant(tmp: Path, src: Path, name: str, overrides: dict) -> tuple[float, list[str]]:
    base = {
        "input.path": str(src / "data.json"),
        "input.image_root": str(src / "images"),
        "input.shard_size": 20,
        "stages": ["augment"],
        "store.root": str(tmp / name),
    }
    cfg = load_config(None, overrides={**base, **overrides}, environ={})
    store = LocalStore(cfg.store.root)
    ctl = Controller(cfg, "bench", store, open_queue(cfg.queue), stages=get_stage, progress=False)
    store_run_config(store, cfg, "bench")
    plan = plan_run(store, BlobReader(cfg.store), cfg, "bench")
    t0 = time.perf_counter()
    ctl.run_stage("augment", list(range(plan.n_shards)))
    seconds = time.perf_counter() - t0
    rows = []
    for i in range(plan.n_shards):
        rows += store.get_jsonl(layout.shard_key("bench", "augment", i))
    return seconds, rows


def floor_loop(src: Path, rows: list[str]) -> float:
    """Decode what each sample reads, encode what it writes; nothing else."""
    t0 = time.perf_counter()
    for line in rows:
        rec = json.loads(line)
        for rel in [rec["target_image"], *rec["distractor_images"]]:
            data = (src / "images" / rel).read_bytes()
            decode_image(data, rel, 50_000_000, 1)
        if rec["format"] != "sequence":
            with Image.open(rec["images"][0]) as out:
                size = out.size
            buf = io.BytesIO()
            Image.new("RGB", size, "white").save(buf, format="JPEG", quality=95, subsampling=0)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=600, help="source samples")
    ap.add_argument("--image-px", type=int, default=320, help="side of the source images")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        src = tmp / "src"
        write_synthetic(src, args.n, seed=0, image_px=args.image_px)
        redis = RedisServer().start(tmp / "redis")
        try:
            redis_q = {"queue.backend": "redis", "queue.url": redis.url, "queue.poll_seconds": 0.05}
            variants = {
                "augment, 1 worker process": {**redis_q, "launcher.kind": "local"},
                "augment, 2 worker processes": {
                    **redis_q,
                    "launcher.kind": "local",
                    "launcher.default_workers": 2,
                },
                "embedded default, 2 threads": {"launcher.default_workers": 2},
            }
            results = {name: run_variant(tmp, src, name.split(",")[0] + str(i), o)
                       for i, (name, o) in enumerate(variants.items())}  # fmt: skip
        finally:
            redis.stop()
        rows = next(iter(results.values()))[1]
        floor_s = floor_loop(src, rows)
    n = len(rows)
    print(f"{n} samples ({args.image_px}px sources, 448px tiles), 2-core machine\n")
    print(f"{'variant':<32}{'seconds':>9}{'samples/s':>11}{'of floor':>10}")
    print(f"{'floor: decode + encode only':<32}{floor_s:>9.2f}{n / floor_s:>11.1f}{1.0:>10.2f}")
    for name, (secs, _) in results.items():
        print(f"{name:<32}{secs:>9.2f}{n / secs:>11.1f}{floor_s / secs:>10.2f}")
    one = results["augment, 1 worker process"][0]
    two = results["augment, 2 worker processes"][0]
    print(f"\n2 workers / 1 worker speed-up: {one / two:.2f}x")


if __name__ == "__main__":
    main()
