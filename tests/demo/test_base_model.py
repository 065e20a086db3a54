"""The base model's recipe and report: distinct-answer distractors, the index task, the
curriculum and its lr schedule, the attention AUC per layer in the cached report, the
CLI's figures, and an older recipe's folder retrained."""

from __future__ import annotations

import functools
import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from mia_dpo.cli import main
from mia_dpo.demo import base_model as base
from mia_dpo.demo.base_model import (
    AUC_TARGET,
    BaseModelReport,
    ensure_base_model,
    format_report,
    read_report,
    train_base_model,
)
from mia_dpo.demo.base_recipe import (
    CELLS,
    EVAL_SEQUENCE_SIZES,
    RECIPE_VERSION,
    BaseParams,
    eval_sets,
    group_by_source,
    lr_factor,
    read_records,
    sample_example,
    step_task,
    target_position,
)
from mia_dpo.demo.synthetic import write_synthetic
from mia_dpo.demo.tiny import build_tokenizer

# A short run whose two-image answers are partly right, partly wrong (so an AUC exists).
TINY: dict[str, Any] = {
    "seed": 0,
    "steps": 80,
    "schedule_steps": 80,
    "single_steps": 10,
    "index_steps": 10,
    "n_train": 60,
    "eval_per_cell": 30,
    "eval_images": 60,
    # r2's settings: 4 tokens per image and a high rate make 80 steps answer some
    # two-image questions right and some wrong, which an AUC needs
    "patch_size": 32,
    "lr": 1e-3,
}


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    return read_records(write_synthetic(tmp_path_factory.mktemp("syn"), 90, seed=1, image_px=64))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BaseModelReport]:
    out = tmp_path_factory.mktemp("base") / "model"
    return out, train_base_model(out, log_every=20, progress=False, **TINY)


def test_distinct_distractors_never_share_the_targets_answer(records: list[Any]) -> None:
    by_source = group_by_source(records)
    rng = random.Random(0)
    for n in EVAL_SEQUENCE_SIZES:
        for _ in range(50):
            prompt, answer, idx = sample_example(rng, records, by_source, n, distinct=True)
            k = target_position(prompt)
            assert len(set(idx)) == n and len({records[i][3] for i in idx}) == 1
            assert records[idx[k - 1]][2] == answer
            assert all(records[i][2] != answer for j, i in enumerate(idx) if j != k - 1)
    for cell, examples in eval_sets(records, 40, seed=0).items():
        for prompt, answer, idx in examples:
            if cell == "single":
                assert len(idx) == 1 and records[idx[0]][2] == answer
            else:  # exactly one image answers the question as the gold answer does
                assert [records[i][2] for i in idx].count(answer) == 1
                assert records[idx[target_position(prompt) - 1]][2] == answer


def test_a_pool_without_other_answers_is_an_error_not_a_hang(records: list[Any]) -> None:
    same = [i for i, r in enumerate(records) if r[2] == records[0][2]]
    with pytest.raises(ValueError, match="too few images"):
        sample_example(random.Random(0), records, {"x": same}, 2, distinct=True)


def test_index_task_example_has_the_right_form(records: list[Any]) -> None:
    by_source = group_by_source(records)
    rng = random.Random(1)
    tok = build_tokenizer()
    seen = set()
    for _ in range(60):
        n = rng.choice((2, 3, 4))
        prompt, answer, idx = sample_example(rng, records, by_source, n, index_task=True)
        header = "".join(f"Image{i}:<image>\n" for i in range(1, n + 1))
        assert prompt.startswith(header) and prompt.endswith("?")
        question = prompt.removeprefix(header)
        assert question.startswith("Which image is ")
        k = int(answer.removeprefix("Image"))
        assert answer == f"Image{k}" and 1 <= k <= n
        target, source = records[idx[k - 1]][2], records[idx[0]][3]
        # The description names the target's answer, which no other image has.
        assert target in question.rstrip("?").split()
        assert all(records[i][2] != target for j, i in enumerate(idx) if j != k - 1)
        assert tok.unk_token_id not in tok(prompt)["input_ids"]  # in the tiny vocabulary
        seen.add(source)
    assert seen == {"colors", "shapes", "counts"}


def test_curriculum_then_the_mix() -> None:
    p = BaseParams()
    rng = random.Random(0)
    tasks = [step_task(rng, s, p) for s in range(1, 6001)]
    assert all(t == (1, False) for t in tasks[: p.single_steps])
    middle = tasks[p.single_steps : p.single_steps + p.index_steps]
    assert all(index == (n > 1) for n, index in middle)
    assert 0.4 < sum(index for _, index in middle) / len(middle) < 0.6
    mix = tasks[p.single_steps + p.index_steps :]
    index_share = sum(index for _, index in mix) / len(mix)
    sequence_share = sum(n > 1 and not index for n, index in mix) / len(mix)
    assert abs(index_share - p.index_fraction) < 0.03
    assert abs(sequence_share - p.multi_fraction) < 0.03


