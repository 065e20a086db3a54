"""Train-stage time with random batches and with `train.group_by_length`, same pairs.

    .venv/bin/python bench/train_batching.py [--pairs FILE] [--model DIR] [--config FILE]
        [--rounds 1] [--threads 1]

Defaults: the demo's pairs and base after `make demo` (.demo/store/runs/demo/select/
pairs.trl.jsonl, .demo/base) and the demo's train section. Any TRL pairs file of the
select stage works (bench/evidence.py --work DIR keeps one per variant).

Each round trains both variants with `mia-dpo train`'s own path (train_standalone), in
alternating order so neither always runs on a warmer machine, and reports per variant:
wall time, optimizer steps, seconds per step, the final logged loss, and the padding
efficiency of its batches (real tokens over tokens once each batch is padded to its
longest row, from the train stage's own per-row token counts). The ratio line is
random / grouped. Both variants see every pair the same number of times; only which
pairs share a batch (and so the loss curve) differs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mia_dpo.config import RunConfig, load_config
from mia_dpo.data.images import ImageLoader
from mia_dpo.demo.config import demo_config
from mia_dpo.models.loading import load_model, pad_fill
from mia_dpo.records import ShardStats
from mia_dpo.runtime.context import DropLog
from mia_dpo.runtime.store import BlobReader
from mia_dpo.stages.train import train_standalone
from mia_dpo.training import data
from mia_dpo.training.sampler import LengthGroupedBatches, padding_efficiency

VARIANTS = {"random batches": False, "group_by_length": True}


def row_lengths(pairs: Path, cfg: RunConfig) -> list[int]:
    """The train stage's token count per kept row (prompt + the longer answer)."""
    lm = load_model(cfg.model)
    lines = [line for line in pairs.read_text(encoding="utf-8").splitlines() if line.strip()]
    loader = data.PairImages(
        ImageLoader(BlobReader(cfg.store), cfg.input.max_image_pixels),
        pad_fill(lm) if cfg.model.pad_to_square else None,
    )
    rows = data.read_pairs(lines, DropLog(ShardStats(stage="train", shard=0)), loader)
    return data.check_lengths(rows, lm, cfg.train.max_length, loader).tokens


def random_batches(n: int, batch: int, seed: int) -> list[list[int]]:
    g = torch.Generator()
    g.manual_seed(seed)
    order = torch.randperm(n, generator=g).tolist()
    return [order[i : i + batch] for i in range(0, n, batch)]


def train_once(pairs: Path, cfg: RunConfig, grouped: bool) -> dict[str, float]:
    run_cfg = cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"group_by_length": grouped})}
    )
    with tempfile.TemporaryDirectory(prefix="mia-bench-train-") as out:
        t0 = time.perf_counter()
        train_standalone(pairs, cfg.model.path, Path(out), run_cfg)
        seconds = time.perf_counter() - t0
        meta = json.loads((Path(out) / "metadata.json").read_text(encoding="utf-8"))
    losses = [h["loss"] for h in meta["log_history"] if "loss" in h]
    return {"seconds": seconds, "steps": meta["steps"], "final_loss": losses[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", default=".demo/store/runs/demo/select/pairs.trl.jsonl")
    ap.add_argument("--model", default=".demo/base")
    ap.add_argument("--config", default=None, help="run config (default: the demo's)")
    ap.add_argument("--rounds", type=int, default=1, help="each round trains both variants")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    pairs = Path(args.pairs)
    if not pairs.is_file():
        ap.error(f"--pairs {pairs}: not found (run `make demo` first, or name a pairs file)")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config) if args.config else demo_config(Path(".demo"))
    cfg = cfg.model_copy(
        update={"model": cfg.model.model_copy(update={"path": args.model, "device": "cpu"})}
    )
    lengths = row_lengths(pairs, cfg)
    batch = cfg.train.batch_size
    efficiency = {
        "random batches": padding_efficiency(lengths, random_batches(len(lengths), batch, 0)),
        "group_by_length": padding_efficiency(
            lengths, LengthGroupedBatches(lengths, batch, cfg.seed).batches()
        ),
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    for r in range(args.rounds):
        names = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
        for name in names:
            runs[name].append(train_once(pairs, cfg, VARIANTS[name]))
            print(f"round {r}: {name} {runs[name][-1]['seconds']:.1f} s", flush=True)
    print(
        f"\n{len(lengths)} rows, batch {batch}, {cfg.train.epochs:g} epochs, "
        f"{torch.get_num_threads()} torch threads, {args.rounds} rounds (median)\n"
    )
    print("| variant | seconds | steps | s/step | final loss | padding efficiency |")
    print("|---|---|---|---|---|---|")
    median = {n: statistics.median(x["seconds"] for x in runs[n]) for n in VARIANTS}
    for name in VARIANTS:
        last = runs[name][-1]
        print(
            f"| {name} | {median[name]:.1f} | {last['steps']:.0f} | "
            f"{median[name] / last['steps']:.2f} | {last['final_loss']:.4f} | "
            f"{efficiency[name]:.2f} |"
        )
    print(f"\nrandom / grouped time: {median['random batches'] / median['group_by_length']:.2f}x")


if __name__ == "__main__":
    main()
