"""The score stage (docs/method.md §3): where did the answer look?

For each response, one teacher-forced forward pass over prompt + response reads
ONE decoder layer's attention (or a calibrated band of layers, ratios averaged),
only for the rows that predict the response tokens (the rows generation produced
them from, since attention is causal) and
only the image-token columns, averaged over heads and rows. The ratio of that
attention falling on the target decides: below the format's threshold (and with
PPL > min_ppl, and not the ground truth itself) the response is *rejected*, the
ground truth *chosen*; otherwise the response is dropped with its reason.
The layer and thresholds are the paper's by default, or the calibrate stage's
(calibration.py) with `score.layer: auto` / `score.thresholds: calibrated`.
"""

from __future__ import annotations

import numpy as np

from mia_dpo.answers import same_answer
from mia_dpo.calibration import Calibration, as_tables
from mia_dpo.errors import NotFound, SampleError, UserError
from mia_dpo.models.ratios import attention_ratio, reject_by_attention
from mia_dpo.records import (
    AugmentedSample,
    GeneratedSample,
    Response,
    ScoredResponse,
    ShardStats,
    Task,
)
from mia_dpo.runtime import layout
from mia_dpo.runtime.context import DropLog, StageContext
from mia_dpo.stages.model_inputs import (  # noqa: F401 (Item, TeacherForced, teacher_forced: bench)
    MODEL_USE_LOCK,
    Item,
    TeacherForced,
    cached_model,
    load_images,
    score_batch_layers,
    teacher_forced,
    unscorable,
)


def read_calibration(ctx: StageContext, run_id: str) -> Calibration:
    """The run's calibration.json; a one-line UserError when the calibrate stage has not
    written it (a run resumed with `stages` that leave calibrate out, say)."""
    try:
        return Calibration.model_validate_json(ctx.store.get_text(layout.calibration_key(run_id)))
    except NotFound:
        raise UserError(
            f"score.layer {ctx.config.score.layer!r} / score.thresholds "
            f"{ctx.config.score.thresholds!r} need the calibrate stage's calibration.json, "
            f"which run {run_id!r} does not have: run `mia-dpo calibrate --run-id {run_id}` "
            "or add calibrate to stages"
        ) from None


def scoring_layers(
    ctx: StageContext, run_id: str, num_layers: int
) -> tuple[list[int], Calibration | None]:
    """(every layer read, the calibration if configured). A format's ratios average its
    band (`band_of`): the calibrated one, or all layers read."""
    scfg = ctx.config.score
    cal = read_calibration(ctx, run_id) if scfg.needs_calibration else None
    if scfg.layer == "auto":
        assert cal is not None
        layers = sorted({i for band in (cal.layers, *cal.format_layers.values()) for i in band})
    else:
        layers = [scfg.layer if scfg.layer is not None else num_layers // 2]
    if layers[-1] >= num_layers:
        raise UserError(f"score.layer: {layers[-1]} but the model has {num_layers} decoder layers")
    return layers, cal


def run_shard(task: Task, ctx: StageContext) -> ShardStats:
    scfg = ctx.config.score
    stats = ShardStats(stage="score", shard=task.shard)
    drops = DropLog(stats)
    rows: dict[tuple[int, int], str] = {}  # (line, response) -> record: input order
    lm = cached_model(ctx)
    layers, cal = scoring_layers(ctx, task.run_id, lm.num_layers)
    seq_thr, grid_thr, pip_thr = as_tables(cal, scfg)

    def band_of(fmt: str) -> list[int]:
        return cal.layers_for(fmt) if cal is not None and scfg.layer == "auto" else layers

    todo: list[tuple[int, AugmentedSample, Response, int]] = []

    def emit(n, sample, idx, response, decision, reason, ratio=None, shares=(), att=(), thr=None):  # type: ignore[no-untyped-def]
        rec = ScoredResponse(  # the record's `layer`: its band's first
            sample=sample, response_index=idx, response=response,
            layer=band_of(sample.format)[0], ratio=ratio,
            image_shares=[round(x, 6) for x in shares],
            token_attention=[round(float(x), 8) for x in att] if scfg.keep_token_attention else [],
            threshold=thr, decision=decision, reason=reason,
        )  # fmt: skip
        rows[(n, idx)] = rec.model_dump_json()
        if decision == "rejected":
            stats.kept += 1
        else:
            drops.drop(
                f"{sample.sample_id}-r{idx}", reason, f"ratio={ratio}, ppl={response.ppl:.3f}"
            )

    lines = ctx.store.get_jsonl(layout.shard_key(task.run_id, "generate", task.shard))
    # Shard threads of one process share the model and its tokenizer, whose padding and
    # truncation state a fast tokenizer changes on every call: the checks below encode too.
    with MODEL_USE_LOCK:
        for n, line in enumerate(lines):
            gen = GeneratedSample.model_validate_json(line)
            for idx, response in enumerate(gen.responses):
                stats.total += 1
                if not response.text.strip():
                    emit(n, gen.sample, idx, response, "dropped", "empty_response")
                elif same_answer(response.text, gen.sample.chosen):
                    emit(n, gen.sample, idx, response, "dropped", "equals_ground_truth")
                elif reason := unscorable(lm, gen.sample, response):
                    emit(n, gen.sample, idx, response, "dropped", reason)
                else:
                    todo.append((n, gen.sample, response, idx))
    with MODEL_USE_LOCK:
        for i in range(0, len(todo), scfg.batch_size):
            batch = todo[i : i + scfg.batch_size]
            items = []
            for n, sample, response, idx in batch:
                try:
                    items.append((n, sample, load_images(ctx, sample, lm), response, idx))
                except SampleError as e:
                    emit(n, sample, idx, response, "dropped", e.reason)
            if not items:
                continue
            results = score_batch_layers(lm, [(s, im, r) for _, s, im, r, _ in items], layers)
            for (n, sample, _, response, idx), (per_layer, images) in zip(
                items, results, strict=True
            ):
                pictures = [t.picture for t in images]
                per_layer = [per_layer[layers.index(i)] for i in band_of(sample.format)]
                # a band: its layers' ratios (and shares) averaged
                measured = [
                    attention_ratio(sample, att, pictures, scfg.pip_border_fraction)
                    for att in per_layer
                ]
                if len(measured) == 1:
                    (ratio, shares), token_att = measured[0], per_layer[0]
                else:
                    ratio = float(np.mean([r for r, _ in measured]))
                    shares = np.mean([sh for _, sh in measured], axis=0).tolist()
                    token_att = np.mean(per_layer, axis=0)
                confused, thr = reject_by_attention(
                    sample.format, sample.n_images, ratio, seq_thr, grid_thr, pip_thr
                )
                if not confused:
                    decision, reason = "dropped", "attention_ok"
                elif response.ppl <= scfg.min_ppl:
                    decision, reason = "dropped", "low_ppl"
                else:
                    decision, reason = "rejected", "attention"
                emit(n, sample, idx, response, decision, reason, ratio, shares, token_att, thr)
    ordered = [rows[k] for k in sorted(rows)]
    ctx.store.put_jsonl(layout.shard_key(task.run_id, "score", task.shard), ordered)
    drops.write(ctx.store, task)
    return stats
