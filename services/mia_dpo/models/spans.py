"""Where each image sits in a token sequence (docs/method.md §3).

Pure bookkeeping, no torch: the model-family layer (`models/families/`) says how
many image tokens each image got and which of them form the picture's patch grid;
`group_runs` lays those counts over the runs of image tokens the processor really
inserted, and refuses any mismatch instead of guessing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Picture:
    """What a family knows about one image before looking at the token stream."""

    n_tokens: int  # image tokens the processor inserts for it (all views, all tiles)
    # The tokens that form ONE picture's patch grid (the base view of a tiled image),
    # as (start, end) offsets into the image's own tokens, and its (rows, cols).
    view: tuple[int, int]
    grid: tuple[int, int]

    def __post_init__(self) -> None:
        a, b = self.view
        if not 0 <= a < b <= self.n_tokens or b - a != self.grid[0] * self.grid[1]:
            raise ValueError(
                f"view {self.view} of {self.n_tokens} tokens does not hold a "
                f"{self.grid[0]}x{self.grid[1]} patch grid"
            )


@dataclass(frozen=True)
class ImageTokens:
    """One image's tokens in an item's sequence: the picture plus where it landed."""

    picture: Picture
    runs: tuple[tuple[int, int], ...]  # (start, end) columns in the item's ids, end exclusive

    @property
    def n_tokens(self) -> int:
        return self.picture.n_tokens

    @property
    def columns(self) -> list[int]:
        return [c for s, e in self.runs for c in range(s, e)]


def token_runs(is_image: Sequence[bool]) -> list[tuple[int, int]]:
    """(start, end) of each maximal run of True, in order."""
    runs: list[tuple[int, int]] = []
    start = None
    for i, flag in enumerate(is_image):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(is_image)))
    return runs


def group_runs(
    runs: Sequence[tuple[int, int]], pictures: Sequence[Picture], *, tiled: bool = False
) -> list[ImageTokens]:
    """Assign image-token runs to images in order, by each image's token count.

    Packed (default): each image lies inside one run, and a run may hold several
    adjacent images (`<image><image>` with no text between). Tiled: each image is one
    or more whole runs (tiles or rows separated by marker tokens). Anything else, and
    any token left over or missing, is a ValueError: a truncation that cut into an
    image, or a processor the family misreads, never a silently shifted span.
    """
    out: list[ImageTokens] = []
    queue = [list(r) for r in runs]
    for k, pic in enumerate(pictures):
        taken: list[tuple[int, int]] = []
        need = pic.n_tokens
        while need > 0:
            if not queue:
                raise ValueError(
                    f"image {k + 1} needs {pic.n_tokens} tokens, the sequence has "
                    f"{pic.n_tokens - need} left"
                )
            start, end = queue[0]
            if end - start > need and (tiled or taken):
                raise ValueError(
                    f"image {k + 1} ends inside the image-token run at {start}:{end} "
                    f"({need} of its {pic.n_tokens} tokens left)"
                )
            if not tiled and end - start < need:
                raise ValueError(
                    f"image-token run at {start}:{end} has {end - start} tokens, "
                    f"image {k + 1} needs {pic.n_tokens}"
                )
            take = min(need, end - start)
            taken.append((start, start + take))
            need -= take
            if start + take == end:
                queue.pop(0)
            else:
                queue[0][0] = start + take
        out.append(ImageTokens(pic, tuple(taken)))
    if queue:
        left = sum(e - s for s, e in queue)
        raise ValueError(f"{left} image tokens left over after {len(pictures)} image(s)")
    return out
