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

    # Tokens before the `Image1` label (BOS, turn markers; images moved up front).
    prefix: str
    # Per image: the tokens between its `ImageK :` label and the next word.
    spans: tuple[str, str]
    # Every tensor the processor returns: key -> shape.
    shapes: dict[str, tuple[int, ...]]
    # Values worth pinning (`image_sizes`, `image_grid_thw`, run-length `token_type_ids`).
    values: dict[str, Any] = field(default_factory=dict)


_TEXT = {"input_ids", "attention_mask"}

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
        got = batch[key][0].tolist() if key == "token_type_ids" else batch[key].tolist()
        assert (run_length(got) if key == "token_type_ids" else got) == value, key

    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (
        1,
        batch["input_ids"].shape[1],
        model.config.get_text_config().vocab_size,
    )
    assert torch.isfinite(logits).all()
