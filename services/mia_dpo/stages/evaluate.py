"""The evaluate stage: the base model and the trained adapter answer the same
held-out multi-image questions (docs/method.md §6, on our own data).

1. Benchmark. The plan step held some source samples out (they never reach augment,
   the pairs or training). Each becomes one item per format in `evaluate.formats`,
   built by the augment code itself with the format forced, the image count drawn
   from the augment mix, distractors from the held-out pools only, and draws seeded
   by (seed, "eval", format, id), so they are not the training draws; plus, with
   `evaluate.single_image`, its question about its image alone.
2. Models. The base model, and base + LoRA adapter when the train stage left one at
   `runs/{run}/train/adapter/`; both answer identical inputs, greedy.
3. Score. Normalised exact match, per format, per image count, single image and all
   multi-image items; report.json / report.md / predictions.jsonl; the adapter's model
   card (train/adapter/README.md) is rewritten with the table.
"""

from __future__ import annotations

import gc
import json
import tempfile
from pathlib import Path

import torch
from PIL import Image

from mia_dpo import model_card
from mia_dpo.augmentation.sampler import augment_sample, source_images
from mia_dpo.data.source import parse_sample
from mia_dpo.errors import NotFound, SampleError, UserError
from mia_dpo.evaluation import (
    EvalItem,
    ImagesLoader,
    ModelLike,
    Prediction,
    evaluate_models,
    format_report,
    load_adapter_model,
)
from mia_dpo.prompts import IMAGE_TAG, strip_image_tag
from mia_dpo.records import FORMATS, ShardStats, Task
from mia_dpo.runtime import layout
from mia_dpo.runtime.context import DropLog, StageContext
from mia_dpo.runtime.store import Store
from mia_dpo.stages.model_inputs import MODEL_USE_LOCK, cached_model, read_images


def eval_salt(fmt: str) -> str:
    """Seed salt of a benchmark item: its draws differ from the augment stage's."""
    return f"eval\x00{fmt}\x00"


# --- 1. the benchmark ---------------------------------------------------------------


def build_benchmark(ctx: StageContext, run_id: str, drops: DropLog) -> list[EvalItem]:
    """Items from the held-out rows, in row order then format order; an item that
    cannot be built is dropped with its reason (one drop per item, so that
    total = kept + dropped)."""
    cfg = ctx.config
    try:
        rows = ctx.store.get_jsonl(layout.holdout_key(run_id))
        pools: dict[str, list[str]] = ctx.store.get_json(layout.holdout_pools_key(run_id))
    except NotFound:
        raise UserError(
            f"run {run_id!r} has no held-out samples file: it was planned before "
            "input.holdout_fraction existed; start a new run"
        ) from None
    formats = [f for f in FORMATS if f in cfg.evaluate.formats]  # canonical order, no repeats
    kinds = [*formats, *(["single"] if cfg.evaluate.single_image else [])]
    loader = source_images(ctx.blobs, cfg.input)
    image_prefix = layout.evaluate_key(run_id, "images")
    items: list[EvalItem] = []
    for row in rows:
        rec = json.loads(row)
        raw = rec["raw"]
        raw_id = raw.get("id") if isinstance(raw, dict) else None
        label = str(raw_id) if raw_id not in (None, "") else f"line-{rec['line']}"
        try:
            sample = parse_sample(raw, rec["line"])
        except SampleError as e:
            for kind in kinds:
                drops.drop(f"{label}-{kind}", e.reason, e.detail)
            continue
        for fmt in formats:
            try:
                aug, _ = augment_sample(
                    sample, pools, loader, ctx.store, image_prefix, cfg,
                    fmt=fmt, salt=eval_salt(fmt),
                )  # fmt: skip
            except SampleError as e:
                drops.drop(f"{sample.id}-{fmt}", e.reason, e.detail)
                continue
            items.append(
                EvalItem(
                    id=aug.sample_id,
                    source_id=sample.id,
                    format=fmt,
                    n_images=aug.n_images,
                    images=aug.images,
                    prompt=aug.prompt,
                    answer=aug.chosen,
                    target_index=aug.target_index,
                    distractor_images=aug.distractor_images,
                )
            )
        if cfg.evaluate.single_image:
            try:
                loader.load(sample.image)  # the same checks a multi-image target gets
            except SampleError as e:
                drops.drop(f"{sample.id}-single", e.reason, e.detail)
                continue
            items.append(
                EvalItem(
                    id=f"{sample.id}-single",
                    source_id=sample.id,
                    format="single",
                    n_images=1,
                    images=[loader.uri(sample.image)],
                    prompt=f"{IMAGE_TAG}\n{strip_image_tag(sample.turns[0].question)}",
                    answer=sample.turns[0].answer,
                )
            )
    return items


