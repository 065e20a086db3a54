"""Attention ratios and the rejection rule of MIA-DPO (docs/method.md §3).

Input everywhere: the layer's head-mean attention, averaged over the response rows,
restricted to the image-token columns -> one non-negative value per image token
(1-D numpy array, tokens in prompt order). Patch tokens of one image are laid out
row-major on its patch grid (LLaVA-1.5: 24x24).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from fractions import Fraction

import numpy as np
from numpy.typing import ArrayLike

from mia_dpo.models.spans import Picture
from mia_dpo.records import FORMATS, AugmentedSample


def _as_1d(token_att: ArrayLike) -> np.ndarray:
    arr = np.asarray(token_att, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"expected a 1-D array of per-token attention, got shape {arr.shape}")
    return arr


def _round_half_up(num: int, den: int) -> int:
    """round(num / den) with halves rounded up, in exact integer arithmetic (Python's
    round() rounds halves to even, which would make 2.5 and 3.5 round differently)."""
    return (2 * num + den) // (2 * den)


def sequence_shares(token_att: ArrayLike, spans: Sequence[tuple[int, int]]) -> list[float]:
    """Share of each image: mean attention over its tokens, normalised to sum 1.

    token_att: (N,) over ALL image tokens in order; spans: per image (start, end) into it.
    ``shares[k - 1]`` is the sequence ratio of target k:
    mean(att over target tokens) / sum_i mean(att over image i tokens).
    """
    att = _as_1d(token_att)
    if not spans:
        raise ValueError("no image spans")
    means = []
    for start, end in spans:
        if not 0 <= start < end <= len(att):
            raise ValueError(f"span ({start}, {end}) outside the {len(att)} image tokens")
        means.append(float(att[start:end].mean()))
    total = sum(means)
    if total <= 0:
        raise ValueError("no attention on any image token")
    return [m / total for m in means]


def sequence_ratio(token_att: ArrayLike, spans: Sequence[tuple[int, int]], target: int) -> float:
    """The sequence ratio of the 1-based ``target`` image."""
    shares = sequence_shares(token_att, spans)
    if not 1 <= target <= len(shares):
        raise ValueError(f"target {target} outside 1..{len(shares)}")
    return shares[target - 1]


def _patch_map(token_att: ArrayLike, patch_grid: tuple[int, int]) -> np.ndarray:
    att = _as_1d(token_att)
    pr, pc = patch_grid
    if pr <= 0 or pc <= 0 or att.size != pr * pc:
        raise ValueError(f"{att.size} tokens do not fill a {pr}x{pc} patch grid")
    return att.reshape(pr, pc)  # (pr, pc), row-major as the vision tower emits patches


def block_bounds(n: int, parts: int) -> list[int]:
    """Boundaries splitting ``n`` patches into ``parts`` blocks: round(i * n / parts),
    halves up, for i = 0..parts. Blocks differ by at most one patch when ``n`` is not
    divisible (7 into 3 -> [0, 2, 5, 7]), and the split is the tile layout's own
    proportions: docs/method.md splits the token grid evenly and ignores the label bands."""
    if not 1 <= parts <= n:
        raise ValueError(f"cannot split {n} patches into {parts} blocks")
    return [_round_half_up(i * n, parts) for i in range(parts + 1)]


def grid_block_sums(
    token_att: ArrayLike, patch_grid: tuple[int, int], layout: tuple[int, int]
) -> np.ndarray:
    """Attention summed per collage block: (rows, cols).

    token_att: (pr * pc,) of the ONE collage image; patch_grid: (pr, pc);
    layout: (rows, cols) of the collage. Block edges from ``block_bounds``.
    """
    grid = _patch_map(token_att, patch_grid)  # (pr, pc)
    rows, cols = layout
    rb, cb = block_bounds(grid.shape[0], rows), block_bounds(grid.shape[1], cols)
    out = np.empty((rows, cols), dtype=np.float64)
    for r in range(rows):
        for c in range(cols):
            out[r, c] = grid[rb[r] : rb[r + 1], cb[c] : cb[c + 1]].sum()
    return out


def grid_ratio(
    token_att: ArrayLike, patch_grid: tuple[int, int], layout: tuple[int, int], target: int
) -> float:
    """sum(target block) / sum(all image tokens); ``target`` is 1-based, row-major."""
    blocks = grid_block_sums(token_att, patch_grid, layout)  # (rows, cols)
    if not 1 <= target <= blocks.size:
        raise ValueError(f"target {target} outside 1..{blocks.size}")
    total = float(blocks.sum())
    if total <= 0:
        raise ValueError("no attention on any image token")
    return float(blocks.flat[target - 1]) / total


def pip_ratio(
    token_att: ArrayLike, patch_grid: tuple[int, int], border_fraction: float = 1 / 6
) -> float:
    """sum(centre region) / sum(all): the centre drops a border of
    round(border_fraction * side) patches on each side (24 -> middle 16x16, 7 -> 5x5)."""
    grid = _patch_map(token_att, patch_grid)  # (pr, pc)
    frac = Fraction(border_fraction).limit_denominator(1_000_000)
    borders = []
    for side in grid.shape:
        # exact arithmetic: 1/6 * 24 is 3.999... in floating point and must give 4
        b = _round_half_up(frac.numerator * side, frac.denominator)
        if b < 0 or 2 * b >= side:
            raise ValueError(f"border {b} leaves no centre in a side of {side} patches")
        borders.append(b)
    total = float(grid.sum())
    if total <= 0:
        raise ValueError("no attention on any image token")
    br, bc = borders
    centre = grid[br : grid.shape[0] - br, bc : grid.shape[1] - bc]
    return float(centre.sum()) / total


def reject_by_attention(
    fmt: str,
    n_images: int,
    ratio: float,
    sequence_thresholds: Mapping[int, float],
    grid_thresholds: Mapping[int, float],
    pic_in_pic_threshold: float,
) -> tuple[bool, float]:
    """(rejected?, threshold used). The boundary differs by format, as in the reference:
    sequence rejects at ratio <= threshold; grid and pic-in-pic at ratio < threshold."""
    if fmt == "sequence":
        threshold = _lookup(sequence_thresholds, n_images, fmt)
        return ratio <= threshold, threshold
    if fmt == "grid":
        threshold = _lookup(grid_thresholds, n_images, fmt)
        return ratio < threshold, threshold
    if fmt == "pic_in_pic":
        if n_images != 2:
            raise ValueError(f"pic_in_pic has 2 images, got {n_images}")
        return ratio < pic_in_pic_threshold, pic_in_pic_threshold
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")


def _lookup(table: Mapping[int, float], n_images: int, fmt: str) -> float:
    if n_images not in table:
        raise ValueError(f"no {fmt} threshold for {n_images} images")
    return float(table[n_images])


def attention_ratio(
    sample: AugmentedSample,
    token_att: ArrayLike,
    pictures: Sequence[Picture],
    pip_border_fraction: float,
) -> tuple[float, list[float]]:
    """(ratio on the target, share per picture) of one scored response, from the mean
    attention per image token: every image's tokens, in prompt order, each image
    `pictures[k].n_tokens` long (tiles and markers included, as the family counts them)."""
    token_att = _as_1d(token_att)
    bounds = np.cumsum([0] + [p.n_tokens for p in pictures]).tolist()
    if bounds[-1] != token_att.size:
        raise ValueError(f"{token_att.size} image tokens, the images have {bounds[-1]}")
    if sample.format == "sequence":
        shares = sequence_shares(token_att, list(itertools.pairwise(bounds)))
        return shares[sample.target_index - 1], list(shares)
    # one picture: the view its family names (a LLaVA CLS token, anyres tiles and an
    # Idefics3 image's tiles belong to no block)
    (picture,) = pictures
    patches = token_att[picture.view[0] : picture.view[1]]
    if sample.format == "grid":
        assert sample.layout is not None
        blocks = grid_block_sums(patches, picture.grid, tuple(sample.layout))  # (rows, cols)
        total = float(blocks.sum()) or 1.0
        shares = (blocks / total).flatten().tolist()
        return shares[sample.target_index - 1], shares
    ratio = pip_ratio(patches, picture.grid, pip_border_fraction)
    return ratio, [1.0 - ratio, ratio]  # background, inset
