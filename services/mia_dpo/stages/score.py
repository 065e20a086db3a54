"""The score stage (docs/method.md §3): where did the answer look?

For each response, one teacher-forced forward pass over prompt + response reads
ONE decoder layer's attention, only for the rows that predict the response
tokens (the rows generation produced them from, since attention is causal) and
only the image-token columns, averaged over heads and rows. The ratio of that
attention falling on the target decides: below the format's threshold (and with
PPL > min_ppl, and not the ground truth itself) the response is *rejected*, the
ground truth *chosen*; otherwise the response is dropped with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mia_dpo.answers import same_answer
from mia_dpo.errors import SampleError, UserError
from mia_dpo.models.attention import capture_layer_attention
from mia_dpo.models.prompting import batch_inputs, reproduces
from mia_dpo.models.ratios import attention_ratio, reject_by_attention
from mia_dpo.models.spans import ImageTokens
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
from mia_dpo.stages.model_inputs import MODEL_USE_LOCK, cached_model, load_images


@dataclass
class TeacherForced:
    """A left-padded batch of prompt + generated answer, ready for the model."""

    inputs: dict[str, Any]  # every processor output, on the model's device
    rows: list[tuple[int, int]]  # per item: the query rows that predict its answer
    images: list[list[ImageTokens]]  # per item: its images' columns in the padded batch


Item = tuple[AugmentedSample, list[Any], Response]  # sample, its model images, a response


def teacher_forced(lm: Any, items: list[Item]) -> TeacherForced:
    """The prompts through one processor call, as at generation (images nested per
    prompt); each response's generated ids appended, and every per-token output of the
    processor (token_type_ids...) grown with the family's value for answer tokens."""
    enc = batch_inputs(lm, [s.prompt for s, _, _ in items], [im for _, im, _ in items])
    prompt_ids, prompt_mask = enc["input_ids"].cpu(), enc["attention_mask"].cpu().bool()
    per_token = [
        k for k, v in enc.items()
        if k not in ("input_ids", "attention_mask")
        and isinstance(v, torch.Tensor) and v.shape == prompt_ids.shape
    ]  # fmt: skip
    rows_ids, rows_extra = [], []
    for i, (_, _, response) in enumerate(items):
        answer = torch.tensor(response.token_ids, dtype=prompt_ids.dtype)
        rows_ids.append(torch.cat([prompt_ids[i][prompt_mask[i]], answer]))
        rows_extra.append({
            k: torch.cat([enc[k][i].cpu()[prompt_mask[i]],
                          torch.full_like(answer, lm.family.token_fill(k))])
            for k in per_token
        })  # fmt: skip
    width = max(len(ids) for ids in rows_ids)
    pad = lm.tokenizer.pad_token_id or 0
    input_ids = torch.full((len(items), width), pad, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    extra = {k: torch.zeros((len(items), width), dtype=enc[k].dtype) for k in per_token}
    spans, rows, first_image = [], [], 0
    for i, ids in enumerate(rows_ids):
        offset = width - len(ids)  # left padding, as in batched generation
        input_ids[i, offset:] = ids
        mask[i, offset:] = 1
        for k in per_token:
            extra[k][i, offset:] = rows_extra[i][k]
        n_prompt = int(prompt_mask[i].sum())
        # the rows that predict response tokens: the last prompt position onwards
        rows.append((offset + n_prompt - 1, offset + len(ids) - 1))
        images = range(first_image, first_image + len(items[i][1]))
        found = lm.family.image_tokens(ids[:n_prompt], enc, images)
        first_image = images.stop
        spans.append([ImageTokens(t.picture, tuple((s + offset, e + offset) for s, e in t.runs))
                      for t in found])  # fmt: skip
    inputs = {**enc, **extra, "input_ids": input_ids, "attention_mask": mask}
    if lm.family.positions_from_mask:  # positions as generate() computes them for left padding
        inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    inputs = {k: v.to(lm.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    return TeacherForced(inputs, rows, spans)


def score_batch(
    lm: Any, items: list[Item], layer: int
) -> list[tuple[np.ndarray, list[ImageTokens]]]:
    """Teacher-forced pass over a left-padded batch; per item the mean attention of its
    response rows over every image token (images in order), and where its images are."""
    batch = teacher_forced(lm, items)
    r0, r1 = min(r for r, _ in batch.rows), max(r for _, r in batch.rows)
    weights = capture_layer_attention(lm.model, batch.inputs, layer, (r0, r1))  # (B, R, T)
    out = []
    for i, images in enumerate(batch.images):
        a, b = batch.rows[i]
        att = weights[i, a - r0 : b - r0].mean(0)  # (T,)
        cols = torch.cat([att[s:e] for t in images for s, e in t.runs])  # every image token
        out.append((cols.float().cpu().numpy(), images))
    return out


def run_shard(task: Task, ctx: StageContext) -> ShardStats:
    scfg = ctx.config.score
    stats = ShardStats(stage="score", shard=task.shard)
    drops = DropLog(stats)
    rows: dict[tuple[int, int], str] = {}  # (line, response) -> record: input order
    lm = cached_model(ctx)
    layer = scfg.layer if scfg.layer is not None else lm.num_layers // 2
    if layer >= lm.num_layers:
        raise UserError(f"score.layer: {layer} but the model has {lm.num_layers} decoder layers")
    todo: list[tuple[int, AugmentedSample, Response, int]] = []

    def emit(n, sample, idx, response, decision, reason, ratio=None, shares=(), att=(), thr=None):  # type: ignore[no-untyped-def]
        rec = ScoredResponse(
            sample=sample, response_index=idx, response=response, layer=layer, ratio=ratio,
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
    for n, line in enumerate(lines):
        gen = GeneratedSample.model_validate_json(line)
        for idx, response in enumerate(gen.responses):
            stats.total += 1
            if not response.text.strip():
                emit(n, gen.sample, idx, response, "dropped", "empty_response")
            elif same_answer(response.text, gen.sample.chosen):
                emit(n, gen.sample, idx, response, "dropped", "equals_ground_truth")
            elif lm.image_token_id in response.token_ids:
                # an image placeholder in the answer would be read as a picture with no
                # pixels when teacher-forced, and when TRL tokenizes the answer text
                emit(n, gen.sample, idx, response, "dropped", "image_token_in_answer")
            elif not reproduces(lm.processor, gen.sample.prompt, response.text, response.token_ids):
                # training re-tokenizes the answer text: its ids must be the generated ones
                emit(n, gen.sample, idx, response, "dropped", "answer_not_reproducible")
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
            results = score_batch(lm, [(s, im, r) for _, s, im, r, _ in items], layer)
            for (n, sample, _, response, idx), (token_att, images) in zip(
                items, results, strict=True
            ):
                pictures = [t.picture for t in images]
                ratio, shares = attention_ratio(
                    sample, token_att, pictures, scfg.pip_border_fraction
                )
                confused, thr = reject_by_attention(
                    sample.format, sample.n_images, ratio, scfg.sequence_thresholds,
                    scfg.grid_thresholds, scfg.pic_in_pic_threshold,
                )  # fmt: skip
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
