"""LLaVA-NeXT (LLaVA-1.6) and LLaVA-OneVision: anyres. Each image becomes a base view
(the whole image at the tower's resolution) followed by high-resolution tiles unpadded
to the image's aspect ratio, one newline token per row (OneVision pools the tiles when
there are more than its `anyres_max_9` allows, and closes a lone base view with a
newline). The processor's own count per image (from `image_sizes`) places the image;
grid and pic-in-pic use the base view, which both models put first."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mia_dpo.models.families.base import Family, get, square_grid
from mia_dpo.models.spans import Picture


class LlavaNext(Family):
    model_types = ("llava_next", "llava_onevision")
    examples = "llava-hf/llava-v1.6-mistral-7b-hf, llava-hf/llava-onevision-qwen2-7b-ov-hf"
    picture = "the base view (whole image at the tower's size: 24x24 / 27x27), before the tiles"

    def __init__(self, config: Any, processor: Any, name: str) -> None:
        super().__init__(config, processor, name)
        self.strategy = get(config, "vision_feature_select_strategy") or "default"
        count = getattr(processor, "_get_number_of_features", None)
        self.patch = getattr(processor, "patch_size", None)
        # OneVision's processor names the base view's size instead of the patch size
        self.base = getattr(processor, "num_image_tokens", None)
        if (
            self.strategy not in ("default", "full")
            or count is None
            or not (self.patch or self.base)
        ):
            raise self.refuse("cannot read anyres image token counts from its processor")
        self._count = count
        # A CLS token leads the base view with the "full" strategy (CLIP has one).
        self.cls = (getattr(processor, "num_additional_image_tokens", 0) or 0) * (
            self.strategy == "full"
        )

    def pictures(self, ids: list[int], enc: Mapping[str, Any], images: range) -> list[Picture]:
        sizes = enc["image_sizes"]
        height, width = enc["pixel_values"].shape[-2:]
        if isinstance(self.base, int):
            grid = square_grid(self.base, "num_image_tokens")
        else:
            grid = (int(height) // self.patch, int(width) // self.patch)
        out = []
        # OneVision gives the images of a multi-image prompt their base view and a
        # newline only (its processor returns batch_num_images to say so)
        base_only = "batch_num_images" in enc and len(images) > 1
        for i in images:
            orig_h, orig_w = (int(x) for x in sizes[i])
            if base_only:
                n = grid[0] * grid[1] + 1
            else:
                n = self._count(orig_h, orig_w, int(height), int(width))
            n -= self.strategy == "default"  # as the processor's replace_image_token
            out.append(Picture(n, (self.cls, self.cls + grid[0] * grid[1]), grid))
        return out
