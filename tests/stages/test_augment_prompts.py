"""Exact prompt strings for the three augmentation formats."""

from __future__ import annotations

import random

import pytest

from mia_dpo.prompts import (
    DEFAULT_PIP_PHRASINGS,
    IMAGE_TAG,
    choose_phrasing,
    grid_prompt,
    has_bbox,
    later_turn,
    lower_first,
    pip_prompt,
    sequence_prompt,
    strip_image_tag,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("What is in the image?", "what is in the image?"),
        ("OCR the title.", "OCR the title."),
        ("TV shows like this?", "TV shows like this?"),
        ("TVs in the room?", "TVs in the room?"),
        ("I see a cat; is it sleeping?", "I see a cat; is it sleeping?"),
        ("I'm unsure: what colour is it?", "I'm unsure: what colour is it?"),
        ("Is the man tall?", "is the man tall?"),
        ("It looks red?", "it looks red?"),
        ("A dog?", "a dog?"),
        ("", ""),
        ("2 dogs or 3?", "2 dogs or 3?"),
        ("3D or 2D?", "3D or 2D?"),
        ("\u00c9t\u00e9?", "\u00e9t\u00e9?"),
        ("what already?", "what already?"),
    ],
)
def test_lower_first(text: str, expected: str) -> None:
    assert lower_first(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<image>\nWhat?", "What?"),
        ("What?\n<image>", "What?"),
        ("  <image>\n\n  What is it?  \n", "What is it?"),
        ("What is\n<image>\nthis?", "What is\nthis?"),
        ("No tag here.", "No tag here."),
        ("<image>", ""),
    ],
)
def test_strip_image_tag(text: str, expected: str) -> None:
    assert strip_image_tag(text) == expected


def test_sequence_prompt_every_position() -> None:
    for n in range(2, 6):
        header = "".join(f"Image{i}:<image>\n" for i in range(1, n + 1))
        for k in range(1, n + 1):
            prompt = sequence_prompt(n, k, "What colour is the car?")
            assert prompt == f"{header}In Image{k}, what colour is the car?"
            assert prompt.count(IMAGE_TAG) == n


def test_sequence_prompt_literal() -> None:
    assert sequence_prompt(3, 2, "<image>\nHow many birds?") == (
        "Image1:<image>\nImage2:<image>\nImage3:<image>\nIn Image2, how many birds?"
    )


@pytest.mark.parametrize(("n", "k"), [(3, 0), (3, 4), (0, 1)])
def test_sequence_prompt_bad_position(n: int, k: int) -> None:
    with pytest.raises(ValueError):
        sequence_prompt(n, k, "What?")


def test_grid_prompt_keeps_case() -> None:
    assert grid_prompt(4, "What is on the table?") == "<image>\nIn Image4, What is on the table?"
    assert grid_prompt(1, "<image>\nWhat?") == "<image>\nIn Image1, What?"
    with pytest.raises(ValueError):
        grid_prompt(0, "What?")


def test_pip_prompt() -> None:
    phrasing = "For the image in the center, {question}"
    assert pip_prompt(phrasing, "What is the man holding?\n<image>") == (
        "<image>\nFor the image in the center, what is the man holding?"
    )
    # Braces in the question are text, not format fields.
    assert pip_prompt(phrasing, "Is {x} written?") == (
        "<image>\nFor the image in the center, is {x} written?"
    )
    with pytest.raises(ValueError, match="question"):
        pip_prompt("For the image in the center,", "What?")


def test_later_turn() -> None:
    assert later_turn("sequence", 3, None, "And The colour?") == "In Image3, and The colour?"
    assert later_turn("grid", 2, None, "And The colour?") == "In Image2, And The colour?"
    phrasing = DEFAULT_PIP_PHRASINGS[1]
    assert later_turn("pic_in_pic", None, phrasing, "<image>\nWhy?") == (
        "Regarding the smaller picture in the middle, why?"
    )
    for fmt in ("sequence", "grid", "pic_in_pic"):
        assert IMAGE_TAG not in later_turn(fmt, 1, phrasing, "<image>\nWhat?")
    with pytest.raises(ValueError):
        later_turn("sequence", None, None, "What?")
    with pytest.raises(ValueError):
        later_turn("pic_in_pic", 1, None, "What?")
    with pytest.raises(ValueError):
        later_turn("mosaic", 1, None, "What?")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text",
    [
        "[0.12, 0.3, 0.5, 0.77]",
        "[10,20,30,40]",
        "Describe the region [0.1,0.2,0.3,0.4] please.",
        "box: [ 1 , 2 , 3 , 4 ]",
        "[0, 0.5, 1, .75]",
    ],
)
def test_has_bbox_positive(text: str) -> None:
    assert has_bbox(text)


@pytest.mark.parametrize(
    "text",
    ["[1, 2, 3]", "list [a, b]", "[1, 2, 3, 4, 5]", "[1, 2, x, 4]", "(1, 2, 3, 4)", ""],
)
def test_has_bbox_negative(text: str) -> None:
    assert not has_bbox(text)


def test_default_phrasings() -> None:
    assert len(DEFAULT_PIP_PHRASINGS) >= 20
    assert len(set(DEFAULT_PIP_PHRASINGS)) == len(DEFAULT_PIP_PHRASINGS)
    for phrasing in DEFAULT_PIP_PHRASINGS:
        assert phrasing.count("{question}") == 1, phrasing
        assert phrasing.endswith("{question}"), phrasing
        assert any(w in phrasing for w in ("center", "middle", "inset", "smaller")), phrasing
        # No other format fields: formatting with only `question` must succeed.
        assert "Q?" in phrasing.format(question="Q?")


def test_choose_phrasing_seeded() -> None:
    picks = [choose_phrasing(random.Random(seed), DEFAULT_PIP_PHRASINGS) for seed in range(200)]
    again = [choose_phrasing(random.Random(seed), DEFAULT_PIP_PHRASINGS) for seed in range(200)]
    assert picks == again
    assert set(picks) <= set(DEFAULT_PIP_PHRASINGS)
    assert len(set(picks)) > 10  # the seed actually varies the choice
    with pytest.raises(ValueError):
        choose_phrasing(random.Random(0), [])
