"""PaliGemma: a SigLIP tower (no CLS), a fixed `image_seq_length` of patch tokens per
image (a row-major square grid), and a prefix-LM: `token_type_ids` are 0 on the prefix
(images and prompt, which attend to each other both ways) and 1 on the suffix (the
answer, causal). Scoring marks the teacher-forced answer as suffix, as generation
treats the tokens it produces."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mia_dpo.models.families.base import Family, square_grid
from mia_dpo.models.spans import Picture


class PaliGemma(Family):
    model_types = ("paligemma",)
    examples = "google/paligemma2-3b-mix-448"
    picture = "the image's patch grid (32x32 at 448 px)"

    def __init__(self, config: Any, processor: Any, name: str) -> None:
        super().__init__(config, processor, name)
        n = getattr(processor, "image_seq_length", None)
        if not isinstance(n, int):
            raise self.refuse("cannot read the processor's image_seq_length")
        self.n = n
        self.grid = square_grid(n, "image_seq_length")

    def pictures(self, ids: list[int], enc: Mapping[str, Any], images: range) -> list[Picture]:
        return [Picture(self.n, (0, self.n), self.grid) for _ in images]

    def token_fill(self, key: str) -> int:
        return 1 if key == "token_type_ids" else 0  # the answer is the suffix

    def training_processor(self, processor: Any) -> Any:
        return SuffixProcessor(processor)


class SuffixProcessor:
    """What TRL's vision collators call as their processor, for PaliGemma. TRL tokenizes
    the answers with a processor call without images, which PaliGemma's processor
    refuses; here prompts (with images) go to the real processor, less the `labels` it
    adds (the collator makes its own), and answers are tokenized as the suffix:
    `token_type_ids` 1, so the collator's concatenation is exactly the prefix-LM input."""

    def __init__(self, processor: Any) -> None:
        self._processor = processor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._processor, name)

    def __call__(self, images: Any = None, text: Any = None, **kwargs: Any) -> Any:
        if images is None:
            out = self._processor.tokenizer(text=text, **kwargs)
            out["token_type_ids"] = out["attention_mask"] * 1  # 1 on every answer token
            return out
        out = self._processor(images=images, text=text, **kwargs)
        out.pop("labels", None)
        return out
