"""The evidence study's fixed benchmark (bench/evidence.py): the evaluate stage's item
builder on a synthetic source of its own seed, cut to the items a right answer cannot
get by luck, and each model's right / wrong answer per item."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mia_dpo.answers import same_answer
from mia_dpo.config import load_config
from mia_dpo.controller import Controller
from mia_dpo.data.images import ImageLoader
from mia_dpo.demo.synthetic import write_synthetic
from mia_dpo.evaluation import EvalItem, evaluate_models
from mia_dpo.runtime.queue import MemoryQueue
from mia_dpo.runtime.store import BlobReader, LocalStore
from mia_dpo.stages import get_stage
from mia_dpo.stages.evaluate import read_items

EVAL_SEED = 9001  # the benchmark's own seed: the same items whatever the training seed


def eval_source_answers(src: Path) -> dict[str, str]:
    """Source-relative image path -> its answer, to tell which distractors share one."""
    return {
        r["image"]: r["conversations"][1]["value"]
        for r in json.loads((src / "data.json").read_text())
    }


def luck_free(item: EvalItem, answers: dict[str, str]) -> bool:
    return not any(same_answer(answers[d], item.answer) for d in item.distractor_images)


def build_benchmark(
    work: Path, base: Path, n_source: int, per_cell: int, recipe: dict[str, Any]
) -> tuple[Any, list]:
    """The fixed item set: the evaluate stage's builder on the evaluation source, run
    with the study's `recipe` (its evaluation settings)."""
    src = work / "eval-src"
    if not (src / "data.json").exists():
        write_synthetic(src, n_source, seed=EVAL_SEED)
    store = LocalStore(work / "eval-store")
    cfg = load_config(
        None,
        overrides={
            **recipe,
            "seed": EVAL_SEED,
            "model.path": str(base),
            "stages": ["evaluate"],
            "input.path": str(src / "data.json"),
            "input.image_root": str(src / "images"),
            "input.holdout_fraction": 0.99,
            "store.root": str(store.root),
        },
        environ={},
    )
    Controller(
        cfg, "benchmark", store, MemoryQueue(cfg.queue), stages=get_stage, progress=False
    ).run()
    answers = eval_source_answers(src)
    kept: dict[str, list[EvalItem]] = {}
    for it in read_items(store, "benchmark"):
        if it.format == "single" or luck_free(it, answers):
            kept.setdefault(it.format, []).append(it)
    items = [
        it
        for fmt in ("sequence", "grid", "pic_in_pic", "single")
        for it in kept.get(fmt, [])[:per_cell]
    ]
    return cfg, items


def correctness(cfg: Any, items: list[EvalItem], model: Any) -> list[bool]:
    blobs = ImageLoader(BlobReader(cfg.store), cfg.input.max_image_pixels)
    report_preds: list = []
    evaluate_models(
        items,
        lambda it: blobs.load_all(it.images, it.id),
        {"m": model},
        cfg,
        predictions=report_preds,
    )
    return [p.correct for p in report_preds]
