"""The base-model trainer: answer-only labels rendered by the pipeline's template, a
loss that falls, every part of the model trained, and a folder `ensure_base_model`
reuses only while its parameters match."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor

from mia_dpo import __version__
from mia_dpo.config import ModelConfig
from mia_dpo.demo import base_model as base
from mia_dpo.demo.base_model import (
    CELLS,
    BaseModelReport,
    collate,
    encode_example,
    ensure_base_model,
    read_report,
    sample_example,
    train_base_model,
)
from mia_dpo.demo.tiny import build_tiny_model
from mia_dpo.models.loading import load_model
from mia_dpo.models.prompting import answer_messages, prompt_messages
from mia_dpo.prompts import sequence_prompt

FAST: dict[str, Any] = {"seed": 0, "steps": 40, "batch_size": 8, "n_train": 60, "eval_per_cell": 6}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BaseModelReport]:
    out = tmp_path_factory.mktemp("base") / "model"
    return out, train_base_model(out, log_every=10, progress=False, **FAST)


@pytest.mark.parametrize(
    ("prompt", "answer", "n_images"),
    [
        ("<image>\nWhat colour is the circle?", "red", 1),
        (sequence_prompt(3, 2, "How many squares are there?"), "3", 3),
    ],
)
def test_labels_cover_only_the_answer_and_eos(
    tiny_model_dir: Path, prompt: str, answer: str, n_images: int
) -> None:
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    tok = processor.tokenizer
    ids, labels = encode_example(processor, prompt, answer)
    learned = [i for i, y in enumerate(labels) if y != -100]
    assert labels[learned[0]] == tok.convert_tokens_to_ids(answer)
    assert labels[learned[-1]] == ids[-1] == tok.eos_token_id
    assert learned == list(range(learned[0], len(ids)))  # answer and EOS close the row
    assert all(labels[i] == ids[i] for i in learned)
    # The same ids as the pipeline's training path: the chat template renders the user
    # turn and the assistant turn, the processor expands each image.
    full = processor.apply_chat_template(
        prompt_messages(prompt) + answer_messages(answer), tokenize=False
    )
    blanks = [Image.new("RGB", (64, 64))] * n_images
    assert processor(text=[full], images=blanks)["input_ids"][0] == ids
    assert ids.count(processor.image_token_id) == 64 * n_images


def test_sequence_examples_use_distinct_images_of_one_source() -> None:
    records = [(Path(f"{s}{i}.png"), f"q {s}{i}", f"a {s}{i}", s) for s in "xyz" for i in range(5)]
    by_source = {s: [i for i, r in enumerate(records) if r[3] == s] for s in "xyz"}
    rng = random.Random(0)
    for n in (2, 3, 4):
        for _ in range(20):
            prompt, answer, idx = sample_example(rng, records, by_source, n)
            assert len(set(idx)) == n and len({records[i][3] for i in idx}) == 1
            k = int(prompt.split("In Image")[1].split(",")[0])
            assert answer == records[idx[k - 1]][2] and prompt.count("<image>") == n


def test_collate_pads_right_and_masks_the_padding() -> None:
    encoded = [([5, 6, 7], [-100, 6, 7]), ([5, 8], [-100, 8])]
    images = [torch.zeros(3, 4, 4), torch.ones(3, 4, 4), torch.ones(3, 4, 4)]
    batch = collate(encoded, images, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 8, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, 8, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["pixel_values"].shape == (3, 3, 4, 4)


def test_loss_falls_over_training(trained: tuple[Path, BaseModelReport]) -> None:
    _, report = trained
    assert [step for step, _ in report.losses] == [10, 20, 30, 40]
    first, last = report.losses[0][1], report.losses[-1][1]
    assert last < 0.8 * first, report.losses
    assert report.final_loss == last


def test_every_part_of_the_model_is_trained(
    trained: tuple[Path, BaseModelReport], tmp_path: Path
) -> None:
    out, _ = trained
    before = load_file(build_tiny_model(tmp_path / "init", seed=0) / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # LLaVA reads the vision tower's last hidden state, before its post-layernorm,
    # so that layernorm alone gets no gradient.
    assert all("post_layernorm" in k for k in before.keys() - changed)
    for part in ("vision_tower", "multi_modal_projector", "language_model", "lm_head"):
        assert any(part in k for k in changed), part


def test_saved_folder_loads_and_holds_its_report(trained: tuple[Path, BaseModelReport]) -> None:
    out, report = trained
    lm = load_model(ModelConfig(path=str(out), device="cpu"))
    assert lm.family.tokens_per_image == 64 and lm.num_layers == 4
    saved = json.loads((out / "base.json").read_text(encoding="utf-8"))
    assert BaseModelReport.model_validate(saved) == report == read_report(out)
    assert set(report.accuracy) == set(CELLS)
    assert all(0.0 <= acc <= 1.0 for acc in report.accuracy.values())
    assert report.params.model_dump().items() >= FAST.items()
    assert report.steps == 40 and report.version == __version__
    assert report.seconds >= report.train_seconds > 0


def test_ensure_reuses_a_folder_trained_with_the_same_params(
    trained: tuple[Path, BaseModelReport], monkeypatch: pytest.MonkeyPatch
) -> None:
    out, _ = trained
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    calls: list[Any] = []
    monkeypatch.setattr(base, "train_base_model", lambda *a, **k: calls.append(k))
    assert ensure_base_model(out, **FAST) == out
    assert calls == []
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime


def test_ensure_retrains_when_params_differ(
    trained: tuple[Path, BaseModelReport], tmp_path: Path
) -> None:
    out = shutil.copytree(trained[0], tmp_path / "model")  # the fixture stays as it was
    before = (out / "model.safetensors").read_bytes()
    assert ensure_base_model(out, progress=False, **(FAST | {"steps": 3})) == out
    report = read_report(out)
    assert report is not None and report.params.steps == 3 and len(report.losses) == 1
    assert (out / "model.safetensors").read_bytes() != before


def test_ensure_trains_a_folder_without_a_report(
    trained: tuple[Path, BaseModelReport], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A run interrupted before base.json was written must not count as finished.
    out = shutil.copytree(trained[0], tmp_path / "model")
    (out / "base.json").unlink()
    calls: list[Any] = []
    monkeypatch.setattr(base, "train_base_model", lambda *a, **k: calls.append(k))
    ensure_base_model(out, **FAST)
    assert len(calls) == 1 and calls[0]["steps"] == 40
