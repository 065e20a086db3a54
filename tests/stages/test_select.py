"""Post-selection (docs/method.md §4): metrics, Tukey fences, and the select stage over a store.

Distributions are hand-made from normal quantiles, so they hold no Tukey outlier of
their own: whatever is dropped is exactly the value planted for the test.
"""

from __future__ import annotations

import json
import random
from statistics import NormalDist

import pytest

from mia_dpo.config import RunConfig, SelectConfig, StoreConfig
from mia_dpo.records import AugmentedSample, Pair, Response, ScoredResponse, Task
from mia_dpo.runtime import layout
from mia_dpo.runtime.context import StageContext
from mia_dpo.runtime.store import BlobReader, LocalStore
from mia_dpo.stages.select import (
    Candidate,
    edit_distance,
    length_ratio,
    normalised_edit_distance,
    post_select,
    run_shard,
    tukey_fences,
    word_tokens,
)

METRICS = ("ppl", "length_ratio", "edit_distance")
CENTRE = {"ppl": (2.0, 0.1), "length_ratio": (1.0, 0.05), "edit_distance": (0.5, 0.02)}


def sample(
    sid: str, fmt: str = "sequence", n: int = 2, chosen: str = "The cat is black."
) -> AugmentedSample:
    if fmt == "sequence":
        images = [f"/data/{sid}/{i}.jpg" for i in range(n)]
        prompt = "".join(f"Image{i + 1}: <image>\n" for i in range(n)) + "What colour is Image1?"
    else:  # grid and pic-in-pic: one composed picture
        images = [f"s3://bucket/runs/r1/augment/images/{sid}.jpg"]
        prompt = "<image>\nWhat colour is the cat?"
    return AugmentedSample(
        sample_id=f"{sid}-{fmt}", source_id=sid, source="coco", format=fmt, images=images,
        target_index=2 if fmt == "pic_in_pic" else 1, n_images=n,
        layout=(1, n) if fmt == "grid" else None, prompt=prompt, chosen=chosen,
        target_image=f"coco/{sid}.jpg",
    )  # fmt: skip


def scored(
    s: AugmentedSample,
    text: str = "The dog is white.",
    ppl: float = 2.0,
    decision: str = "rejected",
    reason: str = "attention",
    idx: int = 0,
) -> ScoredResponse:
    response = Response(text=text, token_ids=[1, 2, 3], logprobs=[-0.5] * 3, ppl=ppl)
    return ScoredResponse(
        sample=s, response_index=idx, response=response, layer=16, ratio=0.3,
        decision=decision, reason=reason,
    )  # fmt: skip


def cand(i: int, **metrics: float) -> Candidate:
    return Candidate(scored=scored(sample(f"s{i}")), **metrics)


def normal_set(n: int = 20) -> list[Candidate]:
    """n candidates whose every metric sits at the normal quantiles (i + 0.5) / n."""
    q = [NormalDist().inv_cdf((i + 0.5) / n) for i in range(n)]
    # Shuffle each metric differently so no pair is extreme on all three at once.
    rng = random.Random(0)
    cols = {m: rng.sample([mu + sd * z for z in q], n) for m, (mu, sd) in CENTRE.items()}
    return [cand(i, **{m: cols[m][i] for m in METRICS}) for i in range(n)]


def with_outlier(metric: str, value: float, at: int = 7) -> tuple[list[Candidate], Candidate]:
    cands = normal_set()
    values = {m: CENTRE[m][0] for m in METRICS} | {metric: value}
    odd = cand(99, **values)
    return [*cands[:at], odd, *cands[at:]], odd


# --- metrics ---------------------------------------------------------------------


def test_edit_distance_known_values() -> None:
    assert edit_distance(list("kitten"), list("sitting")) == 3
    assert edit_distance(list("sitting"), list("kitten")) == 3
    assert edit_distance(list("flaw"), list("lawn")) == 2
    assert edit_distance([], []) == 0
    assert edit_distance([], ["a", "b"]) == 2
    assert normalised_edit_distance(list("kitten"), list("sitting")) == pytest.approx(3 / 7)
    assert normalised_edit_distance([], []) == 0.0
    assert normalised_edit_distance(["a"], ["b", "c"]) == 1.0
    chosen, rejected = word_tokens("The cat is black."), word_tokens("the dog is WHITE.")
    assert chosen == ["the", "cat", "is", "black", "."]
    assert normalised_edit_distance(chosen, rejected) == pytest.approx(2 / 5)


