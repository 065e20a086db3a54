"""Synthetic LLaVA-format source data for the demo and the tests.

Three sub-sources, so distractors can be drawn "from the same source" as in the
paper: `colors` (what colour is the shape), `shapes` (which shape), `counts` (how
many). Pictures are flat shapes on a light background drawn without antialiasing,
so a test can read the answer back from the pixels, and the answers come from a
tiny closed vocabulary a toy tokenizer can learn.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from mia_dpo.errors import UserError

# Well separated in RGB, and each far from the near-white background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 0),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Counts are answered with digits; COUNT_WORDS[k - 1] is the answer for k shapes.
COUNT_WORDS: tuple[str, ...] = ("1", "2", "3", "4")
SUBSOURCES: tuple[str, ...] = ("colors", "shapes", "counts")

MIN_IMAGE_PX = 32
# Shape side as a (numerator, denominator) fraction of the room it is drawn in, least
# and most: bold shapes make perception errors rare, so the base model's mistakes on
# several images are about which image it read, not what it saw (recipe r2).
SIZE_MIN = (3, 5)
SIZE_MAX = (9, 10)
# Shapes sit centred in their room up to this many px either way: with few, large
# vision patches each patch token then sees the same part of a shape.
JITTER_PX = 3
_MARGIN_PX = 2  # keeps shapes off the border and apart from each other


def write_synthetic(out_dir: Path, n: int, seed: int = 0, image_px: int = 96) -> Path:
    """Write n samples as `out_dir/data.json` plus `out_dir/images/{subsource}/{id}.png`.

    Byte-identical for the same (n, seed, image_px). Returns the data.json path.
    """
    if n < 1:
        raise UserError(f"synthetic sample count must be >= 1, got {n}")
    if image_px < MIN_IMAGE_PX:
        raise UserError(f"synthetic image_px must be >= {MIN_IMAGE_PX}, got {image_px}")
    out_dir = Path(out_dir)
    records = []
    for i in range(n):
        # A string seed hashes the same in every process (unlike hash() of a tuple).
        rng = random.Random(f"mia-dpo-synthetic:{seed}:{i}")
        subsource = SUBSOURCES[i % len(SUBSOURCES)]
        sample_id = f"{subsource}-{i:06d}"
        image, question, answer = _draw_sample(subsource, rng, image_px)
        rel = f"{subsource}/{sample_id}.png"
        path = out_dir / "images" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        image.save(buf, format="PNG")  # PNG carries no timestamp, so bytes repeat
        path.write_bytes(buf.getvalue())
        records.append(
            {
                "id": sample_id,
                "image": rel,
                "conversations": [
                    {"from": "human", "value": f"<image>\n{question}"},
                    {"from": "gpt", "value": answer},
                ],
            }
        )
    data_path = out_dir / "data.json"
    data_path.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    return data_path


def _draw_sample(subsource: str, rng: random.Random, px: int) -> tuple[Image.Image, str, str]:
    colour = rng.choice(sorted(COLOURS))
    shape = rng.choice(SHAPES)
    image = Image.new("RGB", (px, px), _background(rng))
    draw = ImageDraw.Draw(image)
    if subsource == "counts":
        count = rng.randint(1, len(COUNT_WORDS))
        # One shape per quadrant: quadrants never overlap, so neither do the shapes.
        half = px // 2
        for cell in rng.sample(range(4), count):
            x0, y0 = (cell % 2) * half, (cell // 2) * half
            _draw_shape(draw, rng, shape, COLOURS[colour], (x0, y0, x0 + half, y0 + half))
        return image, f"How many {shape}s are there?", COUNT_WORDS[count - 1]
    _draw_shape(draw, rng, shape, COLOURS[colour], (0, 0, px, px))
    if subsource == "colors":
        return image, f"What colour is the {shape}?", colour
    if subsource == "shapes":
        return image, "Which shape is it?", shape
    raise ValueError(f"unknown synthetic sub-source {subsource!r}")


def _background(rng: random.Random) -> tuple[int, int, int]:
    # A mild tint so images of one sub-source are not all pixel-identical backgrounds.
    return (rng.randint(228, 255), rng.randint(228, 255), rng.randint(228, 255))


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    rng: random.Random,
    shape: str,
    fill: tuple[int, int, int],
    box: tuple[int, int, int, int],
) -> None:
    """Draw one shape of random size and position strictly inside `box`."""
    bx0, by0, bx1, by1 = box
    room = min(bx1 - bx0, by1 - by0) - 2 * _MARGIN_PX
    least, most = (max(6, room * a // b) for a, b in (SIZE_MIN, SIZE_MAX))
    size = rng.randint(least, most)
    lo_x, hi_x = bx0 + _MARGIN_PX, bx1 - _MARGIN_PX - size
    lo_y, hi_y = by0 + _MARGIN_PX, by1 - _MARGIN_PX - size
    x0 = min(hi_x, max(lo_x, (lo_x + hi_x) // 2 + rng.randint(-JITTER_PX, JITTER_PX)))
    y0 = min(hi_y, max(lo_y, (lo_y + hi_y) // 2 + rng.randint(-JITTER_PX, JITTER_PX)))
    x1, y1 = x0 + size - 1, y0 + size - 1  # PIL boxes include their last pixel
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
