"""Idefics3 and SmolVLM: image splitting. An image becomes rows x cols tiles, each
`<fake_token_around_image><row_r_col_c>` + `image_seq_len` tokens, then a global view
`<fake_token_around_image><global-img>` + `image_seq_len` tokens; the pixel shuffle
keeps each view's tokens a row-major square grid. The number of tiles depends on the
image, so images are found in the stream: each ends with the run after its
`<global-img>` marker. Grid and pic-in-pic use the global view."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mia_dpo.models.families.base import Family, square_grid
from mia_dpo.models.spans import Picture, token_runs


class Idefics3(Family):
    model_types = ("idefics3", "smolvlm")
    examples = "HuggingFaceM4/Idefics3-8B-Llama3, HuggingFaceTB/SmolVLM-Instruct"
    picture = "the global view (the whole image, last of its tiles)"
    tiled = True

    def __init__(self, config: Any, processor: Any, name: str) -> None:
        super().__init__(config, processor, name)
        seq = getattr(processor, "image_seq_len", None)
        # Idefics3 keeps the marker's id, SmolVLM only its text
        marker = getattr(processor, "global_image_token_id", None)
        tag = getattr(processor, "global_image_tag", None) or getattr(
            processor, "global_image_token", None
        )
        if marker is None and isinstance(tag, str):
            marker = processor.tokenizer.convert_tokens_to_ids(tag)
        if not isinstance(seq, int) or not isinstance(marker, int):
            raise self.refuse("cannot read image_seq_len and the <global-img> token")
        self.seq = seq
        self.marker = marker
        self.grid = square_grid(seq, "image_seq_len")

    def pictures(self, ids: list[int], enc: Mapping[str, Any], images: range) -> list[Picture]:
        runs = token_runs([t == self.image_token_id for t in ids])
        out, count = [], 0
        for start, end in runs:
            count += end - start
            if start > 0 and ids[start - 1] == self.marker:  # the global view ends the image
                if end - start != self.seq:
                    raise ValueError(f"global view at {start}:{end} is not {self.seq} tokens")
                out.append(Picture(count, (count - self.seq, count), self.grid))
                count = 0
        if len(out) != len(images):
            raise ValueError(f"{len(out)} <global-img> views for {len(images)} image(s)")
        return out
