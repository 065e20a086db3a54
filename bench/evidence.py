"""Does MIA-DPO improve the model? Every selection variant against the base, paired, on one
fixed benchmark, over several training seeds.

    .venv/bin/python bench/evidence.py [--seeds 0 1 2] [--quick] [--work DIR] [--base DIR]
        [--set KEY=VALUE ...] [--variants NAME ...] [--jobs 2]

The protocol (issue 12):
- one evaluation set, fixed across training seeds: its own synthetic source (seed
  EVAL_SEED, never trained on) run through the evaluate stage's benchmark builder, then
  only the items where no distractor shares the target's answer (a right answer is
  never luck), at most --per-cell items per main cell (sequence, grid, pic-in-pic, single);
- per training seed, one augment/generate pass shared by every variant (copied into
  each variant's run), so variants differ only in scoring, selection or objective;
- every variant answers the same items as the base; a cell's result is the paired
  difference (variant - base) with a 95 % bootstrap interval that resamples items and
  seeds, and the per-seed deltas are kept too;
- variants: MIA-DPO with the paper's layer and thresholds, MIA-DPO calibrated, random
  (any scored answer, right or wrong, as many pairs as calibrated), random_wrong (only
  wrong answers), ppl_only (no attention rule), SFT on the calibrated pairs' chosen
  answers, calibrated MIA-DPO + label balance (SFT-only rows, sft_weight 1), and its
  controls: random (any answer) and random_wrong, each + the same label balance.

Writes <out>.md (table and the reading), <out>.json (every figure) and <out>.png.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evidence_benchmark import EVAL_SEED, build_benchmark, correctness
from evidence_report import CELLS, CONTRASTS, CONTROLS, render

from mia_dpo.config import load_config
from mia_dpo.controller import Controller
from mia_dpo.demo.base_model import ensure_base_model, read_report
from mia_dpo.demo.synthetic import write_synthetic
from mia_dpo.evaluation import EvalItem, load_adapter_model
from mia_dpo.models.loading import load_model
from mia_dpo.paired import seeds_paired_delta
from mia_dpo.runtime import layout
from mia_dpo.runtime.queue import MemoryQueue
from mia_dpo.runtime.store import LocalStore
from mia_dpo.stages import get_stage

TRAIN_SOURCE_SEED = 1234
# The tiny model's recipe: the paper's values where they transfer (beta, sigmoid loss,
# linear schedule, warm-up 0.1), sizes and rates scaled to a 1M-parameter model.
RECIPE: dict[str, Any] = {
    "input.shard_size": 200,
    "augment.grid_tile_px": 224,
    "generate.max_new_tokens": 6,
    "generate.batch_size": 32,
    "calibrate.batch_size": 16,
    "score.batch_size": 16,
    "train.lora_r": 16,
    "train.lora_alpha": 32,
    # the demo's since 2026-12-06 (bench/results/evidence-previous-base.md ran 1e-4 x 1
    # epoch, one layer for all formats, on the previous base)
    "calibrate.layer_per": "format",
    "train.learning_rate": 5e-4,
    "train.epochs": 2,
    "train.batch_size": 8,
    "train.gradient_accumulation_steps": 1,
    "train.max_length": 1024,
    # the demo's since 2026-12-07: rows of one image count share a batch (1.98x faster
    # training, bench/train_batching.py; evidence-random-batches.md ran without it)
    "train.group_by_length": True,
    "train.save_steps": 1000,
    "evaluate.batch_size": 32,
    "evaluate.max_new_tokens": 6,
}
CALIBRATED = {"score.layer": "auto", "score.thresholds": "calibrated"}
BALANCE = {"select.label_balance": True, "train.sft_weight": 1.0}
FIRST = "MIA-DPO calibrated"  # every other variant copies this run's stages
# name -> (overrides, the run whose stage outputs it reuses, the stages it reuses)
VARIANTS: dict[str, tuple[dict[str, Any], str | None, tuple[str, ...]]] = {
    FIRST: (CALIBRATED, None, ()),
    "MIA-DPO paper": ({}, FIRST, ("plan", "augment", "generate")),
    "random (any answer)": (
        {**CALIBRATED, "select.strategy": "random"}, FIRST,
        ("plan", "augment", "generate", "calibrate", "score"),
    ),
    "random_wrong": (
        {**CALIBRATED, "select.strategy": "random_wrong"}, FIRST,
        ("plan", "augment", "generate", "calibrate", "score"),
    ),
    "ppl_only": (
        {**CALIBRATED, "select.strategy": "ppl_only"}, FIRST,
        ("plan", "augment", "generate", "calibrate", "score"),
    ),
    "SFT on chosen": (
        {**CALIBRATED, "train.method": "sft"}, FIRST,
        ("plan", "augment", "generate", "calibrate", "score", "select"),
    ),
    "MIA-DPO calibrated + label balance": (
        {**CALIBRATED, **BALANCE}, FIRST,
        ("plan", "augment", "generate", "calibrate", "score"),
    ),
    # label balance's own control: the same SFT-only rows beside randomly drawn pairs
    "random (any answer) + label balance": (
        {**CALIBRATED, **BALANCE, "select.strategy": "random"}, FIRST,
        ("plan", "augment", "generate", "calibrate", "score"),
    ),
    "random_wrong + label balance": (
        {**CALIBRATED, **BALANCE, "select.strategy": "random_wrong"}, FIRST,
        ("plan", "augment", "generate", "calibrate", "score"),
    ),
}  # fmt: skip


def run_id_of(seed: int, name: str) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    return f"s{seed}-{'-'.join(p for p in slug.split('-') if p)}"[:63]


def train_variant(
    store: LocalStore, src: Path, base: Path, seed: int, name: str, extra: dict[str, Any]
) -> dict:
    overrides, reuse, stages = VARIANTS[name]
    cfg = load_config(
        None,
        overrides={
            **RECIPE,
            **extra,
            **overrides,
            "seed": seed,
            "model.path": str(base),
            "stages": ["augment", "generate", "score", "select", "train"],
            "input.path": str(src / "data.json"),
            "input.image_root": str(src / "images"),
            "store.root": str(store.root),
        },
        environ={},
    )
    run_id = run_id_of(seed, name)
    if reuse is not None and not store.exists(layout.stage_done_key(run_id, "train")):
        first = run_id_of(seed, reuse)
        for stage in stages:  # reuse finished outputs: the controller skips those stages
            dest = store.root / layout.stage_prefix(run_id, stage)
            shutil.copytree(
                store.root / layout.stage_prefix(first, stage), dest, dirs_exist_ok=True
            )
            # records name their images by URI; a worker reads only its own run's
            for path in dest.rglob("*.jsonl"):
                text = path.read_text(encoding="utf-8")
                path.write_text(text.replace(f"/runs/{first}/", f"/runs/{run_id}/"), "utf-8")
    t0 = time.perf_counter()
    Controller(cfg, run_id, store, MemoryQueue(cfg.queue), stages=get_stage, progress=False).run()
    out: dict[str, Any] = {"run_id": run_id, "train_seconds": time.perf_counter() - t0}
    stats = store.get_json(layout.stage_stats_key(run_id, "select"))
    out["pairs"], out["select_notes"] = stats["kept"], stats.get("notes", {})
    if store.exists(layout.calibration_key(run_id)) and reuse is None:
        cal = store.get_json(layout.calibration_key(run_id))
        out["calibration"] = {
            k: cal.get(k)
            for k in ("layers", "format_layers", "format_auc", "auc", "auc_by_layer",
                      "best_auc", "separates")
        }  # fmt: skip
        out["thresholds"] = {f"{c['format']}/{c['n_images']}": c["threshold"] for c in cal["cells"]}
    out["cfg"] = cfg
    return out


@dataclass(frozen=True)
class Job:
    """What every (seed, variant) task needs; pickled to the worker processes."""

    store_root: Path
    src: Path
    base: Path
    extra: dict[str, Any]
    cfg: Any  # the benchmark's run config (evaluation settings)
    items: list[EvalItem]


def study_one(
    job: Job, seed: int, name: str, threads: int | None = None
) -> tuple[dict, list[bool]]:
    """Train one variant for one seed, then answer the benchmark with its adapter, on
    `threads` torch threads (None: as many as the process has)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    store = LocalStore(job.store_root)
    res = train_variant(store, job.src, job.base, seed, name, job.extra)
    vcfg = res.pop("cfg")
    adapter = store.root / layout.adapter_prefix(layout.train_prefix(res["run_id"]))
    t0 = time.perf_counter()
    right = correctness(job.cfg, job.items, load_adapter_model(vcfg.model, adapter))
    res["eval_seconds"] = time.perf_counter() - t0
    print(f"seed {seed} {name}: {res['pairs']} pairs, {res['train_seconds']:.0f}s "
          f"+ eval {res['eval_seconds']:.0f}s", flush=True)  # fmt: skip
    return res, right


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def run_all(
    job: Job, seeds: list[int], names: list[str], jobs: int
) -> dict[tuple[int, str], tuple[dict, list[bool]]]:
    """Every (seed, variant), `jobs` at a time. A seed's calibrated run goes first: the
    others copy its stages, so they are submitted when it has finished."""
    if jobs == 1:  # in this process, as before --jobs existed
        return {(s, n): study_one(job, s, n) for s in seeds for n in names}
    out: dict[tuple[int, str], tuple[dict, list[bool]]] = {}
    # spawn, not fork: a forked child of a process that has run torch can hang in OpenMP
    ctx = multiprocessing.get_context("spawn")
    # Fewer seeds than processes (--quick): the calibrated runs would leave cores idle
    # until they finish, so they share them; their dependants get one thread each.
    first_threads = max(1, jobs // len(seeds))
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_one_thread) as pool:
        pending = {pool.submit(study_one, job, s, FIRST, first_threads): (s, FIRST) for s in seeds}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                seed, name = pending.pop(fut)
                out[seed, name] = fut.result()
                if name == FIRST:
                    for other in names:
                        if other != FIRST:
                            task = pool.submit(study_one, job, seed, other, 1)
                            pending[task] = (seed, other)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--quick", action="store_true", help="one seed, 300 items per cell")
    ap.add_argument("--n", type=int, default=2400, help="synthetic training source samples")
    ap.add_argument("--eval-n", type=int, default=1400, help="evaluation source samples")
    ap.add_argument("--per-cell", type=int, default=600, help="items per main cell, at most")
    ap.add_argument(
        "--base",
        default=".demo/base",
        help="base model folder (mia-dpo base-model --out): used with the parameters it was "
        "trained with; trained with the recipe's defaults when missing",
    )
    ap.add_argument(
        "--out", default=None, help="results path stem (default bench/results/evidence)"
    )
    ap.add_argument("--work", default=None, help="keep the runs here (default: a temp dir)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a run-config override for every variant (a variant's own keys win), "
        "repeatable: --set calibrate.layer_per=format",
    )
    ap.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=list(VARIANTS),
        metavar="NAME",
        help="study only these variants (MIA-DPO calibrated always runs: the others reuse "
        "its stages); default all",
    )
    ap.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="variants trained at once, each in its own process with one torch thread "
        "(default 2: the tiny model's small matrices keep two threads of one process "
        "busy only part of the time)",
    )
    args = ap.parse_args()
    if args.jobs < 1:
        ap.error(f"--jobs {args.jobs}: expected at least 1")
    names = [n for n in VARIANTS if n in args.variants or n == FIRST]
    extra = dict(item.partition("=")[::2] for item in args.set)
    if bad := [item for item in args.set if "=" not in item or item.startswith("=")]:
        ap.error(f"--set {bad[0]}: expected KEY=VALUE")
    if args.quick:
        args.seeds, args.per_cell, args.eval_n = args.seeds[:1], min(args.per_cell, 300), 700
    stem = Path(
        args.out or ("bench/results/evidence-quick" if args.quick else "bench/results/evidence")
    )
    t_start = time.perf_counter()
    # A folder trained with other parameters (mia-dpo base-model --attention-supervision
    # ...) is studied as it is; only a missing or older-recipe folder trains the default.
    cached = read_report(args.base)
    base = ensure_base_model(Path(args.base), **(cached.params.model_dump() if cached else {}))
    report = read_report(base)  # read now: the folder may change while the study runs
    assert report is not None  # ensure_base_model has just written or checked it
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mia-evidence-"))
    cfg, items = build_benchmark(work, base, args.eval_n, args.per_cell, RECIPE)
    base_right = correctness(cfg, items, load_model(cfg.model))
    print(f"benchmark: {len(items)} items, base right {sum(base_right)}", flush=True)
    src = work / "src"
    if not (src / "data.json").exists():
        write_synthetic(src, args.n, seed=TRAIN_SOURCE_SEED)
    done = run_all(Job(work / "store", src, base, extra, cfg, items), args.seeds, names, args.jobs)
    right = {name: [done[seed, name][1] for seed in args.seeds] for name in names}
    runs = [{"seed": s, "variant": n, **done[s, n][0]} for s in args.seeds for n in names]
    results = summarise(items, base_right, right)
    results.update(
        jobs=args.jobs,
        seeds=args.seeds, n_train_source=args.n, eval_seed=EVAL_SEED, runs=runs, overrides=extra,
        base_model=report.model_dump(include={"params", "accuracy", "attention_auc"}),
        minutes=(time.perf_counter() - t_start) / 60,
    )  # fmt: skip
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(
        json.dumps(results, indent=1, default=str), encoding="utf-8"
    )
    md, png = render(results)
    stem.with_suffix(".md").write_text(md, encoding="utf-8")
    stem.with_suffix(".png").write_bytes(png)
    print("\n" + md)


