"""Gemma 3: a SigLIP tower whose patches are average-pooled to `mm_tokens_per_image`
soft tokens (a square grid, row-major), each image wrapped in
`<start_of_image>...<end_of_image>`. `token_type_ids` mark the soft tokens (the model
lets an image's tokens see each other both ways): scoring passes them on, 0 on the
answer, as TRL's collator does at training."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mia_dpo.models.families.base import Family, get, square_grid
from mia_dpo.models.spans import Picture


class Gemma3(Family):
    model_types = ("gemma3",)
    examples = "google/gemma-3-4b-it"
    picture = "the pooled soft-token grid (16x16 of 256)"

    def __init__(self, config: Any, processor: Any, name: str) -> None:
        super().__init__(config, processor, name)
        # The processor's image_token_id is <start_of_image> (what the template writes);
        # the tokens that carry the picture are the soft tokens the config names.
        soft = get(config, "image_token_index")
        if soft is None:
            soft = get(config, "image_token_id")
        n = getattr(processor, "image_seq_length", None)
        if not isinstance(soft, int) or not isinstance(n, int):
            raise self.refuse("cannot read the soft-token id and count")
        if n != get(config, "mm_tokens_per_image"):
            raise self.refuse(
                f"the processor inserts {n} soft tokens per image, the model pools to "
                f"{get(config, 'mm_tokens_per_image')}"
            )
        if getattr(getattr(processor, "image_processor", None), "do_pan_and_scan", False):
            raise self.refuse("pan-and-scan crops are not mapped: set do_pan_and_scan false")
        self.image_token_id = soft
        self.n = n
        self.grid = square_grid(n, "mm_tokens_per_image")

    def pictures(self, ids: list[int], enc: Mapping[str, Any], images: range) -> list[Picture]:
        return [Picture(self.n, (0, self.n), self.grid) for _ in images]
