"""LLaVA-1.5 and LLaVA-Interleave: every image is one fixed-resolution picture, a
CLIP or SigLIP tower's patch grid (a CLS token first with the "full" strategy on a
tower that has one). The processor's count per image is checked against the
config's arithmetic, so a tower the config cannot describe is refused, not misread."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mia_dpo.models.families.base import Family, get
from mia_dpo.models.spans import Picture

# Config attributes of variants whose token count depends on the image (tiling,
# merging of neighbouring patches, pooling): another family's business.
_DYNAMIC_MARKERS = (
    "image_grid_pinpoints",
    "spatial_merge_size",
    "temporal_patch_size",
    "downsample_factor",
    "downsample_ratio",
    "mm_tokens_per_image",
)
# Vision towers without a CLS token: every output token is a patch.
_NO_CLS_TOWERS = ("siglip_vision_model",)


class Llava(Family):
    model_types = ("llava",)
    examples = "llava-hf/llava-1.5-7b-hf, llava-hf/llava-interleave-qwen-7b-hf"
    picture = "the image's patch grid (24x24 for CLIP-L/336), CLS excluded"

    def __init__(self, config: Any, processor: Any, name: str) -> None:
        super().__init__(config, processor, name)
        vision = get(config, "vision_config")
        cannot = self.refuse("cannot map its image tokens to one fixed patch grid")
        if vision is None or any(
            get(c, m) is not None for c in (config, vision) for m in _DYNAMIC_MARKERS
        ):
            raise cannot
        image_size, patch = get(vision, "image_size"), get(vision, "patch_size")
        strategy = get(config, "vision_feature_select_strategy") or "default"
        if not isinstance(patch, int) or patch <= 0 or image_size is None:
            raise cannot
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        if strategy not in ("default", "full") or height % patch or width % patch:
            raise cannot
        self.grid = (height // patch, width // patch)
        # The tower's output: the patches, plus a CLS token first unless it has none;
        # "default" drops the first token, "full" keeps it.
        has_cls = get(vision, "model_type") not in _NO_CLS_TOWERS
        if strategy == "default" and not has_cls:
            raise cannot  # it would drop a real patch: no whole grid is left
        self.tokens_per_image = self.grid[0] * self.grid[1] + (strategy == "full" and has_cls)
        inserted = processor_tokens_per_image(processor)
        if inserted is not None and inserted != self.tokens_per_image:
            raise self.refuse(
                f"the processor inserts {inserted} image tokens per image but the model "
                f"produces {self.tokens_per_image} ({self.grid[0]}x{self.grid[1]} patches, "
                f"strategy {strategy!r})"
            )
        model_id = get(config, "image_token_id")
        if model_id is None:
            model_id = get(config, "image_token_index")
        if model_id is not None and model_id != self.image_token_id:
            raise self.refuse(
                f"processor image token id {self.image_token_id} != model's {model_id}"
            )

    def pictures(self, ids: list[int], enc: Mapping[str, Any], images: range) -> list[Picture]:
        n, (r, c) = self.tokens_per_image, self.grid
        return [Picture(n, (n - r * c, n), self.grid) for _ in images]


def processor_tokens_per_image(processor: Any) -> int | None:
    for attr in ("image_seq_length", "num_image_tokens"):
        value = getattr(processor, attr, None)
        if isinstance(value, int):
            return value
    # LlavaProcessor: what its replace_image_token computes for a crop-sized image.
    patch = getattr(processor, "patch_size", None)
    crop = getattr(getattr(processor, "image_processor", None), "crop_size", None)
    if not isinstance(patch, int) or not crop:
        return None
    crop = dict(crop)
    if "height" not in crop or "width" not in crop:
        return None
    count = (crop["height"] // patch) * (crop["width"] // patch)
    count += getattr(processor, "num_additional_image_tokens", 0) or 0
    if getattr(processor, "vision_feature_select_strategy", None) == "default":
        count -= 1
    return count