def summarise(items: list[EvalItem], base: list[bool], right: dict[str, list[list[bool]]]) -> dict:
    """Per cell: base accuracy, each variant's paired delta over items and seeds."""
    cells: dict[str, list[int]] = {c: [] for c in CELLS}
    for i, it in enumerate(items):
        cells["single" if it.format == "single" else "multi_image"].append(i)
        if it.format != "single":
            cells[it.format].append(i)
    out: dict[str, Any] = {"n": {c: len(ix) for c, ix in cells.items()}, "base": {}, "delta": {}}
    for c, ix in cells.items():
        out["base"][c] = sum(base[i] for i in ix) / max(len(ix), 1)
    pairs = [(name, "base") for name in right] + [
        (name, ref)
        for table in (CONTROLS, CONTRASTS)
        for name, refs in table.items()
        for ref in refs
        if name in right and ref in right  # a study of fewer variants compares what ran
    ]
    for name, ref in pairs:
        key = name if ref == "base" else f"{name} - {ref}"
        out["delta"][key] = {}
        for c, ix in cells.items():
            runs = [[s[i] for i in ix] for s in right[name]]
            refs = [[base[i] for i in ix]] * len(runs) if ref == "base" else [
                [s[i] for i in ix] for s in right[ref]
            ]  # fmt: skip
            d = seeds_paired_delta(refs, runs)
            out["delta"][key][c] = {**d.model_dump(), "per_seed": [
                (sum(r) - sum(b)) / max(len(ix), 1) for r, b in zip(runs, refs, strict=True)
            ]}  # fmt: skip
    return out


if __name__ == "__main__":
    main()
