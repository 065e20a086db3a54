"""Question rewriting for the three augmentation formats (docs/method.md §1a-§1c).

Every builder strips `<image>` tags from the incoming question before adding its
own: the number of tags must equal the number of images handed to the model, and
LLaVA-style source questions still carry theirs.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from mia_dpo.records import Format

IMAGE_TAG = "<image>"

# Our own phrasings naming the inset image; the reference ships 93 of its own.
# Each is a template with one `{question}` slot, filled with lower_first(question).
DEFAULT_PIP_PHRASINGS: tuple[str, ...] = (
    "For the image in the center, {question}",
    "Regarding the smaller picture in the middle, {question}",
    "Looking only at the small picture placed in the middle, {question}",
    "Considering the inset image at the center, {question}",
    "About the picture that sits in the middle of the larger one, {question}",
    "Focus on the smaller image in the center: {question}",
    "In the centrally placed inset picture, {question}",
    "Based on the small image in the middle, {question}",
    "For the picture inset at the center of this image, {question}",
    "Turning to the smaller central picture, {question}",
    "Concerning the image embedded in the middle, {question}",
    "Ignore the surrounding background picture. In the middle image, {question}",
    "Judging from the inset in the center, {question}",
    "With respect to the smaller picture at the center, {question}",
    "When you look at the middle inset image, {question}",
    "Using only the picture pasted in the center, {question}",
    "In the small image placed at the center of the frame, {question}",
    "Paying attention only to the centered inset picture, {question}",
    "Thinking about the middle picture, not the background, {question}",
    "From the smaller image located in the middle, {question}",
    "Regarding the inset photo in the center of the picture, {question}",
    "Examining just the picture placed at the center, {question}",
    "For the central inset, which is the smaller image, {question}",
    "In the picture nested in the middle of the scene, {question}",
    "Looking at the reduced-size image in the center, {question}",
    "Considering just the picture in the middle of the composition, {question}",
    "As for the smaller image that sits at the center, {question}",
    "Focusing on the inner picture placed in the middle, {question}",
    "Based only on the centered smaller picture, {question}",
    "Referring to the image inset at the middle, {question}",
)

# A bounding box as LLaVA writes it: four ints or decimals, e.g. [0.12, 0.3, 0.5, 0.77].
_NUMBER = r"-?(?:\d+(?:\.\d*)?|\.\d+)"
_BBOX_RE = re.compile(r"\[\s*" + r"\s*,\s*".join([_NUMBER] * 4) + r"\s*\]")
# The leading run of letters (Unicode letters, no digits or underscore).
_FIRST_WORD_RE = re.compile(r"[^\W\d_]+")


def strip_image_tag(text: str) -> str:
    """Remove every `<image>` tag and the whitespace around it.

    LLaVA puts "<image>\\n" before or "\\n<image>" after the question; a tag in the
    middle of the text leaves a single line break between the two parts.
    """
    parts = (part.strip() for part in text.split(IMAGE_TAG))
    return "\n".join(part for part in parts if part)


def lower_first(text: str) -> str:
    """Lower-case the first letter so the question reads on after "In Image2, ".

    Deviation from docs/method.md (which lower-cases unconditionally): a first word that
    starts with two capitals (an acronym such as "OCR", "TV", "TVs") or is the
    pronoun "I" ("I", "I'm") keeps its case, since lower-casing it changes the
    meaning or reads as a typo. Text not starting with a letter is returned as is.
    """
    match = _FIRST_WORD_RE.match(text)
    if match is None:
        return text
    word = match.group()
    if word == "I" or (len(word) >= 2 and word[0].isupper() and word[1].isupper()):
        return text
    return text[0].lower() + text[1:]


def _check_position(k: int, n: int | None = None) -> None:
    if k < 1 or (n is not None and k > n):
        upper = "" if n is None else f" and <= {n}"
        raise ValueError(f"target position k must be >= 1{upper}, got {k}")


def _check_phrasing(phrasing: str) -> None:
    if "{question}" not in phrasing:
        raise ValueError(f"pic-in-pic phrasing must contain '{{question}}': {phrasing!r}")


def sequence_prompt(n: int, k: int, question: str) -> str:
    """First turn for `n` separate images with the target at 1-based position `k`."""
    if n < 1:
        raise ValueError(f"sequence image count must be >= 1, got {n}")
    _check_position(k, n)
    header = "".join(f"Image{i}:{IMAGE_TAG}\n" for i in range(1, n + 1))
    return f"{header}In Image{k}, {lower_first(strip_image_tag(question))}"


def grid_prompt(k: int, question: str) -> str:
    """First turn for a collage whose tile labelled Image{k} holds the target.

    The question's case is kept: docs/method.md writes `{question}` unchanged here,
    unlike the sequence and pic-in-pic formats.
    """
    _check_position(k)
    return f"{IMAGE_TAG}\nIn Image{k}, {strip_image_tag(question)}"


def pip_prompt(phrasing: str, question: str) -> str:
    """First turn for a pic-in-pic image, `phrasing` naming the centre image."""
    _check_phrasing(phrasing)
    return f"{IMAGE_TAG}\n" + phrasing.format(question=lower_first(strip_image_tag(question)))


def later_turn(fmt: Format, k: int | None, phrasing: str | None, question: str) -> str:
    """A later turn's question, re-targeted like the first turn but with no image tags.

    `k` is needed for sequence and grid, `phrasing` for pic_in_pic (the same one as
    the first turn, so the whole conversation names the target the same way).
    """
    question = strip_image_tag(question)
    if fmt == "sequence" or fmt == "grid":
        if k is None:
            raise ValueError(f"later_turn({fmt!r}) needs the target position k")
        _check_position(k)
        body = lower_first(question) if fmt == "sequence" else question
        return f"In Image{k}, {body}"
    if fmt == "pic_in_pic":
        if phrasing is None:
            raise ValueError("later_turn('pic_in_pic') needs the phrasing of the first turn")
        _check_phrasing(phrasing)
        return phrasing.format(question=lower_first(question))
    raise ValueError(f"format must be 'sequence', 'grid' or 'pic_in_pic', got {fmt!r}")


def has_bbox(text: str) -> bool:
    """True when `text` holds a box `[x1, y1, x2, y2]`.

    Grid and pic-in-pic drop such samples: compositing moves and rescales the
    target, so the coordinates in the question or answer would be wrong.
    """
    return _BBOX_RE.search(text) is not None


def choose_phrasing(rng: random.Random, phrasings: Sequence[str]) -> str:
    """Pick one phrasing with the sample's own seeded generator (reruns repeat it)."""
    if not phrasings:
        raise ValueError("no pic-in-pic phrasings configured")
    return rng.choice(phrasings)