def _naive(a: list, b: list) -> int:
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(
                d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1])
            )
    return d[-1][-1]


def test_edit_distance_matches_full_table() -> None:
    """The prefix/suffix trimming must not change a single distance."""
    rng = random.Random(1)
    for _ in range(300):
        a = rng.choices("abc", k=rng.randint(0, 9))
        b = rng.choices("abc", k=rng.randint(0, 9))
        assert edit_distance(a, b) == _naive(a, b), (a, b)


def test_length_ratio() -> None:
    assert length_ratio(["x"] * 6, ["y"] * 3) == 2.0
    assert length_ratio(["x"] * 4, []) == 4.0  # empty chosen counts as one token
    assert length_ratio([], ["y"]) == 0.0


def test_tukey_fences_hand_computed() -> None:
    # Linear interpolation: Q1 at rank 0.25 * 7 = 1.75 -> 2.75, Q3 at 5.25 -> 6.25.
    lo, hi = tukey_fences([8, 1, 7, 2, 6, 3, 5, 4], 1.5)
    iqr = 6.25 - 2.75
    assert (lo, hi) == pytest.approx((2.75 - 1.5 * iqr, 6.25 + 1.5 * iqr))
    assert tukey_fences([1, 2, 3, 4, 5], 1.0) == pytest.approx((0.0, 6.0))
    assert tukey_fences([3.0] * 10, 1.5) == (3.0, 3.0)


# --- post-selection --------------------------------------------------------------


def test_normal_set_has_no_outlier() -> None:
    kept, dropped = post_select(normal_set(), SelectConfig())
    assert len(kept) == 20 and dropped == []


@pytest.mark.parametrize(
    ("metric", "value"),
    [
        ("ppl", 50.0),
        ("length_ratio", 6.0),
        ("length_ratio", 0.05),  # low side too: a one-word answer to a sentence
        ("edit_distance", 0.0),  # near-identical pairs teach nothing
        ("edit_distance", 1.0),
    ],
)
def test_exactly_the_planted_outlier_is_dropped(metric: str, value: float) -> None:
    cands, odd = with_outlier(metric, value)
    kept, dropped = post_select(cands, SelectConfig())
    assert dropped == [(odd, f"outlier_{metric}")]
    assert kept == [c for c in cands if c is not odd]  # input order kept


def test_first_metric_names_a_multiple_outlier() -> None:
    cands, odd = with_outlier("ppl", 50.0)
    both = cand(98, ppl=40.0, length_ratio=1.0, edit_distance=0.99)
    cands.append(both)
    _, dropped = post_select(cands, SelectConfig())
    assert dropped == [(odd, "outlier_ppl"), (both, "outlier_ppl")]
    _, dropped = post_select(cands, SelectConfig(metrics=["edit_distance", "ppl"]))
    assert dropped == [(odd, "outlier_ppl"), (both, "outlier_edit_distance")]


def test_fences_come_from_the_whole_set() -> None:
    """Same drops whatever the metric order: no fence is computed on a reduced set."""
    cands, _ = with_outlier("ppl", 50.0)
    cands += [
        cand(97, ppl=2.0, length_ratio=9.0, edit_distance=0.5),
        cand(96, ppl=2.0, length_ratio=1.0, edit_distance=0.01),
        cand(95, ppl=2.2, length_ratio=1.1, edit_distance=0.54),
    ]
    drops = {
        tuple(sorted(c.id for c, _ in post_select(cands, SelectConfig(metrics=order))[1]))
        for order in (METRICS, METRICS[::-1], ("length_ratio", "ppl", "edit_distance"))
    }
    assert len(drops) == 1
    fences = {m: tukey_fences([c.metric(m) for c in cands], 1.5) for m in METRICS}
    expected = sorted(
        c.id for c in cands if any(not lo <= c.metric(m) <= hi for m, (lo, hi) in fences.items())
    )
    assert list(drops.pop()) == expected
    assert len(expected) == 3


def test_non_finite_ppl_is_an_outlier() -> None:
    cands, odd = with_outlier("ppl", float("inf"))
    _, dropped = post_select(cands, SelectConfig())
    assert dropped == [(odd, "outlier_ppl")]


