"""The score stage on the tiny LLaVA (docs/method.md §3): its per-token attention
against an independent eager forward pass with output_attentions, its ratios
against models.ratios, and its decisions against the thresholds."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mia_dpo.errors import UserError
from mia_dpo.models import ratios
from mia_dpo.records import GeneratedSample, Response, ScoredResponse
from mia_dpo.stages.score import same_answer
from tests.stages.test_generate import Env, Out, Reference, make_env, one_per_kind

GRID = (8, 8)  # 64 px images, 8 px patches
IMAGE_TOKENS = 64
ALL_PASS = {
    "score.sequence_thresholds": {2: -1, 3: -1, 4: -1, 5: -1},
    "score.grid_thresholds": {2: 0, 3: 0, 4: 0, 6: 0, 9: 0},
    "score.pic_in_pic_threshold": 0,
}
ALL_FAIL = {
    "score.sequence_thresholds": {2: 2, 3: 2, 4: 2, 5: 2},
    "score.grid_thresholds": {2: 2, 3: 2, 4: 2, 6: 2, 9: 2},
    "score.pic_in_pic_threshold": 2,
}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Env:
    return make_env(tmp_path_factory.mktemp("score"), tiny_model_dir)


@pytest.fixture(scope="module")
def ref(tiny_model_dir: Path) -> Reference:
    return Reference(tiny_model_dir)


@pytest.fixture(scope="module")
def gen(env: Env) -> Out:
    return env.run("generate", env.rows, {"generate.max_new_tokens": 6})


@pytest.fixture(scope="module")
def scored(env: Env, gen: Out) -> list[ScoredResponse]:
    return records(env.run("score", gen.rows))


def records(out: Out) -> list[ScoredResponse]:
    return [ScoredResponse.model_validate_json(r) for r in out.rows]


def kind(rec: ScoredResponse) -> tuple[str, int]:
    return rec.sample.format, rec.sample.n_images


def reference_attention(ref: Reference, rec: ScoredResponse, layer: int) -> np.ndarray:
    """attentions[layer] averaged over heads and over the rows predicting the response
    (last prompt position .. second-to-last response token), at the image columns."""
    ids = rec.response.token_ids
    out, n, all_ids = ref.forward(rec.sample, ids, output_attentions=True)
    att = out.attentions[layer][0].mean(0)  # (T, T)
    assert att.shape == (len(all_ids), len(all_ids))
    rows = att[n - 1 : n - 1 + len(ids)].mean(0)  # (T,)
    cols = (all_ids == ref.model.config.image_token_id).numpy()
    assert cols.sum() == IMAGE_TOKENS * len(rec.sample.images)
    return rows.numpy()[cols]


def reference_ratio(rec: ScoredResponse, att: np.ndarray) -> tuple[float, list[float]]:
    s = rec.sample
    if s.format == "sequence":
        spans = [(i * IMAGE_TOKENS, (i + 1) * IMAGE_TOKENS) for i in range(s.n_images)]
        shares = ratios.sequence_shares(att, spans)
        assert ratios.sequence_ratio(att, spans, s.target_index) == shares[s.target_index - 1]
        return shares[s.target_index - 1], shares
    patches = att[len(att) - GRID[0] * GRID[1] :]
    if s.format == "grid":
        blocks = ratios.grid_block_sums(patches, GRID, s.layout)
        shares = (blocks / blocks.sum()).flatten().tolist()
        return ratios.grid_ratio(patches, GRID, s.layout, s.target_index), shares
    r = ratios.pip_ratio(patches, GRID, 1 / 6)
    return r, [1 - r, r]


def check_against_reference(ref: Reference, recs: list[ScoredResponse], layer: int) -> None:
    for rec in recs:
        assert rec.layer == layer
        att = reference_attention(ref, rec, layer)
        np.testing.assert_allclose(rec.token_attention, att, rtol=1e-4, atol=1e-7)
        ratio, shares = reference_ratio(rec, att)
        assert rec.ratio == pytest.approx(ratio, abs=1e-5)
        np.testing.assert_allclose(rec.image_shares, shares, atol=1e-5)
        assert len(rec.image_shares) == rec.sample.n_images


def test_token_attention_matches_eager_reference(scored: list[ScoredResponse], ref) -> None:
    picked = one_per_kind(scored, key=kind, k=1)
    wanted = {("sequence", n) for n in (2, 3, 4, 5)} | {("grid", n) for n in (2, 4, 9)}
    assert wanted | {("pic_in_pic", 2)} <= {kind(r) for r in picked}
    check_against_reference(ref, picked, layer=2)  # num_layers // 2 of 4


def test_layer_zero_reads_another_layer(env: Env, gen: Out, scored, ref) -> None:
    zero = records(env.run("score", gen.rows, {"score.layer": 0}))
    check_against_reference(ref, one_per_kind(zero, k=1), layer=0)
    for a, b in zip(zero, scored, strict=True):
        assert not np.allclose(a.token_attention, b.token_attention, rtol=1e-3, atol=0)


def test_batch_size_does_not_shift_image_spans(env: Env, gen: Out) -> None:
    one = records(env.run("score", gen.rows, {"score.batch_size": 1}))
    three = records(env.run("score", gen.rows, {"score.batch_size": 3}))
    assert len(one) == len(three) == len(gen.rows)
    for a, b in zip(one, three, strict=True):
        assert a.ratio == pytest.approx(b.ratio, abs=1e-5)
        np.testing.assert_allclose(a.image_shares, b.image_shares, atol=1e-5)
        np.testing.assert_allclose(a.token_attention, b.token_attention, rtol=1e-4, atol=1e-7)


def test_decisions_follow_the_thresholds(env: Env, gen: Out, scored) -> None:
    total = len(gen.rows)
    ok = env.run("score", gen.rows, ALL_PASS)
    assert {(r.decision, r.reason) for r in records(ok)} == {("dropped", "attention_ok")}
    assert ok.stats.kept == 0 and ok.stats.dropped == {"attention_ok": total}
    low = env.run("score", gen.rows, {**ALL_FAIL, "score.min_ppl": 1e9})
    assert {(r.decision, r.reason) for r in records(low)} == {("dropped", "low_ppl")}
    bad = env.run("score", gen.rows, ALL_FAIL)
    assert {(r.decision, r.reason) for r in records(bad)} == {("rejected", "attention")}
    assert bad.stats.kept == bad.stats.total == total and not bad.stats.dropped
    assert all(r.threshold == 2 for r in records(bad))
    # the default tables: rejected exactly when the format's rule says so (PPL >> 1.1 here)
    cfg = env.config().score
    for r in scored:
        fmt, n = kind(r)
        table = {"sequence": cfg.sequence_thresholds, "grid": cfg.grid_thresholds}
        thr = table[fmt][n] if fmt in table else cfg.pic_in_pic_threshold
        confused = r.ratio <= thr if fmt == "sequence" else r.ratio < thr
        assert r.threshold == thr and r.response.ppl > cfg.min_ppl
        assert (r.decision, r.reason) == (
            ("rejected", "attention") if confused else ("dropped", "attention_ok")
        )
    assert Counter(r.decision for r in scored)["rejected"] > 0


def test_early_drops_stats_and_input_order(env: Env, gen: Out, tmp_path: Path) -> None:
    assert same_answer("Red.", "red") and same_answer("  two  words. ", "Two words")
    assert not same_answer("red square", "red")
    rows, expected = [], []
    for i, g in enumerate(GeneratedSample.model_validate_json(r) for r in gen.rows[:7]):
        r = g.responses[0]
        truth = Response(text=g.sample.chosen.capitalize() + ".", token_ids=[5], logprobs=[-2.0],
                         ppl=7.39)  # fmt: skip
        empty = Response(text=" ", token_ids=[3], logprobs=[-1.0], ppl=2.72)
        sample = g.sample
        if i == 4:  # its images vanish: dropped once the model stage reaches it
            gone = [str(tmp_path / f"gone{j}.png") for j in range(len(sample.images))]
            sample = sample.model_copy(update={"images": gone})
        gs = GeneratedSample(sample=sample, responses=[r, truth, empty, r])
        rows.append(gs.model_dump_json())
        expected += [(sample.sample_id, k) for k in range(4)]
    out = env.run("score", rows, {**ALL_FAIL, "score.batch_size": 2})
    recs = records(out)
    assert [(r.sample.sample_id, r.response_index) for r in recs] == expected
    reasons = [r.reason for r in recs]
    for i in range(7):
        four = reasons[4 * i : 4 * i + 4]
        middle = ["equals_ground_truth", "empty_response"]
        assert four == (["image_missing", *middle, "image_missing"] if i == 4
                        else ["attention", *middle, "attention"])  # fmt: skip
        assert recs[4 * i].ratio == recs[4 * i + 3].ratio
    assert out.stats.total == 28 and out.stats.kept == 12
    assert out.stats.dropped == {"equals_ground_truth": 7, "empty_response": 7, "image_missing": 2}
    assert out.stats.kept + sum(out.stats.dropped.values()) == out.stats.total
    dropped = {f"{r.sample.sample_id}-r{r.response_index}": r.reason for r in recs}
    assert out.drops == {k: v for k, v in dropped.items() if v != "attention"}


def test_layer_out_of_range_is_a_user_error(env: Env, gen: Out) -> None:
    with pytest.raises(UserError, match=r"score\.layer"):
        env.run("score", gen.rows[:2], {"score.layer": 4})


def test_full_feature_strategy_skips_cls_in_grid_and_pip(
    env: Env, gen: Out, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A "full" strategy keeps CLIP's CLS token before each image's 8x8 patches."""
    full = tmp_path / "full"
    shutil.copytree(tiny_model_dir, full)
    for name in ("config.json", "processor_config.json"):
        cfg = json.loads((full / name).read_text())
        cfg["vision_feature_select_strategy"] = "full"
        if "image_seq_length" in cfg:
            cfg["image_seq_length"] = IMAGE_TOKENS + 1
        (full / name).write_text(json.dumps(cfg))
    picked = [g for g in gen.generated() if g.sample.format != "sequence"][:6]
    recs = records(env.run("score", [g.model_dump_json() for g in picked],
                           {"model.path": str(full)}))  # fmt: skip
    assert {r.sample.format for r in recs} == {"grid", "pic_in_pic"}
    for rec in recs:
        att = np.asarray(rec.token_attention)
        assert att.shape == (IMAGE_TOKENS + 1,)
        ratio, shares = reference_ratio(rec, att)  # on the last 64 tokens
        assert rec.ratio == pytest.approx(ratio, abs=1e-5)
        np.testing.assert_allclose(rec.image_shares, shares, atol=1e-5)


