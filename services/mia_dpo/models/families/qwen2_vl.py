"""Qwen2-VL and Qwen2.5-VL: dynamic resolution. Each image is cut into 14-pixel
patches on a grid that follows its size (`image_grid_thw`: frames, rows, cols of
patches), and each 2x2 block of patches (`merge_size`) becomes one token, emitted
row-major over the merged grid between `<|vision_start|>` and `<|vision_end|>`.
Positions are M-RoPE (time, row, column), which the model computes from the ids and
`image_grid_thw`: scoring passes every processor output and never sets position ids."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mia_dpo.models.families.base import Family
from mia_dpo.models.spans import Picture


class Qwen2VL(Family):
    model_types = ("qwen2_vl", "qwen2_5_vl")
    examples = "Qwen/Qwen2-VL-7B-Instruct, Qwen/Qwen2.5-VL-7B-Instruct"
    picture = "the whole image's merged-patch grid (rows x cols from image_grid_thw / 2)"
    positions_from_mask = False

    def __init__(self, config: Any, processor: Any, name: str) -> None:
        super().__init__(config, processor, name)
        merge = getattr(getattr(processor, "image_processor", None), "merge_size", None)
        if not isinstance(merge, int) or merge <= 0:
            raise self.refuse("cannot read the image processor's merge_size")
        self.merge = merge

    def pictures(self, ids: list[int], enc: Mapping[str, Any], images: range) -> list[Picture]:
        out = []
        for i in images:
            t, h, w = (int(x) for x in enc["image_grid_thw"][i])
            if t != 1 or h % self.merge or w % self.merge:
                raise ValueError(f"image {i + 1}: grid {t}x{h}x{w} is not one mergeable frame")
            grid = (h // self.merge, w // self.merge)
            n = grid[0] * grid[1]
            out.append(Picture(n, (0, n), grid))
        return out
