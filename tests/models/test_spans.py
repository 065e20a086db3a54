"""Laying per-image token counts over the image-token runs a processor emitted."""

from __future__ import annotations

import pytest

from mia_dpo.models.spans import Picture, group_runs, token_runs


def pic(n: int, view: tuple[int, int] | None = None, grid: tuple[int, int] = (1, 1)) -> Picture:
    return Picture(n, view or (0, 1), grid)


def test_runs_of_a_hand_built_row() -> None:
    # left padding (0), BOS (2), image token 4
    row = [0, 0, 2, 7, 4, 4, 4, 8, 9, 4, 4, 4, 5]
    assert token_runs([t == 4 for t in row]) == [(4, 7), (9, 12)]
    assert token_runs([True, True]) == [(0, 2)]
    assert token_runs([False]) == []


def test_packed_images_one_per_run_and_adjacent() -> None:
    found = group_runs([(4, 7), (9, 12)], [pic(3), pic(3)])
    assert [t.runs for t in found] == [((4, 7),), ((9, 12),)]
    # adjacent tags make one run: split by the counts
    found = group_runs([(1, 7)], [pic(3), pic(3)])
    assert [t.columns for t in found] == [[1, 2, 3], [4, 5, 6]]


def test_tiled_images_take_whole_runs() -> None:
    # two tiles and a global view per image, separated by marker tokens
    runs = [(1, 3), (4, 6), (7, 9), (11, 13), (14, 16), (17, 19)]
    found = group_runs(runs, [pic(6, (4, 6), (1, 2)), pic(6, (4, 6), (1, 2))], tiled=True)
    assert [t.runs for t in found] == [((1, 3), (4, 6), (7, 9)), ((11, 13), (14, 16), (17, 19))]
    assert found[1].columns[4:6] == [17, 18]  # the view: the global tile


@pytest.mark.parametrize(
    ("runs", "pictures", "tiled", "message"),
    [
        # a truncation cut the last image short
        ([(1, 4), (5, 7)], [pic(3), pic(3)], False, r"run at 5:7 has 2 tokens, image 2 needs 3"),
        ([(1, 6)], [pic(3), pic(3)], False, r"run at 4:6 has 2 tokens, image 2 needs 3"),
        ([(1, 4)], [pic(3), pic(3)], False, "image 2 needs 3 tokens, the sequence has 0 left"),
        ([(1, 4), (5, 9)], [pic(3), pic(3)], False, "1 image tokens left over after 2 image"),
        # a tiled image never ends inside a run
        ([(1, 3), (4, 7)], [pic(4)], True, "image 1 ends inside the image-token run at 4:7"),
        ([], [pic(1)], False, "image 1 needs 1 tokens, the sequence has 0 left"),
    ],
)
def test_mismatches_are_refused(runs, pictures, tiled, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        group_runs(runs, pictures, tiled=tiled)


def test_a_view_must_hold_its_grid() -> None:
    with pytest.raises(ValueError, match="does not hold a 2x2 patch grid"):
        Picture(5, (0, 3), (2, 2))
