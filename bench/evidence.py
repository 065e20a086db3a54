"""Does MIA-DPO improve the model? Base vs MIA-DPO vs random selection vs SFT, several seeds.

    .venv/bin/python bench/evidence.py [--seeds 0 1 2] [--n 2400] [--out bench/results/evidence.md]

For each seed, on the tiny demo base model (`mia-dpo base-model`, trained on
single-image questions) and synthetic data with 20 % of the source samples held
out for evaluation:
  (a) base:        the base model, no training;
  (b) MIA-DPO:     augment -> generate -> score (attention) -> select -> DPO + LoRA;
  (c) random:      the same scored responses, rejected ones drawn at random, as many pairs;
  (d) SFT:         LoRA SFT on the chosen answers of the same pairs as (b).
(b), (c) and (d) share one augment/generate/score pass per seed (its outputs are
copied into their runs), so they differ only in selection or objective, and all
are evaluated on the same held-out items. Prints a table of mean and spread.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from mia_dpo.config import load_config
from mia_dpo.controller import Controller
from mia_dpo.demo.base_model import ensure_base_model
from mia_dpo.demo.synthetic import write_synthetic
from mia_dpo.runtime import layout
from mia_dpo.runtime.queue import MemoryQueue
from mia_dpo.runtime.store import LocalStore
from mia_dpo.stages import get_stage

# The tiny model's recipe: the paper's values where they transfer (beta, sigmoid loss,
# linear schedule, warm-up 0.1), sizes and rates scaled to a 1M-parameter model.
RECIPE: dict[str, Any] = {
    "input.holdout_fraction": 0.2,
    "input.shard_size": 200,
    "augment.grid_tile_px": 224,
    "generate.max_new_tokens": 6,
    "generate.batch_size": 32,
    "score.batch_size": 16,
    "train.lora_r": 16,
    "train.lora_alpha": 32,
    "train.learning_rate": 1e-4,
    "train.epochs": 1,
    "train.batch_size": 8,
    "train.gradient_accumulation_steps": 1,
    "train.max_length": 1024,
    "train.save_steps": 100,
    "evaluate.batch_size": 32,
    "evaluate.max_new_tokens": 6,
}
VARIANTS = {
    "MIA-DPO": {},
    "random selection": {"select.strategy": "random", "evaluate.compare_base": False},
    "SFT on chosen": {"train.method": "sft", "evaluate.compare_base": False},
}
SHARED_STAGES = ("plan", "augment", "generate", "score")


def run_variant(
    store: LocalStore, src: Path, base: Path, seed: int, name: str, first: str | None
) -> dict:
    overrides = {
        **RECIPE, **VARIANTS[name], "seed": seed, "model.path": str(base),
        "input.path": str(src / "data.json"), "input.image_root": str(src / "images"),
        "store.root": str(store.root),
    }  # fmt: skip
    cfg = load_config(None, overrides=overrides, environ={})
    run_id = f"s{seed}-{name.split()[0].lower().replace('-', '')}"
    if first is not None:  # reuse the first variant's augment/generate/score outputs
        for stage in SHARED_STAGES:
            src_dir = store.root / layout.stage_prefix(first, stage)
            shutil.copytree(
                src_dir, store.root / layout.stage_prefix(run_id, stage), dirs_exist_ok=True
            )
        store.put_json(
            layout.config_key(run_id),
            cfg.model_copy(update={"run_id": run_id}).model_dump(mode="json"),
        )
    t0 = time.perf_counter()
    Controller(cfg, run_id, store, MemoryQueue(cfg.queue), stages=get_stage, progress=False).run()
    report = store.get_json(layout.stage_prefix(run_id, "evaluate") + "report.json")
    return {"run_id": run_id, "seconds": time.perf_counter() - t0, "report": report}


def cells_of(report: dict, model: str) -> dict[str, float]:
    """{cell: accuracy} of one model in an EvalReport JSON."""
    return {name: c["accuracy"] for name, c in report["models"][model].items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n", type=int, default=2400, help="synthetic source samples")
    ap.add_argument("--base", default=".demo/base", help="cached base model folder")
    ap.add_argument("--out", default="bench/results/evidence.md")
    ap.add_argument("--work", default=None, help="keep the runs here (default: a temp dir)")
    args = ap.parse_args()
    base = ensure_base_model(Path(args.base))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mia-evidence-"))
    src = work / "src"
    if not (src / "data.json").exists():
        write_synthetic(src, args.n, seed=1234)
    store = LocalStore(work / "store")
    acc: dict[str, list[dict[str, float]]] = {"base": [], **{v: [] for v in VARIANTS}}
    runs = []
    for seed in args.seeds:
        first = None
        for name in VARIANTS:
            res = run_variant(store, src, base, seed, name, first)
            runs.append({"seed": seed, "variant": name, **res})
            if first is None:
                first = res["run_id"]
                acc["base"].append(cells_of(res["report"], "base"))
            acc[name].append(cells_of(res["report"], "adapted"))
            print(f"seed {seed} {name}: {res['seconds']:.0f}s", flush=True)
    cells = list(acc["base"][0])
    lines = [f"| variant | {' | '.join(cells)} |", "|---" * (len(cells) + 1) + "|"]
    for name, per_seed in acc.items():
        row = []
        for cell in cells:
            vals = [p[cell] for p in per_seed]
            spread = statistics.stdev(vals) if len(vals) > 1 else 0.0
            row.append(f"{statistics.mean(vals):.3f} ± {spread:.3f}")
        lines.append(f"| {name} | {' | '.join(row)} |")
    n_items = runs[0]["report"]["models"]["base"]
    table = "\n".join(lines)
    header = (
        f"Seeds {args.seeds}; {args.n} synthetic samples, 20 % held out; accuracy (exact match), "
        f"mean ± sample std over seeds. Items per cell (seed {args.seeds[0]}): "
        + ", ".join(f"{k} {v['n']}" for k, v in n_items.items())
    )
    print("\n" + header + "\n\n" + table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + "\n\n" + table + "\n", encoding="utf-8")
    (out.with_suffix(".json")).write_text(json.dumps(runs, indent=1, default=str), encoding="utf-8")


if __name__ == "__main__":
    main()
