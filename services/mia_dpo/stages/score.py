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

import numpy as np
import torch

from mia_dpo.answers import same_answer
from mia_dpo.errors import SampleError, UserError
from mia_dpo.models.attention import capture_layer_attention
from mia_dpo.models.loading import image_spans
from mia_dpo.models.prompting import chat_text, encode
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
from mia_dpo.stages.model_inputs import MODEL_USE_LOCK, cached_model, load_images


def score_batch(
    lm, ctx: StageContext, items: list[tuple[AugmentedSample, list, Response]], layer: int
) -> list[tuple[np.ndarray, list[tuple[int, int]]]]:  # type: ignore[no-untyped-def]
    """Teacher-forced pass over a left-padded batch; per item the mean attention of
    its response rows over every image token, and its image spans."""
    encoded = []
    for sample, images, response in items:
        enc = encode(
            lm.processor, [chat_text(lm.processor, sample.prompt)], images, return_tensors="pt"
        )
        prompt_ids = enc["input_ids"][0]
        ids = torch.cat([prompt_ids, torch.tensor(response.token_ids, dtype=prompt_ids.dtype)])
        encoded.append((ids, len(prompt_ids), enc["pixel_values"]))
    width = max(len(ids) for ids, _, _ in encoded)
    pad = lm.tokenizer.pad_token_id or 0
    input_ids = torch.full((len(items), width), pad, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    rows = []
    for i, (ids, n_prompt, _) in enumerate(encoded):
        offset = width - len(ids)  # left padding, as in batched generation
        input_ids[i, offset:] = ids
        mask[i, offset:] = 1
        # the rows that predict response tokens: the last prompt position onwards
        rows.append((offset + n_prompt - 1, offset + len(ids) - 1))
    r0, r1 = min(r for r, _ in rows), max(r for _, r in rows)
    inputs = {
        "input_ids": input_ids.to(lm.device),
        "attention_mask": mask.to(lm.device),
        # positions as generate() computes them for left-padded rows
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0).to(lm.device),
        "pixel_values": torch.cat([pv for _, _, pv in encoded]).to(lm.device, lm.dtype),
    }
    weights = capture_layer_attention(lm.model, inputs, layer, (r0, r1))  # (B, R, T)
    out = []
    for i, (ids, _n_prompt, _) in enumerate(encoded):
        a, b = rows[i]
        per_token = weights[i, a - r0 : b - r0].mean(0)  # (T,)
        offset = width - len(ids)
        spans = [
            (s + offset, e + offset)
            for s, e in image_spans(ids, lm.image_token_id, lm.tokens_per_image)
        ]
        cols = torch.cat([per_token[s:e] for s, e in spans])  # (n_images * tokens_per_image,)
        out.append((cols.float().cpu().numpy(), spans))
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
            results = score_batch(lm, ctx, [(s, im, r) for _, s, im, r, _ in items], layer)
            for (n, sample, _, response, idx), (token_att, _) in zip(items, results, strict=True):
                ratio, shares = attention_ratio(
                    sample, token_att, lm.tokens_per_image, lm.patch_grid, scfg.pip_border_fraction
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
