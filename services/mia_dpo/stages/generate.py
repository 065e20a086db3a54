"""The generate stage (docs/method.md §2): the policy model answers.

Batched over an augment shard: greedy by default (the reference's decoding),
`num_samples` responses per prompt when sampling. Each response keeps its token
ids and per-token log-probabilities, so its perplexity PPL = exp(-mean log p) comes
from the generation's own probabilities and the score stage can teacher-force the
exact tokens.
"""

from __future__ import annotations

import math

import torch

from mia_dpo.errors import SampleError
from mia_dpo.models.prompting import batch_inputs
from mia_dpo.records import AugmentedSample, GeneratedSample, Response, ShardStats, Task
from mia_dpo.runtime import layout
from mia_dpo.runtime.context import DropLog, StageContext
from mia_dpo.stages.model_inputs import MODEL_USE_LOCK, cached_model, load_images, sample_seed


def split_response(
    ids: list[int], logprobs: list[float], eos_ids: set[int], pad_id: int | None
) -> tuple[list[int], list[float]]:
    """Cut a generated row after its first EOS (kept: its probability is part of
    the answer) and drop the padding that batching adds after it."""
    out_ids, out_lp = [], []
    for tok, lp in zip(ids, logprobs, strict=True):
        if tok == pad_id and tok not in eos_ids:
            break
        out_ids.append(tok)
        out_lp.append(lp)
        if tok in eos_ids:
            break
    return out_ids, out_lp


def perplexity(logprobs: list[float]) -> float:
    # An empty response has no tokens to be perplexed by; the score stage drops
    # it as empty_response before its PPL is ever read.
    return math.exp(-sum(logprobs) / len(logprobs)) if logprobs else 1.0


def generate_batch(
    lm, ctx: StageContext, batch: list[tuple[AugmentedSample, list]]
) -> list[list[Response]]:  # type: ignore[no-untyped-def]
    gcfg = ctx.config.generate
    inputs = batch_inputs(lm, [s.prompt for s, _ in batch], [imgs for _, imgs in batch])
    sampling = gcfg.temperature > 0
    if sampling:  # reproducible for a given batch: seeded by its first sample
        torch.manual_seed(sample_seed(ctx.config.seed, "gen:" + batch[0][0].sample_id) % 2**63)
    tok = lm.tokenizer
    eos = lm.model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos if eos is not None else tok.eos_token_id])
    with torch.no_grad():
        out = lm.model.generate(
            **inputs,
            max_new_tokens=gcfg.max_new_tokens,
            do_sample=sampling,
            temperature=gcfg.temperature if sampling else None,
            top_p=gcfg.top_p if sampling else None,
            top_k=None,
            num_return_sequences=gcfg.num_samples,
            return_dict_in_generate=True,
            output_scores=True,
            pad_token_id=tok.pad_token_id,
        )
    # log p of each chosen token under the distribution it was drawn from
    logp = lm.model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    new = out.sequences[:, inputs["input_ids"].shape[1] :]  # (B * num_samples, new_tokens)
    results: list[list[Response]] = [[] for _ in batch]
    for row in range(new.shape[0]):
        ids, lps = split_response(
            new[row].tolist(), logp[row].float().tolist(), eos_ids, tok.pad_token_id
        )
        text = tok.decode(ids, skip_special_tokens=True).strip()
        results[row // gcfg.num_samples].append(
            Response(
                text=text, token_ids=ids, logprobs=[round(x, 6) for x in lps], ppl=perplexity(lps)
            )
        )
    return results


def run_shard(task: Task, ctx: StageContext) -> ShardStats:
    gcfg = ctx.config.generate
    stats = ShardStats(stage="generate", shard=task.shard)
    drops = DropLog(stats)
    todo: list[tuple[AugmentedSample, list]] = []
    lm = cached_model(ctx)
    for line in ctx.store.get_jsonl(layout.shard_key(task.run_id, "augment", task.shard)):
        sample = AugmentedSample.model_validate_json(line)
        stats.total += 1
        if len(sample.chosen) >= gcfg.max_chosen_chars:
            drops.drop(
                sample.sample_id, "chosen_too_long", f"ground truth of {len(sample.chosen)} chars"
            )
            continue
        try:
            todo.append((sample, load_images(ctx, sample, lm)))
        except SampleError as e:
            drops.drop(sample.sample_id, e.reason, e.detail)
    rows: list[str] = []
    with MODEL_USE_LOCK:
        for i in range(0, len(todo), gcfg.batch_size):
            batch = todo[i : i + gcfg.batch_size]
            for (sample, _), responses in zip(batch, generate_batch(lm, ctx, batch), strict=True):
                record = GeneratedSample(sample=sample, responses=responses, noise=gcfg.noise)
                rows.append(record.model_dump_json())
                stats.kept += 1
    ctx.store.put_jsonl(layout.shard_key(task.run_id, "generate", task.shard), rows)
    drops.write(ctx.store, task)
    return stats
