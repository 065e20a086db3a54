"""The one prompt path: our `<image>`-tagged text -> chat messages -> the model's template."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoProcessor

from mia_dpo.models.prompting import answer_messages, chat_text, prompt_messages, user_content
from mia_dpo.prompts import (
    DEFAULT_PIP_PHRASINGS,
    grid_prompt,
    pip_prompt,
    sequence_prompt,
)

IMG = {"type": "image"}


def text(t: str) -> dict[str, str]:
    return {"type": "text", "text": t}


@pytest.mark.parametrize(
    ("prompt", "parts"),
    [
        (
            "Image1:<image>\nImage2:<image>\nIn Image2, what colour is the square?",
            [
                text("Image1:"),
                IMG,
                text("\nImage2:"),
                IMG,
                text("\nIn Image2, what colour is the square?"),
            ],
        ),
        ("<image>\nIn Image3, Which shape is it?", [IMG, text("\nIn Image3, Which shape is it?")]),
        ("<image><image>", [IMG, IMG]),
        ("Look:\n\n<image>", [text("Look:\n\n"), IMG]),
        ("no images at all", [text("no images at all")]),
        ("", []),
    ],
)
def test_user_content_splits_at_tags_in_order(prompt: str, parts: list[dict[str, Any]]) -> None:
    assert user_content(prompt) == parts


def test_message_shapes_are_what_trl_expects() -> None:
    assert prompt_messages("<image>\nQ?") == [{"role": "user", "content": [IMG, text("\nQ?")]}]
    assert answer_messages("red") == [{"role": "assistant", "content": [text("red")]}]


@pytest.fixture(scope="module")
def processor(tiny_model_dir: Path) -> Any:
    return AutoProcessor.from_pretrained(tiny_model_dir)


def test_chat_text_keeps_images_in_prompt_order(processor: Any) -> None:
    prompt = sequence_prompt(3, 2, "What colour is the square?")
    assert chat_text(processor, prompt) == (
        "<s>USER: Image1:<image>\nImage2:<image>\nImage3:<image>\n"
        "In Image2, what colour is the square? ASSISTANT:"
    )


@pytest.mark.parametrize(
    "prompt",
    [
        grid_prompt(4, "Which shape is it?"),
        pip_prompt(DEFAULT_PIP_PHRASINGS[5], "How many circles are there?"),
        sequence_prompt(5, 5, "Which shape is it?"),
    ],
)
def test_chat_text_has_one_placeholder_per_tag(processor: Any, prompt: str) -> None:
    rendered = chat_text(processor, prompt)
    assert rendered.count("<image>") == prompt.count("<image>")
    assert rendered.endswith(" ASSISTANT:")
    # the prompt itself appears verbatim: the template adds only its markers
    assert prompt in rendered


class StubProcessor:
    """A processor whose template renders images the way `render` says."""

    image_token = "<image>"

    def __init__(self, images_first: bool, drop_images: bool = False) -> None:
        self.images_first = images_first
        self.drop_images = drop_images

    def apply_chat_template(self, messages: list[dict[str, Any]], **_: Any) -> str:
        parts = messages[0]["content"]
        images = "" if self.drop_images else "<image>" * sum(p["type"] == "image" for p in parts)
        texts = "".join(p.get("text", "") for p in parts if p["type"] == "text")
        body = images + texts if self.images_first else texts + images
        return f"USER: {body} ASSISTANT:"


def test_chat_text_refuses_a_template_that_moves_images_first() -> None:
    # Some hub LLaVA templates render every image before the text: the Image1/Image2
    # labels would no longer sit next to their pictures.
    prompt = sequence_prompt(2, 1, "Which shape is it?")
    with pytest.raises(ValueError, match="prompt order"):
        chat_text(StubProcessor(images_first=True), prompt)


def test_chat_text_refuses_a_template_that_drops_images() -> None:
    with pytest.raises(ValueError, match=r"0 image placeholder\(s\).*2 <image> tag"):
        chat_text(StubProcessor(images_first=False, drop_images=True), "<image>a<image>b")
