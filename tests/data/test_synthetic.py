"""The synthetic source set: deterministic, valid LLaVA input, and answers that match pixels."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mia_dpo.data.images import decode_image
from mia_dpo.data.source import parse_sample, read_index, resolve_image
from mia_dpo.demo.synthetic import COLOURS, COUNT_WORDS, SHAPES, write_synthetic
from mia_dpo.errors import UserError

N = 24


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("synthetic"), N, seed=3)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_same_bytes_on_every_call(tmp_path: Path, dataset: Path) -> None:
    again = write_synthetic(tmp_path / "again", N, seed=3)
    assert again == tmp_path / "again" / "data.json"
    assert _files(again.parent) == _files(dataset.parent)
    other = write_synthetic(tmp_path / "other", N, seed=4)
    assert _files(other.parent) != _files(dataset.parent)


def test_reads_back_through_the_source_reader(dataset: Path) -> None:
    records, problems = read_index(dataset.read_bytes(), "data.json")
    assert problems == [] and len(records) == N
    samples = [parse_sample(raw, line) for line, raw in records]
    assert len({s.id for s in samples}) == N
    assert Counter(s.source for s in samples) == {"colors": 8, "shapes": 8, "counts": 8}
    assert all("source" not in raw for _, raw in records)  # folders name the source
    for s in samples:
        assert s.image.startswith(f"{s.source}/") and len(s.turns) == 1
        assert s.turns[0].question.startswith("<image>\n")
        path = resolve_image(str(dataset.parent / "images"), s.image)
        im = decode_image(Path(path).read_bytes(), s.image, max_pixels=96 * 96, min_side=96)
        assert im.size == (96, 96)


def _load(dataset: Path) -> list[tuple[str, str, str, np.ndarray]]:
    out = []
    for raw in json.loads(dataset.read_text()):
        pixels = np.asarray(decode_image((dataset.parent / "images" / raw["image"]).read_bytes(),
                                         raw["image"], max_pixels=10**6, min_side=1))  # fmt: skip
        question, answer = raw["conversations"][0]["value"], raw["conversations"][1]["value"]
        out.append((raw["image"].split("/")[0], question, answer, pixels))
    return out


def _foreground(pixels: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Mask of non-background pixels and their (single) colour; the corner is background."""
    mask = np.any(pixels != pixels[0, 0], axis=-1)
    colours = Counter(map(tuple, pixels[mask].tolist()))
    assert len(colours) == 1, "shapes are flat, unantialiased, one colour"
    return mask, next(iter(colours))


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, each as an array of (y, x)."""
    seen = np.zeros_like(mask)
    parts = []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        stack, part = [start], []
        seen[start] = True
        while stack:
            y, x = stack.pop()
            part.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                inside = 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1]
                if inside and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        parts.append(np.array(part))
    return parts


def _shape_of(part: np.ndarray) -> str:
    """Fill ratio of the bounding box: square ~1, circle ~pi/4, triangle ~1/2."""
    (y0, x0), (y1, x1) = part.min(axis=0), part.max(axis=0)
    ratio = len(part) / ((y1 - y0 + 1) * (x1 - x0 + 1))
    return "square" if ratio > 0.93 else "circle" if ratio > 0.65 else "triangle"


def test_answers_match_the_pixels(dataset: Path) -> None:
    for subsource, question, answer, pixels in _load(dataset):
        mask, colour = _foreground(pixels)
        assert colour in COLOURS.values()
        assert not mask[0, :].any() and not mask[-1, :].any()  # nothing touches the border
        assert not mask[:, 0].any() and not mask[:, -1].any()
        parts = _components(mask)
        assert len({_shape_of(p) for p in parts}) == 1, "one kind of shape per image"
        shape = _shape_of(parts[0])
        assert shape in question or subsource == "shapes"
        if subsource == "colors":
            assert question == f"<image>\nWhat colour is the {shape}?"
            assert COLOURS[answer] == colour and len(parts) == 1
        elif subsource == "shapes":
            assert question == "<image>\nWhich shape is it?"
            assert answer == shape and answer in SHAPES and len(parts) == 1
        else:
            assert question == f"<image>\nHow many {shape}s are there?"
            # Separate components means the shapes neither overlap nor touch.
            assert answer in COUNT_WORDS and answer == str(len(parts))


def test_all_counts_and_colours_occur(tmp_path: Path) -> None:
    records = json.loads(write_synthetic(tmp_path, 90, seed=0).read_text())
    answers = Counter(r["conversations"][1]["value"] for r in records)
    assert set(COUNT_WORDS) <= set(answers)
    assert set(SHAPES) <= set(answers)
    assert set(COLOURS) <= set(answers)


@pytest.mark.parametrize(("n", "px"), [(0, 96), (3, 16)])
def test_bad_arguments(tmp_path: Path, n: int, px: int) -> None:
    with pytest.raises(UserError):
        write_synthetic(tmp_path, n, image_px=px)


def test_small_images_still_fit(tmp_path: Path) -> None:
    for _, _, answer, pixels in _load(write_synthetic(tmp_path, 12, seed=1, image_px=32)):
        mask, _ = _foreground(pixels)
        assert mask.any() and not mask[0].any() and not mask[-1].any()
        assert answer
