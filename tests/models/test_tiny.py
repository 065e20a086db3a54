"""The tiny LLaVA: deterministic weights, a tokenizer that reads our prompts, and a chat
template that TRL's vision DPO collator renders exactly as generation does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor
from trl.data_utils import apply_chat_template as trl_apply_chat_template
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

from mia_dpo.demo.synthetic import COLOURS, COUNT_WORDS, SHAPES
from mia_dpo.demo.tiny import build_tiny_model
from mia_dpo.models.prompting import answer_messages, chat_text, encode, prompt_messages
from mia_dpo.prompts import (
    DEFAULT_PIP_PHRASINGS,
    grid_prompt,
    pip_prompt,
    sequence_prompt,
)

QUESTIONS = (
    *(f"What colour is the {s}?" for s in SHAPES),
    *(f"How many {s}s are there?" for s in SHAPES),
    "Which shape is it?",
)
ANSWERS = (*COLOURS, *SHAPES, *COUNT_WORDS)


@pytest.fixture(scope="module")
def processor(tiny_model_dir: Path) -> Any:
    return AutoProcessor.from_pretrained(tiny_model_dir)


def test_same_seed_same_weights_other_seed_other_weights(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    again = build_tiny_model(tmp_path / "again", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "processor_config.json"):
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
    other = load_file(build_tiny_model(tmp_path / "other", seed=1) / "model.safetensors")
    base = load_file(tiny_model_dir / "model.safetensors")
    assert other.keys() == base.keys()
    assert not all(torch.equal(other[k], base[k]) for k in base)


def test_build_leaves_the_callers_random_stream_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(tmp_path / "m", seed=7, text_layers=1, vision_layers=1)
    assert torch.equal(torch.rand(3), expected)


def test_sizes_follow_the_arguments(tmp_path: Path) -> None:
    proc = AutoProcessor.from_pretrained(
        build_tiny_model(tmp_path / "m", image_size=32, patch_size=8, text_layers=2)
    )
    enc = proc(text=["USER: <image>"], images=[Image.new("RGB", (40, 40))], return_tensors="pt")
    assert enc["pixel_values"].shape == (1, 3, 32, 32)
    assert int((enc["input_ids"] == proc.image_token_id).sum()) == 16


def test_vocabulary_covers_the_synthetic_task(processor: Any) -> None:
    tok = processor.tokenizer
    for text in (*QUESTIONS, *ANSWERS, *(q[0].lower() + q[1:] for q in QUESTIONS)):
        assert tok.unk_token_id not in tok.encode(text), text


@pytest.mark.parametrize(
    ("prompt", "decoded"),
    [
        (
            sequence_prompt(3, 2, "What colour is the square?"),
            "Image1: <image> Image2: <image> Image3: <image> In Image2, what colour is the square?",
        ),
        (
            pip_prompt(DEFAULT_PIP_PHRASINGS[5], "How many circles are there?"),
            "<image> Focus on the smaller image in the center: how many circles are there?",
        ),
        (grid_prompt(9, "Which shape is it?"), "<image> In Image9, Which shape is it?"),
    ],
)
def test_tokenizer_round_trips_our_prompts(processor: Any, prompt: str, decoded: str) -> None:
    tok = processor.tokenizer
    token_ids = tok.encode(prompt)
    assert tok.unk_token_id not in token_ids
    assert tok.bos_token_id not in token_ids  # the chat template writes the BOS, not encode()
    assert tok.decode(token_ids) == decoded
    assert tok.convert_ids_to_tokens(tok.encode("Image1:<image>")) == ["Image1", ":", "<image>"]


def test_every_pip_phrasing_is_in_vocabulary(processor: Any) -> None:
    tok = processor.tokenizer
    for phrasing in DEFAULT_PIP_PHRASINGS:
        for question in QUESTIONS:
            assert tok.unk_token_id not in tok.encode(pip_prompt(phrasing, question)), phrasing


def test_trl_style_example_renders_prompt_then_answer(processor: Any) -> None:
    prompt = sequence_prompt(2, 1, "Which shape is it?")
    full = processor.apply_chat_template(
        prompt_messages(prompt) + answer_messages("red"), tokenize=False
    )
    assert full.endswith(" red</s>")
    assert full.startswith(chat_text(processor, prompt))
    # TRL splits prompt and completion by common prefix: the completion is the answer alone
    example = {
        "prompt": prompt_messages(prompt),
        "chosen": answer_messages("red"),
        "rejected": answer_messages("blue"),
    }
    rendered = trl_apply_chat_template(example, processor)
    assert rendered["prompt"] == chat_text(processor, prompt)
    assert (rendered["chosen"], rendered["rejected"]) == (" red</s>", " blue</s>")


def test_trl_vision_collator_sees_the_generation_prompt_tokens(processor: Any) -> None:
    prompt = sequence_prompt(2, 2, "What colour is the circle?")
    images = [Image.new("RGB", (64, 64), (200, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 200))]
    generation = processor(text=[chat_text(processor, prompt)], images=images, return_tensors="pt")
    prompt_ids = generation["input_ids"][0]
    example = {
        "images": images,
        "prompt": prompt_messages(prompt),
        "chosen": answer_messages("blue"),
        "rejected": answer_messages("red"),
    }
    batch = DataCollatorForVisionPreference(processor)([example])
    n = len(prompt_ids)
    tok = processor.tokenizer
    for row, answer in ((0, "blue"), (1, "red")):  # chosen rows first, then rejected
        assert torch.equal(batch["input_ids"][row, :n], prompt_ids)
        completion = batch["input_ids"][row][batch["completion_mask"][row].bool()]
        assert tok.convert_ids_to_tokens(completion.tolist()) == [answer, "</s>"]
    assert torch.equal(batch["pixel_values"][:2], generation["pixel_values"])


def test_a_bos_adding_tokenizer_gets_one_bos_as_in_training(processor: Any) -> None:
    """Llama-style tokenizers add a BOS that the chat template writes too: the stages
    encode with the tokenizer's special tokens off (`encode`), as TRL's collator does,
    so generation, scoring and training all see `<s>USER:` once."""
    from tokenizers import processors

    tok = processor.tokenizer
    bos = tok.bos_token_id
    saved = tok.backend_tokenizer.post_processor
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, bos)]
    )
    try:
        prompt = sequence_prompt(2, 1, "What colour is the circle?")
        images = [Image.new("RGB", (64, 64), (0, 200, 0)), Image.new("RGB", (64, 64), (0, 0, 9))]
        text = chat_text(processor, prompt)
        assert text.startswith(tok.bos_token)
        naive = processor(text=[text], images=images, return_tensors="pt")["input_ids"][0]
        assert naive[:2].tolist() == [bos, bos]  # the defect this guards against
        ours = encode(processor, [text], images, return_tensors="pt")["input_ids"][0]
        assert ours[0] == bos and ours[1] != bos and (ours == bos).sum() == 1
        example = {
            "images": images,
            "prompt": prompt_messages(prompt),
            "chosen": answer_messages("green"),
            "rejected": answer_messages("red"),
        }
        batch = DataCollatorForVisionPreference(processor)([example])
        assert torch.equal(batch["input_ids"][0, : len(ours)], ours)
    finally:
        tok.backend_tokenizer.post_processor = saved