def read_items(store: Store, run_id: str) -> list[EvalItem]:
    """The benchmark a finished evaluate stage built, for scoring other adapters."""
    return [
        EvalItem.model_validate_json(r)
        for r in store.get_jsonl(layout.evaluate_key(run_id, "items.jsonl"))
    ]


def blob_images(ctx: StageContext) -> ImagesLoader:
    """Decoded RGB images of an item, read where its record points. No noise: the
    generation-time perturbation provokes confusion, evaluation must not."""

    def load(item: EvalItem) -> list[Image.Image]:
        return read_images(ctx, item.images, item.id)

    return load


# --- 2. the models ------------------------------------------------------------------


def download_adapter(store: Store, run_id: str, dest: Path) -> None:
    prefix = layout.adapter_prefix(layout.train_prefix(run_id))
    for key in store.list(prefix):
        path = dest / key[len(prefix) :]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(store.get_bytes(key))


# --- the stage ----------------------------------------------------------------------


def run_shard(task: Task, ctx: StageContext) -> ShardStats:
    cfg, run_id, store = ctx.config, task.run_id, ctx.store
    stats = ShardStats(stage="evaluate", shard=task.shard)
    drops = DropLog(stats)
    items = build_benchmark(ctx, run_id, drops)
    stats.total = len(items) + sum(stats.dropped.values())
    if not items:
        raise UserError(
            f"evaluate: run {run_id!r} has no benchmark items "
            f"({stats.total} dropped: {stats.dropped}); set input.holdout_fraction > 0"
        )
    store.put_jsonl(
        layout.evaluate_key(run_id, "items.jsonl"), [it.model_dump_json() for it in items]
    )

    adapter_config = layout.adapter_prefix(layout.train_prefix(run_id)) + "adapter_config.json"
    has_adapter = store.exists(adapter_config)
    predictions: list[Prediction] = []
    with MODEL_USE_LOCK:  # inline workers share the cached base model
        models: dict[str, ModelLike] = {}
        if cfg.evaluate.compare_base or not has_adapter:
            models["base"] = cached_model(ctx)
        if has_adapter:
            with tempfile.TemporaryDirectory(prefix="mia-dpo-adapter-") as tmp:
                download_adapter(store, run_id, Path(tmp))
                models["adapted"] = load_adapter_model(cfg.model, Path(tmp))
        report = evaluate_models(
            items,
            blob_images(ctx),
            models,
            cfg,
            adapter=store.uri(adapter_config).rsplit("/", 1)[0] if has_adapter else None,
            predictions=predictions,
        )
        del models  # the adapted copy is ours alone: free it before the next task
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    store.put_jsonl(
        layout.evaluate_key(run_id, "predictions.jsonl"), [p.model_dump_json() for p in predictions]
    )
    store.put_json(layout.evaluate_key(run_id, "report.json"), report.model_dump(mode="json"))
    store.put_text(layout.evaluate_key(run_id, "report.md"), format_report(report))
    train = layout.train_prefix(run_id)
    if has_adapter and store.exists(layout.train_metadata_key(train)):
        # The card the train stage wrote said "not evaluated": now the table exists.
        model_card.write_card(store, run_id, train)
    drops.write(store, task)
    stats.kept = len(items)
    for it in items:
        key = f"items_{it.format}"
        stats.notes[key] = stats.notes.get(key, 0) + 1
    stats.notes["models"] = len(report.models)
    stats.notes["adapter"] = int(has_adapter)
    return stats