def test_too_few_pairs_are_all_kept() -> None:
    cands = [*normal_set(6), cand(99, ppl=500.0, length_ratio=50.0, edit_distance=0.0)]
    cfg = SelectConfig()
    assert len(cands) < cfg.min_pairs_for_fences
    kept, dropped = post_select(cands, cfg)
    assert kept == cands and dropped == []
    # One more pair reaches the threshold and the fences apply.
    cands.append(cand(98, ppl=2.0, length_ratio=1.0, edit_distance=0.5))
    _, dropped = post_select(cands, cfg)
    assert [c.id for c, _ in dropped] == ["s99-sequence-r0"]


def test_no_metrics_no_drops() -> None:
    cands, _ = with_outlier("ppl", 50.0)
    kept, dropped = post_select(cands, SelectConfig(metrics=[]))
    assert kept == cands and dropped == []


def test_iqr_multiplier_widens_the_fences() -> None:
    cands, _ = with_outlier("ppl", 2.4)  # just outside 1.5 * IQR, inside 3 * IQR
    assert len(post_select(cands, SelectConfig())[1]) == 1
    assert post_select(cands, SelectConfig(iqr_multiplier=3.0))[1] == []


# --- the stage over a store ------------------------------------------------------


def write_score_shards(store: LocalStore) -> None:
    shard0 = [scored(sample(f"a{i}"), ppl=1.5 + i / 10) for i in range(10)]
    shard0.insert(3, scored(sample("ok"), ppl=3.0, decision="dropped", reason="attention_ok"))
    shard0.append(scored(sample("low"), ppl=1.05, decision="dropped", reason="low_ppl"))
    shard1 = [scored(sample(f"g{i}", "grid", 4), ppl=2.05 + i / 10) for i in range(5)]
    shard1.insert(2, scored(sample("far", "grid", 4), ppl=80.0))
    shard1.append(scored(sample("p0", "pic_in_pic"), ppl=2.0, idx=1))
    for n, recs in enumerate((shard0, shard1)):
        store.put_jsonl(layout.shard_key("r1", "score", n), [r.model_dump_json() for r in recs])
        # Neither a drop log nor a marker is a score output.
        store.put_jsonl(layout.dropped_key("r1", "score", n), [json.dumps({"id": "x"})])
        store.put_json(layout.marker_key("r1", "score", n), {"kept": len(recs)})


def make_ctx(tmp_path) -> StageContext:  # type: ignore[no-untyped-def]
    store = LocalStore(tmp_path / "store")
    return StageContext(store=store, blobs=BlobReader(StoreConfig()), config=RunConfig())


