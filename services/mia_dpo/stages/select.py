"""The select stage (docs/method.md §4): post-selection over the whole pair set.

Every response the score stage *rejected* becomes a candidate pair (ground truth
chosen, the response rejected). The paper then removes outliers on three metrics;
its reference code has no such step, so the rule is ours: Tukey fences per metric,
computed over ALL candidates of the run, which is why this stage is a single task.

Lengths and edit distances are in word tokens (`\\w+|[^\\w\\s]`, lower-cased), not
model tokens. The paper measures in tokens, but the chosen answer was never
tokenized by the model, and counting both sides the same way keeps the selection
independent of whichever tokenizer generated the data.

Outputs (runs/R/select/): pairs.trl.jsonl (TRL DPOTrainer's vision layout),
pairs.jsonl and shard-00000.jsonl (identical, one `Pair` per line) and
shard-00000.dropped.jsonl (the outliers). Responses the score stage dropped are
counted here by their score reason; their details stay in the score drop logs.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from mia_dpo.answers import normalize_answer, same_answer
from mia_dpo.config import SelectConfig
from mia_dpo.models.prompting import answer_messages, prompt_messages
from mia_dpo.records import FORMATS, Pair, ScoredResponse, ShardStats, Task
from mia_dpo.runtime import layout
from mia_dpo.runtime.context import DropLog, StageContext

# --- Metrics -------------------------------------------------------------------

_WORD = re.compile(r"\w+|[^\w\s]")


def word_tokens(text: str) -> list[str]:
    """Words and single punctuation marks, lower-cased: 'A cat.' -> ['a', 'cat', '.']."""
    return _WORD.findall(text.lower())


def edit_distance(a: list, b: list) -> int:
    """Levenshtein distance (insert, delete, substitute: cost 1) between two sequences."""
    # A shared prefix or suffix never changes the distance; responses that paraphrase
    # the ground truth often share both, so trimming saves most of the table.
    start = 0
    while start < len(a) and start < len(b) and a[start] == b[start]:
        start += 1
    end_a, end_b = len(a), len(b)
    while end_a > start and end_b > start and a[end_a - 1] == b[end_b - 1]:
        end_a, end_b = end_a - 1, end_b - 1
    a, b = a[start:end_a], b[start:end_b]
    if len(a) < len(b):
        a, b = b, a  # rows as long as the shorter sequence
    prev = list(range(len(b) + 1))  # distances from a[:i-1] to every prefix of b
    for i, x in enumerate(a, 1):
        cur = [i]
        left, diag = i, prev[0]
        for j, y in enumerate(b, 1):
            up = prev[j]
            # Neighbouring cells differ by at most 1, so a match never loses to an
            # insert or delete and needs no min(): the common case in paraphrases.
            left = diag if x == y else 1 + min(diag, up, left)
            cur.append(left)
            diag = up
        prev = cur
    return prev[-1]


def normalised_edit_distance(a: list, b: list) -> float:
    """Edit distance in [0, 1]: 0 identical, 1 nothing in common."""
    return edit_distance(a, b) / max(len(a), len(b), 1)


def length_ratio(rejected_tokens: list, chosen_tokens: list) -> float:
    """len(rejected) / len(chosen); an empty chosen counts as one token."""
    return len(rejected_tokens) / max(len(chosen_tokens), 1)


def tukey_fences(values: list[float], k: float) -> tuple[float, float]:
    """(Q1 - k*IQR, Q3 + k*IQR).

    Quartiles by linear interpolation between order statistics (numpy's default
    percentile method, Hyndman & Fan type 7, as in R's `quantile` and pandas), so
    the fences of a small set do not jump with one value.
    """
    q1, q3 = np.percentile(np.asarray(values, dtype=float), [25, 75])
    iqr = q3 - q1
    return float(q1 - k * iqr), float(q3 + k * iqr)


# --- Post-selection ------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A rejected response with the metrics post-selection judges it by."""

    scored: ScoredResponse
    ppl: float
    length_ratio: float
    edit_distance: float  # normalised

    @property
    def id(self) -> str:
        return f"{self.scored.sample.sample_id}-r{self.scored.response_index}"

    @classmethod
    def from_scored(cls, rec: ScoredResponse) -> Candidate:
        chosen, rejected = word_tokens(rec.sample.chosen), word_tokens(rec.response.text)
        return cls(
            scored=rec,
            ppl=rec.response.ppl,
            length_ratio=length_ratio(rejected, chosen),
            edit_distance=normalised_edit_distance(chosen, rejected),
        )

    def metric(self, name: str) -> float:
        return float(getattr(self, name))


def metric_fences(candidates: list[Candidate], cfg: SelectConfig) -> dict[str, tuple[float, float]]:
    """Fences per configured metric over the whole set; {} when the set is too small."""
    if len(candidates) < cfg.min_pairs_for_fences:
        return {}
    fences = {}
    for name in cfg.metrics:
        # An infinite PPL (log-probs underflowed) would make the quartiles NaN: fence
        # on the finite values; the infinite ones then fall outside and are dropped.
        finite = [v for c in candidates if math.isfinite(v := c.metric(name))]
        # With no finite value at all, an empty interval makes every pair an outlier.
        fences[name] = tukey_fences(finite, cfg.iqr_multiplier) if finite else (0.0, -1.0)
    return fences


def post_select(
    candidates: list[Candidate], cfg: SelectConfig
) -> tuple[list[Candidate], list[tuple[Candidate, str]]]:
    """(kept, [(dropped, 'outlier_<metric>')]), both in input order.

    Every fence comes from the full set before anything is dropped, so the outcome
    does not depend on the order of cfg.metrics; only the reason of a pair outside
    several fences does (the first metric listed names it).
    """
    fences = metric_fences(candidates, cfg)
    kept: list[Candidate] = []
    dropped: list[tuple[Candidate, str]] = []
    for cand in candidates:
        # `not lo <= v <= hi` rather than `v < lo or v > hi`: NaN is an outlier too.
        bad = [m for m, (lo, hi) in fences.items() if not lo <= cand.metric(m) <= hi]
        if bad:
            dropped.append((cand, f"outlier_{bad[0]}"))
        else:
            kept.append(cand)
    return kept, dropped


# --- Output records --------------------------------------------------------------


def to_pair(cand: Candidate) -> Pair:
    rec = cand.scored
    right = same_answer(rec.response.text, rec.sample.chosen)
    if rec.ratio is None and not right:
        # The score stage rejects only on a measured ratio; None means a corrupt record.
        raise ValueError(f"{cand.id}: rejected response without an attention ratio")
    s = rec.sample
    return Pair(
        id=cand.id, image=s.images, prompt=s.prompt, chosen=s.chosen,
        rejected=s.chosen if right else rec.response.text, format=s.format, n_images=s.n_images,
        target_index=s.target_index, ratio=rec.ratio, ppl=cand.ppl,
        length_ratio=cand.length_ratio, edit_distance=cand.edit_distance, sft_only=right,
    )  # fmt: skip


def pair_json(pair: Pair) -> str:
    # sft_only only where true: pairs of the plain method keep their layout, byte for byte
    return pair.model_dump_json(exclude={"sft_only"} if not pair.sft_only else None)


# Pair fields copied next to the messages, so a trained model can be traced to its data.
TRL_METADATA = (
    "id", "format", "n_images", "target_index", "ratio", "ppl", "length_ratio", "edit_distance",
)  # fmt: skip


def trl_row(pair: Pair) -> dict:
    """The conversational vision layout TRL's DPOTrainer loads as is, plus metadata."""
    return {
        "images": pair.image,
        "prompt": prompt_messages(pair.prompt),
        "chosen": answer_messages(pair.chosen),
        "rejected": answer_messages(pair.rejected),
        **pair.model_dump(include=set(TRL_METADATA)),
    }


def random_selection(scored: list[ScoredResponse], n: int, seed: int) -> list[Candidate]:
    """An ablation: `n` pairs with the rejected responses drawn uniformly from `scored`,
    ignoring the attention ratio and the fences (random: every answer, right or wrong;
    random_wrong: the wrong ones that were scored)."""
    rng = random.Random(f"{seed}\x00select-random")
    picked = sorted(rng.sample(range(len(scored)), min(n, len(scored))))
    return [Candidate.from_scored(scored[i]) for i in picked]


def balance_labels(
    pairs: list[Candidate], right: list[ScoredResponse], seed: int
) -> list[Candidate]:
    """SFT-only rows (right answers) so that, per answer label, the label is chosen at
    least as often as it is rejected: pairs built from errors alone reject some labels
    far more often than they choose them, and DPO then learns that prior."""
    chosen = Counter(normalize_answer(c.scored.sample.chosen) for c in pairs)
    rejected = Counter(normalize_answer(c.scored.response.text) for c in pairs)
    rng = random.Random(f"{seed}\x00select-balance")
    pool = sorted(right, key=lambda r: (r.sample.sample_id, r.response_index))
    rng.shuffle(pool)
    added: list[Candidate] = []
    for rec in pool:
        label = normalize_answer(rec.sample.chosen)
        if chosen[label] < rejected[label]:
            chosen[label] += 1
            added.append(Candidate.from_scored(rec))
    return added


# --- The stage -------------------------------------------------------------------


def score_shard_keys(ctx: StageContext, run_id: str) -> list[str]:
    """Score output shards in shard order (drop logs and markers excluded)."""
    keys = [
        k
        for k in ctx.store.list(layout.stage_prefix(run_id, "score") + "shard-")
        if k.endswith(".jsonl") and not k.endswith(".dropped.jsonl")
    ]
    return sorted(keys, key=lambda k: int(k.rsplit("shard-", 1)[1].split(".", 1)[0]))


def run_shard(task: Task, ctx: StageContext) -> ShardStats:
    if task.shard != 0:
        raise ValueError(f"select runs as one task over the whole run (shard 0), got {task.shard}")
    cfg = ctx.config.select
    stats = ShardStats(stage="select", shard=task.shard)
    drops = DropLog(stats)

    candidates: list[Candidate] = []
    scored: list[ScoredResponse] = []  # every response that was scored (has a ratio)
    right: list[ScoredResponse] = []  # right answers the model could be trained on
    for key in score_shard_keys(ctx, task.run_id):
        for line in ctx.store.get_jsonl(key):
            rec = ScoredResponse.model_validate_json(line)
            stats.total += 1
            if rec.decision == "rejected" and same_answer(rec.response.text, rec.sample.chosen):
                # Never a pair of an answer with itself (score drops these already; a
                # record scored under an older rule must not slip through here).
                sid = f"{rec.sample.sample_id}-r{rec.response_index}"
                drops.drop(sid, "equals_ground_truth", "the answer equals the ground truth")
                continue
            if rec.ratio is not None:
                scored.append(rec)
            elif rec.reason == "equals_ground_truth":
                right.append(rec)
            if rec.decision == "rejected" or (
                # no attention rule: every scored wrong answer the PPL rule lets through
                cfg.strategy == "ppl_only"
                and rec.ratio is not None
                and rec.response.ppl > ctx.config.score.min_ppl
            ):
                candidates.append(Candidate.from_scored(rec))
            else:
                stats.drop(rec.reason)  # detail already in the score stage's drop log
    stats.notes["candidates"] = len(candidates)

    kept, dropped = post_select(candidates, cfg)
    fences = metric_fences(candidates, cfg)
    for name, (lo, hi) in fences.items():
        ctx.log.info("select %s: fences [%.4g, %.4g]", name, lo, hi)
    for cand, reason in dropped:
        name = reason.removeprefix("outlier_")
        lo, hi = fences[name]
        drops.drop(cand.id, reason, f"{name}={cand.metric(name):.6g} outside [{lo:.6g}, {hi:.6g}]")

    if cfg.strategy in ("random", "random_wrong"):
        pool = scored + right if cfg.strategy == "random" else scored
        kept = random_selection(pool, len(kept), ctx.config.seed)
        stats.dropped = {"not_drawn": stats.total - len(kept)}
        stats.notes[f"strategy_{cfg.strategy}"] = 1
        stats.notes["drawn_right_answers"] = sum(c.scored.ratio is None for c in kept)
    if cfg.label_balance:
        added = balance_labels(kept, right, ctx.config.seed)
        kept = kept + added
        stats.notes["sft_only_rows"] = len(added)
    pairs = [to_pair(c) for c in kept]
    stats.kept = len(pairs)
    for fmt in FORMATS:
        stats.notes[f"pairs_{fmt}"] = sum(p.format == fmt for p in pairs)

    rows = [pair_json(p) for p in pairs]
    trl_rows = [json.dumps(trl_row(p), ensure_ascii=False) for p in pairs]
    ctx.store.put_jsonl(layout.trl_pairs_key(task.run_id), trl_rows)
    ctx.store.put_jsonl(layout.pairs_key(task.run_id), rows)
    ctx.store.put_jsonl(layout.shard_key(task.run_id, "select", task.shard), rows)
    drops.write(ctx.store, task)
    return stats
