"""Attention ratios and the rejection rule (docs/method.md §3), on hand-built arrays."""

from __future__ import annotations

import numpy as np
import pytest

from mia_dpo.models.ratios import (
    block_bounds,
    grid_block_sums,
    grid_ratio,
    pip_ratio,
    reject_by_attention,
    sequence_ratio,
    sequence_shares,
)

SEQ_THR = {2: 0.8, 3: 0.7, 4: 0.6, 5: 0.6}
GRID_THR = {2: 0.7, 3: 0.6, 4: 0.5, 6: 0.4, 9: 0.3}
PIP_THR = 0.8


# --- sequence ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_sequence_shares_are_mean_per_image_normalised(n: int) -> None:
    # image i has i+1 tokens (unequal lengths: means, not sums, decide), each worth (i+1)
    lengths = [i + 1 for i in range(n)]
    att = np.concatenate([np.full(length, float(i + 1)) for i, length in enumerate(lengths)])
    starts = np.cumsum([0, *lengths])
    spans = [(int(starts[i]), int(starts[i + 1])) for i in range(n)]
    shares = sequence_shares(att, spans)
    total = sum(range(1, n + 1))
    assert shares == pytest.approx([(i + 1) / total for i in range(n)])
    assert sum(shares) == pytest.approx(1.0)
    for target in range(1, n + 1):
        assert sequence_ratio(att, spans, target) == pytest.approx(target / total)


def test_sequence_ratio_uses_means_not_sums() -> None:
    # image 1: 4 tokens of 1 (sum 4, mean 1); image 2: 1 token of 3 (sum 3, mean 3)
    att = [1, 1, 1, 1, 3]
    assert sequence_ratio(att, [(0, 4), (4, 5)], 2) == pytest.approx(0.75)


def test_sequence_bad_input() -> None:
    with pytest.raises(ValueError):
        sequence_shares([1.0, 2.0], [(0, 3)])
    with pytest.raises(ValueError):
        sequence_shares([1.0, 2.0], [])
    with pytest.raises(ValueError):
        sequence_shares([0.0, 0.0], [(0, 1), (1, 2)])
    with pytest.raises(ValueError):
        sequence_ratio([1.0, 2.0], [(0, 1), (1, 2)], 3)
    with pytest.raises(ValueError):
        sequence_shares(np.ones((2, 2)), [(0, 1)])


# --- grid -------------------------------------------------------------------------------

LAYOUTS = [(1, 2), (1, 3), (2, 2), (2, 3), (3, 3)]


@pytest.mark.parametrize(
    ("n", "parts", "expected"),
    [
        (8, 2, [0, 4, 8]),
        (8, 3, [0, 3, 5, 8]),  # 2.67 -> 3, 5.33 -> 5
        (7, 2, [0, 4, 7]),  # 3.5 -> 4 (halves up)
        (7, 3, [0, 2, 5, 7]),  # 2.33 -> 2, 4.67 -> 5
        (5, 2, [0, 3, 5]),  # 2.5 -> 3 (Python's round() would give 2)
        (24, 3, [0, 8, 16, 24]),
        (24, 1, [0, 24]),
    ],
)
def test_block_bounds(n: int, parts: int, expected: list[int]) -> None:
    assert block_bounds(n, parts) == expected