def test_stage_writes_pairs_trl_rows_and_stats(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ctx = make_ctx(tmp_path)
    write_score_shards(ctx.store)
    stats = run_shard(Task.make("r1", "select", 0), ctx)

    assert stats.total == 19
    assert stats.kept == 16
    assert stats.dropped == {"attention_ok": 1, "low_ppl": 1, "outlier_ppl": 1}
    per_format = {"pairs_sequence": 10, "pairs_grid": 5, "pairs_pic_in_pic": 1}
    assert stats.notes == {"candidates": 17, **per_format}
    assert stats.total == stats.kept + sum(stats.dropped.values())

    lines = ctx.store.get_jsonl("runs/r1/select/pairs.jsonl")
    assert ctx.store.get_jsonl(layout.shard_key("r1", "select", 0)) == lines
    pairs = [Pair.model_validate_json(line) for line in lines]
    expected_ids = [f"a{i}-sequence-r0" for i in range(10)] + [f"g{i}-grid-r0" for i in range(5)]
    assert [p.id for p in pairs] == [*expected_ids, "p0-pic_in_pic-r1"]  # shard, then line
    first = pairs[0]
    assert (first.chosen, first.rejected) == ("The cat is black.", "The dog is white.")
    assert first.ratio == 0.3
    assert (first.length_ratio, first.edit_distance) == (1.0, pytest.approx(0.4))
    assert first.image == ["/data/a0/0.jpg", "/data/a0/1.jpg"]

    dropped = [json.loads(r) for r in ctx.store.get_jsonl(layout.dropped_key("r1", "select", 0))]
    assert [(d["id"], d["reason"]) for d in dropped] == [("far-grid-r0", "outlier_ppl")]
    assert "ppl=80" in dropped[0]["detail"]

    trl = [json.loads(r) for r in ctx.store.get_jsonl("runs/r1/select/pairs.trl.jsonl")]
    assert len(trl) == len(pairs)
    for row, pair in zip(trl, pairs, strict=True):
        assert row["images"] == pair.image
        (user,) = row["prompt"]
        assert user["role"] == "user"
        assert sum(part["type"] == "image" for part in user["content"]) == len(pair.image)
        text = "".join(p["text"] for p in user["content"] if p["type"] == "text")
        assert "What colour is" in text and "<image>" not in text
        answer = [{"role": "assistant", "content": [{"type": "text", "text": pair.chosen}]}]
        assert row["chosen"] == answer
        assert row["rejected"][0]["content"][0]["text"] == pair.rejected
        meta = {k: row[k] for k in ("id", "format", "n_images", "target_index", "ratio", "ppl")}
        assert meta == pair.model_dump(include=set(meta))
        assert row["length_ratio"] == pair.length_ratio
        assert row["edit_distance"] == pair.edit_distance
    grid = trl[10]
    assert (grid["format"], grid["n_images"], len(grid["images"])) == ("grid", 4, 1)

    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset(
        "json",
        data_files=str(tmp_path / "store/runs/r1/select/pairs.trl.jsonl"),
        split="train",
        cache_dir=str(tmp_path / "hf-cache"),
    )
    assert {"images", "prompt", "chosen", "rejected"} <= set(ds.column_names)
    assert ds.num_rows == 16
    assert ds[0]["chosen"][0]["content"][0]["text"] == "The cat is black."


def test_stage_rerun_is_identical(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ctx = make_ctx(tmp_path)
    write_score_shards(ctx.store)
    keys = ["runs/r1/select/pairs.jsonl", "runs/r1/select/pairs.trl.jsonl"]
    run_shard(Task.make("r1", "select", 0), ctx)
    first = [ctx.store.get_bytes(k) for k in keys]
    run_shard(Task.make("r1", "select", 0), ctx)
    assert [ctx.store.get_bytes(k) for k in keys] == first


def test_stage_without_score_output_writes_empty_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ctx = make_ctx(tmp_path)
    stats = run_shard(Task.make("r1", "select", 0), ctx)
    assert (stats.total, stats.kept, stats.dropped) == (0, 0, {})
    assert ctx.store.get_jsonl("runs/r1/select/pairs.trl.jsonl") == []
    assert ctx.store.exists(layout.shard_key("r1", "select", 0))


def test_stage_refuses_other_shards(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="one task"):
        run_shard(Task.make("r1", "select", 1), make_ctx(tmp_path))


def test_random_wrong_strategy_draws_as_many_pairs_from_all_scored(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ctx = make_ctx(tmp_path)
    write_score_shards(ctx.store)
    attention = run_shard(Task.make("r1", "select", 0), ctx)
    picked_attention = ctx.store.get_jsonl("runs/r1/select/pairs.jsonl")

    rnd = StageContext(
        store=ctx.store, blobs=ctx.blobs, config=RunConfig(select={"strategy": "random_wrong"})
    )
    stats = run_shard(Task.make("r1", "select", 0), rnd)
    ids = [
        Pair.model_validate_json(x).id for x in ctx.store.get_jsonl("runs/r1/select/pairs.jsonl")
    ]
    assert stats.kept == attention.kept == len(ids) == len(set(ids))  # same number of pairs
    assert stats.total == stats.kept + stats.dropped["not_drawn"]
    # drawn from every scored response, attention_ok / low_ppl ones included, not the same set
    assert ids != [Pair.model_validate_json(x).id for x in picked_attention]
    again = run_shard(Task.make("r1", "select", 0), rnd)
    assert again.kept == stats.kept
    assert [
        Pair.model_validate_json(x).id for x in ctx.store.get_jsonl("runs/r1/select/pairs.jsonl")
    ] == ids


def right_answer(s: AugmentedSample, idx: int = 0) -> ScoredResponse:
    """A right answer as the score stage records it: dropped before scoring, no ratio."""
    rec = scored(
        s, text=s.chosen.upper(), decision="dropped", reason="equals_ground_truth", idx=idx
    )
    return rec.model_copy(update={"ratio": None})


def with_config(ctx: StageContext, **cfg: object) -> StageContext:
    return StageContext(store=ctx.store, blobs=ctx.blobs, config=RunConfig(**cfg))


def read_pairs(ctx: StageContext) -> list[Pair]:
    return [Pair.model_validate_json(x) for x in ctx.store.get_jsonl("runs/r1/select/pairs.jsonl")]


def test_random_strategy_draws_right_answers_too(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ctx = make_ctx(tmp_path)
    write_score_shards(ctx.store)
    attention = run_shard(Task.make("r1", "select", 0), ctx)
    # as many right answers as wrong ones in a third shard
    rights = [right_answer(sample(f"right{i}")) for i in range(19)]
    ctx.store.put_jsonl(layout.shard_key("r1", "score", 2), [r.model_dump_json() for r in rights])
    attention_again = run_shard(Task.make("r1", "select", 0), ctx)
    assert attention_again.kept == attention.kept  # right answers never make attention pairs

    stats = run_shard(Task.make("r1", "select", 0), with_config(ctx, select={"strategy": "random"}))
    pairs = read_pairs(ctx)
    assert stats.kept == len(pairs) == attention.kept
    drawn_right = [p for p in pairs if p.id.startswith("right")]
    assert stats.notes["drawn_right_answers"] == len(drawn_right)
    # 16 of 36 answers drawn, about half of them right; a right one carries no DPO signal
    assert 3 <= len(drawn_right) <= 13
    assert all(p.sft_only and p.rejected == p.chosen and p.ratio is None for p in drawn_right)
    wrong = [p for p in pairs if not p.id.startswith("right")]
    assert all(not p.sft_only for p in wrong)
    raw = ctx.store.get_jsonl("runs/r1/select/pairs.jsonl")
    assert all(("sft_only" in line) == p.sft_only for line, p in zip(raw, pairs, strict=True))


def test_ppl_only_strategy_ignores_the_attention_rule(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ctx = make_ctx(tmp_path)
    write_score_shards(ctx.store)
    stats = run_shard(
        Task.make("r1", "select", 0), with_config(ctx, select={"strategy": "ppl_only"})
    )
    ids = {p.id for p in read_pairs(ctx)}
    assert "low-sequence-r0" not in ids  # PPL 1.05 <= score.min_ppl 1.1
    # the answer attention let go (attention_ok) is a candidate now, judged by the fences
    # alone (its PPL 3.0 is above the upper one)
    assert stats.notes["candidates"] == 18 and stats.dropped == {"low_ppl": 1, "outlier_ppl": 2}
    dropped = [json.loads(r) for r in ctx.store.get_jsonl(layout.dropped_key("r1", "select", 0))]
    assert ("ok-sequence-r0", "outlier_ppl") in [(d["id"], d["reason"]) for d in dropped]
    assert stats.total == stats.kept + sum(stats.dropped.values())


def test_label_balance_adds_right_answers_of_the_rejected_labels(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ctx = make_ctx(tmp_path)
    # errors only: "red" is always chosen, "blue" always rejected (6 pairs)
    wrong = [scored(sample(f"w{i}", chosen="red"), text="blue", ppl=2.0 + i / 100)
             for i in range(6)]  # fmt: skip
    rights = [right_answer(sample(f"b{i}", chosen="blue")) for i in range(9)]
    rights += [right_answer(sample(f"g{i}", chosen="green")) for i in range(3)]
    ctx.store.put_jsonl(
        layout.shard_key("r1", "score", 0), [r.model_dump_json() for r in wrong + rights]
    )
    with pytest.raises(ValueError, match="sft_weight"):
        RunConfig(select={"label_balance": True})
    balanced = with_config(ctx, select={"label_balance": True}, train={"sft_weight": 1.0})
    stats = run_shard(Task.make("r1", "select", 0), balanced)
    pairs = read_pairs(ctx)
    added = [p for p in pairs if p.sft_only]
    assert stats.notes["sft_only_rows"] == len(added) == 6  # blue: rejected 6, now chosen 6
    assert {p.chosen for p in added} == {"blue"}  # green was never rejected
    assert all(p.rejected == p.chosen for p in added)
    trl = [json.loads(r) for r in ctx.store.get_jsonl("runs/r1/select/pairs.trl.jsonl")]
    assert sum(r["chosen"] == r["rejected"] for r in trl) == 6

    run_shard(Task.make("r1", "select", 0), with_config(ctx))
    assert not any(p.sft_only for p in read_pairs(ctx))  # off by default