def test_lr_schedule_is_planned_over_schedule_steps_not_steps() -> None:
    p = BaseParams(steps=4000, schedule_steps=7000)  # recipe r2
    stopped_early = BaseParams(steps=1000, schedule_steps=7000)
    assert lr_factor(999, stopped_early) == lr_factor(999, p)
    assert 0.4 < lr_factor(p.steps, p) < 0.6  # r2 stops with the lr about halfway down
    assert lr_factor(p.schedule_steps, p) == pytest.approx(0.1)
    assert lr_factor(2 * p.schedule_steps, p) == pytest.approx(0.1)  # held past its end
    with pytest.raises(ValueError, match="index_fraction"):
        BaseParams(index_fraction=0.5, multi_fraction=0.6)


def test_report_carries_accuracy_distractor_share_and_auc_per_layer(
    trained: tuple[Path, BaseModelReport],
) -> None:
    out, report = trained
    assert read_report(out) == report and report.recipe == RECIPE_VERSION
    assert set(report.accuracy) == set(CELLS)
    assert set(report.wrong_is_distractor) == set(CELLS) - {"single"}
    shares = [s for s in report.wrong_is_distractor.values() if s is not None]
    assert shares and all(0.0 <= s <= 1.0 for s in shares)
    assert len(report.attention_auc) == report.params.text_layers
    aucs = [a for a in report.attention_auc if a is not None]
    assert aucs, "this tiny run must answer some two-image questions right, some wrong"
    assert all(0.0 <= a <= 1.0 for a in aucs)
    assert report.best_auc == max(aucs)
    assert report.best_layer is not None
    assert report.attention_auc[report.best_layer] == report.best_auc


def test_cli_prints_one_line_per_figure(
    trained: tuple[Path, BaseModelReport],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out, report = trained
    # The CLI sets seed and steps; the rest of TINY comes in here, so the cached
    # fixture is reused (a mismatch would retrain with the recipe's defaults).
    calls: list[Any] = []
    monkeypatch.setattr(base, "train_base_model", lambda *a, **k: calls.append(k))
    rest = {k: v for k, v in TINY.items() if k not in ("seed", "steps")}
    monkeypatch.setattr(base, "ensure_base_model", functools.partial(ensure_base_model, **rest))
    assert main(["base-model", "--out", str(out), "--steps", str(TINY["steps"])]) == 0
    assert calls == []
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"base model -> {out}"
    assert f"single-image accuracy: {report.accuracy['single']:.3f}" in lines
    assert f"2-image sequence accuracy: {report.accuracy['seq2']:.3f}" in lines
    assert any(ln.startswith("wrong 2-image answers that are a distractor's") for ln in lines)
    for layer in range(report.params.text_layers):
        assert sum(ln.startswith("attention AUC") and f"layer {layer}:" in ln for ln in lines) == 1
    assert any(ln.startswith(f"best attention layer: {report.best_layer} (AUC") for ln in lines)
    warned = [ln for ln in lines if ln.startswith("WARNING:")]
    assert len(warned) == (report.best_auc is None or report.best_auc < AUC_TARGET)


def test_warning_only_below_the_auc_target(trained: tuple[Path, BaseModelReport]) -> None:
    _, report = trained
    good = report.model_copy(update={"best_auc": 0.8, "best_layer": 1})
    bad = report.model_copy(update={"best_auc": 0.6, "best_layer": 1})
    assert not any(ln.startswith("WARNING:") for ln in format_report(good))
    (warning,) = [ln for ln in format_report(bad) if ln.startswith("WARNING:")]
    assert "0.600" in warning and "hardly separate right from wrong" in warning


def test_a_folder_of_an_older_recipe_retrains(
    trained: tuple[Path, BaseModelReport], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = shutil.copytree(trained[0], tmp_path / "model")
    calls: list[Any] = []
    monkeypatch.setattr(base, "train_base_model", lambda *a, **k: calls.append(k))
    ensure_base_model(out, **TINY)
    assert calls == []  # same recipe, same params: reused
    saved = json.loads((out / "base.json").read_text(encoding="utf-8"))
    (out / "base.json").write_text(json.dumps(saved | {"recipe": RECIPE_VERSION - 1}))
    ensure_base_model(out, **TINY)
    assert len(calls) == 1
    # A report of the previous code (no attention figures) does not read at all.
    old = {k: v for k, v in saved.items() if k not in ("recipe", "attention_auc")}
    (out / "base.json").write_text(json.dumps(old))
    assert read_report(out) is None
    ensure_base_model(out, **TINY)
    assert len(calls) == 2 and calls[-1]["steps"] == TINY["steps"]
