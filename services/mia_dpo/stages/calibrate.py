"""The calibrate stage (docs/method.md §3a; beyond the paper): which layer's attention
tells this model's right answers from its wrong ones, and where the thresholds lie.

One task over the run, between generate and score. It reads a deterministic slice
of the generated answers (`calibrate.max_answers`, spread over every shard by a hash
of (seed, sample, response)), keeps those whose correctness is known
(`calibration.correctness`), teacher-forces them exactly as the score stage does,
reading every decoder layer in the same pass, and hands the target's share per
layer to `calibration.calibrate`. Outputs, under runs/R/calibrate/:
calibration.json (the score stage reads it), auc_by_layer.png (the report shows it)
and observations.jsonl (the shares per layer, to recompute or plot elsewhere).
"""

from __future__ import annotations

from typing import Any

from mia_dpo.calibration import Observation, calibrate, correctness
from mia_dpo.calibration_plot import auc_plot_png
from mia_dpo.errors import SampleError
from mia_dpo.models.ratios import attention_ratio
from mia_dpo.records import AugmentedSample, GeneratedSample, Response, ShardStats, Task
from mia_dpo.runtime import layout
from mia_dpo.runtime.context import DropLog, StageContext
from mia_dpo.stages.model_inputs import (
    MODEL_USE_LOCK,
    cached_model,
    load_images,
    sample_seed,
    score_batch_layers,
    unscorable,
)

Candidate = tuple[AugmentedSample, Response, int, bool]  # sample, answer, index, right?


def generate_shard_keys(ctx: StageContext, run_id: str) -> list[str]:
    keys = [
        k
        for k in ctx.store.list(layout.stage_prefix(run_id, "generate") + "shard-")
        if k.endswith(".jsonl") and not k.endswith(".dropped.jsonl")
    ]
    return sorted(keys, key=lambda k: int(k.rsplit("shard-", 1)[1].split(".", 1)[0]))


def answer_slice(ctx: StageContext, run_id: str, drops: DropLog) -> tuple[list[Candidate], int]:
    """(the slice of answers with known correctness, how many were of unknown correctness).
    The slice is the `max_answers` answers with the smallest hash of (seed, id): the same
    whatever the sharding, and a fair draw over formats and image counts."""
    known: list[tuple[int, Candidate]] = []
    unknown = 0
    for key in generate_shard_keys(ctx, run_id):
        for line in ctx.store.get_jsonl(key):
            gen = GeneratedSample.model_validate_json(line)
            for idx, response in enumerate(gen.responses):
                drops.stats.total += 1
                right = correctness(response.text, gen.sample.chosen)
                if right is None:
                    unknown += 1
                    continue
                rank = sample_seed(ctx.config.seed, f"calibrate:{gen.sample.sample_id}:{idx}")
                known.append((rank, (gen.sample, response, idx, right)))
    known.sort(key=lambda t: t[0])
    return [c for _, c in known[: ctx.config.calibrate.max_answers]], unknown


def measure(ctx: StageContext, lm: Any, todo: list[Candidate], drops: DropLog) -> list[Observation]:
    """The target's share at every decoder layer, one teacher-forced pass per batch."""
    layers = list(range(lm.num_layers))
    pip_border = ctx.config.score.pip_border_fraction
    out: list[Observation] = []
    size = ctx.config.calibrate.batch_size
    with MODEL_USE_LOCK:
        for i in range(0, len(todo), size):
            items = []
            for sample, response, idx, right in todo[i : i + size]:
                if reason := unscorable(lm, sample, response):
                    drops.drop(f"{sample.sample_id}-r{idx}", reason, "not teacher-forced")
                    continue
                try:
                    items.append((sample, load_images(ctx, sample, lm), response, right))
                except SampleError as e:
                    drops.drop(f"{sample.sample_id}-r{idx}", e.reason, str(e))
            if not items:
                continue
            results = score_batch_layers(lm, [(s, im, r) for s, im, r, _ in items], layers)
            for (sample, _, _, right), (per_layer, images) in zip(items, results, strict=True):
                pictures = [t.picture for t in images]
                ratios = [
                    attention_ratio(sample, att, pictures, pip_border)[0] for att in per_layer
                ]
                out.append(Observation(
                    format=sample.format, n_images=sample.n_images, right=right,
                    ratios=[round(r, 6) for r in ratios],
                ))  # fmt: skip
    return out


def run_shard(task: Task, ctx: StageContext) -> ShardStats:
    if task.shard != 0:
        raise ValueError(f"calibrate runs as one task over the run (shard 0), got {task.shard}")
    stats = ShardStats(stage="calibrate", shard=0)
    drops = DropLog(stats)
    todo, unknown = answer_slice(ctx, task.run_id, drops)
    for reason, count in (
        ("correctness_unknown", unknown),
        ("outside_slice", stats.total - unknown - len(todo)),
    ):
        if count:
            stats.dropped[reason] = count  # fmt: skip
    lm = cached_model(ctx)
    observations = measure(ctx, lm, todo, drops)
    layer = ctx.config.score.layer
    cal = calibrate(
        observations, lm.num_layers, ctx.config.calibrate, ctx.config.score,
        fixed_layer=None if layer == "auto" else (layer if layer is not None
                                                  else lm.num_layers // 2),
        n_unknown=unknown,
    )  # fmt: skip
    stats.kept = len(observations)
    stats.notes.update(right=cal.n_right, wrong=cal.n_wrong, layer=cal.layers[0],
                       auc_x1000=round(1000 * (cal.auc or 0)))  # fmt: skip
    (ctx.log.info if cal.separates else ctx.log.warning)("calibrate: %s", cal.summary())
    ctx.store.put_jsonl(
        layout.calibration_key(task.run_id, "observations.jsonl"),
        [o.model_dump_json() for o in observations],
    )
    ctx.store.put_bytes(layout.calibration_key(task.run_id, "auc_by_layer.png"), auc_plot_png(cal))
    # written last: the score stage reads it
    ctx.store.put_text(layout.calibration_key(task.run_id), cal.model_dump_json(indent=1))
    drops.write(ctx.store, task)
    return stats