def labelled_grid(side: int, layout: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Per patch, the 1-based row-major block it falls in (bounds computed by hand),
    and the attention array: every patch of block k has value k."""
    rows, cols = layout
    row_cuts = {8: {1: [0, 8], 2: [0, 4, 8], 3: [0, 3, 5, 8]},
                7: {1: [0, 7], 2: [0, 4, 7], 3: [0, 2, 5, 7]},
                24: {1: [0, 24], 2: [0, 12, 24], 3: [0, 8, 16, 24]}}  # fmt: skip
    rb, cb = row_cuts[side][rows], row_cuts[side][cols]
    block = np.zeros((side, side), dtype=int)
    for r in range(rows):
        for c in range(cols):
            block[rb[r] : rb[r + 1], cb[c] : cb[c + 1]] = r * cols + c + 1
    return block, block.astype(float).ravel()


@pytest.mark.parametrize("side", [8, 7, 24])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_grid_block_sums_and_ratio(side: int, layout: tuple[int, int]) -> None:
    block, att = labelled_grid(side, layout)
    rows, cols = layout
    sums = grid_block_sums(att, (side, side), layout)
    assert sums.shape == (rows, cols)
    for k in range(1, rows * cols + 1):
        n_patches = int((block == k).sum())
        assert sums.flat[k - 1] == pytest.approx(k * n_patches)
    total = att.sum()
    for k in range(1, rows * cols + 1):
        expected = k * int((block == k).sum()) / total
        assert grid_ratio(att, (side, side), layout, k) == pytest.approx(expected)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_grid_all_attention_on_one_tile(layout: tuple[int, int]) -> None:
    rows, cols = layout
    for target in range(1, rows * cols + 1):
        r, c = divmod(target - 1, cols)
        grid = np.zeros((8, 8))
        rb, cb = block_bounds(8, rows), block_bounds(8, cols)
        grid[rb[r] : rb[r + 1], cb[c] : cb[c + 1]] = 0.5
        att = grid.ravel()
        assert grid_ratio(att, (8, 8), layout, target) == pytest.approx(1.0)
        others = [k for k in range(1, rows * cols + 1) if k != target]
        assert all(grid_ratio(att, (8, 8), layout, k) == 0.0 for k in others)


def test_grid_patch_order_is_row_major() -> None:
    # 2x4 patch grid, layout 1x2: tokens 0-1 and 4-5 are the left half
    att = np.array([1, 1, 0, 0, 1, 1, 0, 0], dtype=float)
    assert grid_block_sums(att, (2, 4), (1, 2)).tolist() == [[4.0, 0.0]]


def test_grid_bad_input() -> None:
    with pytest.raises(ValueError):
        grid_block_sums(np.ones(63), (8, 8), (2, 2))
    with pytest.raises(ValueError):
        grid_ratio(np.ones(64), (8, 8), (2, 2), 5)
    with pytest.raises(ValueError):
        grid_block_sums(np.ones(4), (2, 2), (3, 3))


# --- pic-in-pic -------------------------------------------------------------------------


@pytest.mark.parametrize(("side", "border"), [(24, 4), (7, 1), (6, 1), (12, 2)])
def test_pip_ratio_centre_region(side: int, border: int) -> None:
    grid = np.ones((side, side))
    grid[border : side - border, border : side - border] = 3.0
    centre = (side - 2 * border) ** 2
    expected = 3 * centre / (3 * centre + (side * side - centre))
    assert pip_ratio(grid.ravel(), (side, side)) == pytest.approx(expected)


def test_pip_24_is_middle_16() -> None:
    grid = np.zeros((24, 24))
    grid[4:20, 4:20] = 1.0
    assert pip_ratio(grid.ravel(), (24, 24)) == pytest.approx(1.0)
    grid[3, 3] = 1.0  # one patch just outside the 16x16 centre
    assert pip_ratio(grid.ravel(), (24, 24)) == pytest.approx(256 / 257)


def test_pip_uniform_and_border_fraction() -> None:
    assert pip_ratio(np.ones(576), (24, 24)) == pytest.approx(256 / 576)
    assert pip_ratio(np.ones(576), (24, 24), border_fraction=0.25) == pytest.approx(144 / 576)
    assert pip_ratio(np.ones(576), (24, 24), border_fraction=0.0) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        pip_ratio(np.ones(4), (2, 2), border_fraction=0.49)


# --- rejection rule ---------------------------------------------------------------------


def reject(fmt: str, n: int, ratio: float) -> tuple[bool, float]:
    return reject_by_attention(fmt, n, ratio, SEQ_THR, GRID_THR, PIP_THR)


@pytest.mark.parametrize(("n", "thr"), sorted(SEQ_THR.items()))
def test_sequence_rejects_at_or_below_threshold(n: int, thr: float) -> None:
    assert reject("sequence", n, thr) == (True, thr)  # exactly equal: rejected
    assert reject("sequence", n, thr - 1e-9) == (True, thr)
    assert reject("sequence", n, thr + 1e-9) == (False, thr)


@pytest.mark.parametrize(("n", "thr"), sorted(GRID_THR.items()))
def test_grid_rejects_strictly_below_threshold(n: int, thr: float) -> None:
    assert reject("grid", n, thr) == (False, thr)  # exactly equal: NOT rejected
    assert reject("grid", n, thr - 1e-9) == (True, thr)
    assert reject("grid", n, thr + 1e-9) == (False, thr)


def test_pic_in_pic_rejects_strictly_below_threshold() -> None:
    assert reject("pic_in_pic", 2, 0.8) == (False, 0.8)  # exactly equal: NOT rejected
    assert reject("pic_in_pic", 2, 0.8 - 1e-9) == (True, 0.8)
    assert reject("pic_in_pic", 2, 0.95) == (False, 0.8)


def test_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown format"):
        reject("collage", 2, 0.5)
    with pytest.raises(ValueError, match="no sequence threshold"):
        reject("sequence", 6, 0.5)
    with pytest.raises(ValueError, match="no grid threshold"):
        reject("grid", 5, 0.5)
    with pytest.raises(ValueError):
        reject("pic_in_pic", 3, 0.5)