# --- calibration (stages/calibrate.py) -----------------------------------------------


def with_right_answers(ref: Reference, gen: Out) -> list[str]:
    """The generated shard with every other answer replaced by its ground truth (the
    tiny random model is never right), token ids as training would see them."""
    from mia_dpo.models.prompting import answer_ids

    rows = []
    for i, g in enumerate(gen.generated()):
        if i % 2 == 0:
            ids = answer_ids(ref.processor, g.sample.prompt, g.sample.chosen)
            right = Response(text=g.sample.chosen, token_ids=ids, logprobs=[-1.0] * len(ids),
                             ppl=2.718)  # fmt: skip
            g = g.model_copy(update={"responses": [right]})
        rows.append(g.model_dump_json())
    return rows


@pytest.mark.parametrize("layer_per", ["run", "format"])
def test_calibrate_reads_every_layer_as_score_reads_one(
    env: Env, gen: Out, ref, layer_per: str
) -> None:
    from mia_dpo.calibration import Calibration, Observation
    from mia_dpo.records import Task
    from mia_dpo.runtime import layout
    from mia_dpo.stages import get_stage

    rows = with_right_answers(ref, gen)
    run_id = f"calib-{layer_per}"
    env.store.put_jsonl(layout.shard_key(run_id, "generate", 0), rows)
    cfg = {"score.layer": "auto", "score.thresholds": "calibrated",
           "calibrate.min_answers_per_cell": 2, "calibrate.layer_per": layer_per}  # fmt: skip
    stats = get_stage("calibrate")(Task.make(run_id, "calibrate", 0), env.ctx(cfg))
    cal = Calibration.model_validate_json(env.store.get_text(layout.calibration_key(run_id)))
    obs = [Observation.model_validate_json(r) for r in
           env.store.get_jsonl(layout.calibration_key(run_id, "observations.jsonl"))]  # fmt: skip
    assert stats.kept == len(obs) == cal.n_answers == len(rows)
    assert cal.n_right == sum(o.right for o in obs) == (len(rows) + 1) // 2
    assert all(len(o.ratios) == 4 for o in obs)
    assert env.store.get_bytes(layout.calibration_key(run_id, "auc_by_layer.png"))[:4] == b"\x89PNG"
    assert cal.auc_by_layer[cal.layers[0]] == max(a for a in cal.auc_by_layer if a is not None)
    formats = {o.format for o in obs}
    assert set(cal.format_layers) == (formats if layer_per == "format" else set())
    for fmt, band in cal.format_layers.items():  # each format's own best layer
        aucs = [c.auc_by_layer for c in cal.cells if c.format == fmt and c.auc is not None]
        assert band[0] in range(4) and (len(aucs) != 1 or aucs[0][band[0]] == max(aucs[0]))

    # the score stage, told to use the calibration, reads the chosen layer (its format's,
    # per format), applies the calibrated thresholds, and its wrong answers' ratios equal
    # calibrate's at that layer
    out = get_stage("score")(Task.make(run_id, "score", 0), env.ctx(cfg))
    recs = [ScoredResponse.model_validate_json(r)
            for r in env.store.get_jsonl(layout.shard_key(run_id, "score", 0))]  # fmt: skip
    wrong = [r for r in recs if r.ratio is not None]
    assert out.total == len(rows) and wrong
    by_kind = {}
    for o in obs:
        at = cal.layers_for(o.format)[0]
        by_kind.setdefault((o.format, o.n_images, o.right), []).append(o.ratios[at])
    for r in wrong:
        assert r.layer == cal.layers_for(r.sample.format)[0]
        assert r.threshold == cal.threshold(r.sample.format, r.sample.n_images)
        assert any(abs(r.ratio - x) < 1e-5 for x in by_kind[(*kind(r), False)])
    # without calibration.json the score stage says what to do, in one line
    with pytest.raises(UserError, match="mia-dpo calibrate --run-id calib-1"):
        get_stage("score")(Task.make("calib-1", "score", 0), env.ctx(cfg))
