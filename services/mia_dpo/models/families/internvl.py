"""InternVL (the HF-native checkpoints, e.g. OpenGVLab/InternVL3-8B-hf): an image is
cut into up to `max_patches` tiles of the tower's size plus, when there is more than
one, a thumbnail of the whole image last; each becomes `image_seq_length` tokens after
the pixel shuffle (a row-major square grid), all between `<img>` and `</img>`. The
number of tiles depends on the image, so each `<img>...</img>` run is one image; grid
and pic-in-pic use the thumbnail (or the single tile)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mia_dpo.models.families.base import Family, square_grid
from mia_dpo.models.spans import Picture, token_runs


class InternVL(Family):
    model_types = ("internvl",)
    examples = "OpenGVLab/InternVL3-8B-hf"
    picture = "the thumbnail (the whole image, last tile), or the one tile of a small image"

    def __init__(self, config: Any, processor: Any, name: str) -> None:
        super().__init__(config, processor, name)
        seq = getattr(processor, "image_seq_length", None)
        start = getattr(processor, "start_image_token_id", None)
        if not isinstance(seq, int) or not isinstance(start, int):
            raise self.refuse("cannot read image_seq_length and the <img> token")
        self.seq, self.start = seq, start
        self.grid = square_grid(seq, "image_seq_length")

    def pictures(self, ids: list[int], enc: Mapping[str, Any], images: range) -> list[Picture]:
        out = []
        for start, end in token_runs([t == self.image_token_id for t in ids]):
            n = end - start
            if start == 0 or ids[start - 1] != self.start or n % self.seq:
                raise ValueError(f"image tokens at {start}:{end} are not <img> + k x {self.seq}")
            out.append(Picture(n, (n - self.seq, n), self.grid))
        if len(out) != len(images):
            raise ValueError(f"{len(out)} <img> runs for {len(images)} image(s)")
        return out
