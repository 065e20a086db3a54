"""Mistral3 and LLaVA with a Pixtral tower: the image keeps its own aspect ratio (longest
side capped), its patches (2x2-merged in Mistral3) are emitted row by row as `[IMG]`
tokens, each row closed by `[IMG_BREAK]` and the last by `[IMG_END]`. So an image is
several runs of image tokens; its grid is (rows, cols) of the processed `image_sizes`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mia_dpo.models.families.base import Family
from mia_dpo.models.spans import Picture


class Pixtral(Family):
    model_types = ("mistral3",)
    examples = "mistralai/Mistral-Small-3.1-24B-Instruct-2503, mistral-community/pixtral-12b"
    picture = "the whole image's patch grid, rows as the [IMG_BREAK]s delimit them"
    tiled = True

    def __init__(self, config: Any, processor: Any, name: str) -> None:
        super().__init__(config, processor, name)
        patch = getattr(processor, "patch_size", None)
        merge = getattr(processor, "spatial_merge_size", 1) or 1
        if not isinstance(patch, int) or patch <= 0:
            raise self.refuse("cannot read the processor's patch_size")
        self.step = patch * merge  # pixels per token, each way

    def pictures(self, ids: list[int], enc: Mapping[str, Any], images: range) -> list[Picture]:
        out = []
        for i in images:
            height, width = (int(x) for x in enc["image_sizes"][i])
            grid = (height // self.step, width // self.step)
            n = grid[0] * grid[1]
            out.append(Picture(n, (0, n), grid))
        return out
