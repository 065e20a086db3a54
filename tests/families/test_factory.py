"""Every tiny family loads with the Auto classes and runs a 2-image prompt; the table
`EXPECTED` documents what each real processor inserts for each image.

The prompt is our sequence format, `Image1:<img>\\nImage2:<img>\\nIn Image2, what colour
is the shape?`, rendered by the family's own chat template; the images are 40x30 (red)
and 30x40 (blue) so that aspect-ratio-dependent tiling shows. Token streams are
written run-length compressed: `<image>x16` is sixteen `<image>` tokens; newlines
vanish (the word-level tokenizer splits on whitespace).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

# HF_HUB_OFFLINE=1 is set by tests/conftest.py before transformers is imported.
from transformers import AutoModelForImageTextToText, AutoProcessor

from tests.families.factory import FAMILIES


@dataclass(frozen=True)
class Expected:
    """What the processor emits for the 2-image prompt."""

    # Tokens before the `Image1` label (BOS, turn markers).
    prefix: str
    # Per image: the tokens between its `ImageK :` label and the next word.
    spans: tuple[str, str]
    # Every tensor the processor returns: key -> shape.
    shapes: dict[str, tuple[int, ...]]
    # Values worth pinning (`image_sizes`, tiling ids; per-token outputs as runs, see `summary`).
    values: dict[str, Any] = field(default_factory=dict)


# Idefics3's span for one image cut into 2x2 tiles plus the global view.
_IDEFICS3_2X2 = " ".join(
    [f"<fake_token_around_image> <row_{r}_col_{c}> <image>x16" for r in (1, 2) for c in (1, 2)]
    + ["<fake_token_around_image> <global-img> <image>x16 <fake_token_around_image>"]
)

EXPECTED: dict[str, Expected] = {
    # SigLIP has no CLS token and "full" keeps every patch: (32/8)^2 = 16, not 17.
    "llava-interleave": Expected(
        prefix="<|im_start|> user",
        spans=("<image>x16", "<image>x16"),
        shapes={"input_ids": (1, 50), "attention_mask": (1, 50), "pixel_values": (2, 3, 32, 32)},
    ),
    # Anyres: base view 16 + tiles unpadded to the image's aspect ratio, one newline
    # token per row; the two orientations give different counts (44 vs 46).
    "llava-next": Expected(
        prefix="<s> [INST]",
        spans=("<image>x44", "<image>x46"),
        shapes={
            "input_ids": (1, 106),
            "attention_mask": (1, 106),
            "pixel_values": (2, 3, 3, 32, 32),
            "image_sizes": (2, 2),
        },
        values={"image_sizes": [[30, 40], [40, 30]]},
    ),
    # Image splitting: the image is resized to 128 on its longest side and cut into 64-pixel
    # tiles (2x2 for both orientations here), each tile 16 tokens after the pixel shuffle,
    # then a global view; pixel_values are flattened per prompt (5 views an image).
    # The template writes BOS and so does the Llama-3 tokenizer: two BOS tokens.
    "idefics3": Expected(
        prefix="<|begin_of_text|>x2 User :",
        spans=(_IDEFICS3_2X2, _IDEFICS3_2X2),
        shapes={
            "input_ids": (1, 202),
            "attention_mask": (1, 202),
            "pixel_values": (1, 10, 3, 64, 64),
            "pixel_attention_mask": (1, 10, 64, 64),
        },
    ),
    # 8x8 patches average-pooled to 16 soft tokens; token_type_ids are 1 on the soft tokens
    # only (not on <start_of_image>/<end_of_image>). Double BOS as for idefics3.
    "gemma3": Expected(
        prefix="<bos>x2 <start_of_turn> user",
        spans=(
            "<start_of_image> <image_soft_token>x16 <end_of_image>",
            "<start_of_image> <image_soft_token>x16 <end_of_image>",
        ),
        shapes={
            "input_ids": (1, 56),
            "attention_mask": (1, 56),
            "pixel_values": (2, 3, 64, 64),
            "token_type_ids": (1, 56),
        },
        values={"token_type_ids": "0x7 1x16 0x4 1x16 0x13"},
    ),
    # Images stay in place, but the processor writes BOS right after the last image (so
    # the prompt starts without one) and returns labels even without a suffix (all -100).
    # token_type_ids are 0 on the whole prefix: 1 would mark a suffix (the answer).
    "paligemma": Expected(
        prefix="",
        spans=("<image>x16", "<image>x16 <bos>"),
        shapes={
            "input_ids": (1, 46),
            "attention_mask": (1, 46),
            "token_type_ids": (1, 46),
            "labels": (1, 46),
            "pixel_values": (2, 3, 32, 32),
        },
        values={"token_type_ids": "0x46", "labels": "-100x46"},
    ),
    # Cross-attention: one <|image|> token per image in the decoder stream, pictures tiled
    # (40x30 -> 1x2 tiles, aspect id 2; 30x40 -> 2x1, aspect id 3). Every token attends
    # only to the latest image: the question sees Image2 alone. Double BOS again.
    "mllama": Expected(
        prefix="<|begin_of_text|>x2 <|start_header_id|> user <|end_header_id|>",
        spans=("<|image|>", "<|image|>"),
        shapes={
            "input_ids": (1, 24),
            "attention_mask": (1, 24),
            "cross_attention_mask": (1, 24, 2, 2),
            "pixel_values": (1, 2, 2, 3, 32, 32),
            "aspect_ratio_ids": (1, 2),
            "aspect_ratio_mask": (1, 2, 2),
        },
        values={
            "aspect_ratio_ids": [[2, 3]],
            "aspect_ratio_mask": [[[1, 1], [1, 1]]],
            "cross_attention_mask": "-x7 1x3 2x14",
        },
    ),
}

PROMPT_PARTS: list[dict[str, str]] = [
    {"type": "text", "text": "Image1:"},
    {"type": "image"},
    {"type": "text", "text": "\nImage2:"},
    {"type": "image"},
    {"type": "text", "text": "\nIn Image2, what colour is the shape?"},
]


def run_length(items: list[Any]) -> str:
    """`a a a b` -> `ax3 b`: image runs stay readable in the table."""
    out: list[str] = []
    i = 0
    while i < len(items):
        j = i
        while j < len(items) and items[j] == items[i]:
            j += 1
        out.append(str(items[i]) if j - i == 1 else f"{items[i]}x{j - i}")
        i = j
    return " ".join(out)


def summary(key: str, value: torch.Tensor) -> Any:
    """Per-token outputs of the one prompt as runs; anything else as a nested list."""
    if key == "cross_attention_mask":
        # Per token: which images (1-based) it may attend, `-` for none.
        seen = [
            ",".join(str(i + 1) for i, tiles in enumerate(row) if any(tiles)) or "-"
            for row in value[0].tolist()
        ]
        return run_length(seen)
    if key in {"token_type_ids", "labels"}:
        return run_length(value[0].tolist())
    return value.tolist()


def split_stream(tokens: list[str]) -> tuple[str, str, str]:
    """(prefix, image-1 span, image-2 span), cut at the `ImageK :` labels and `In`."""
    first = tokens.index("Image1")
    second = tokens.index("Image2", first)
    question = tokens.index("In", second)
    return (
        run_length(tokens[:first]),
        run_length(tokens[first + 2 : second]),
        run_length(tokens[second + 2 : question]),
    )


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every family built once per session (each takes well under a second)."""
    root = tmp_path_factory.mktemp("families")
    return {name: build(root / name) for name, build in FAMILIES.items()}


def test_every_family_is_documented() -> None:
    assert set(EXPECTED) == set(FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_two_image_prompt(family: str, family_dirs: dict[str, Path]) -> None:
    path = family_dirs[family]
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    expected = EXPECTED[family]

    messages = [{"role": "user", "content": PROMPT_PARTS}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    images = [Image.new("RGB", (40, 30), "red"), Image.new("RGB", (30, 40), "blue")]
    # Images nested per prompt: one list per text, as a batched caller passes them.
    batch = processor(text=[text], images=[images], return_tensors="pt")

    tokens = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    prefix, *spans = split_stream(tokens)
    assert prefix == expected.prefix
    assert tuple(spans) == expected.spans
    shapes = {k: tuple(v.shape) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    assert shapes == expected.shapes
    for key, value in expected.values.items():
        assert summary(key, batch[key]) == value, key

    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (
        1,
        batch["input_ids"].shape[1],
        model.config.get_text_config().vocab_size,
    )
    assert torch.isfinite(logits).all()
