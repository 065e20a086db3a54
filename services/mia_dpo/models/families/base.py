"""What every model family tells the stages (docs/method.md §3).

A family reads a processed batch the way its own model will: how many image tokens
each image got, which of them form the picture that grid and pic-in-pic attention is
split over, and which processor outputs mark tokens (and so must grow with the
teacher-forced answer in scoring). Everything comes from the processor's own output
(per-image counts, `image_sizes`, `image_grid_thw`, marker tokens); config arithmetic
only checks it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from mia_dpo.errors import UserError
from mia_dpo.models.spans import ImageTokens, Picture, group_runs, token_runs


def get(config: Any, name: str) -> Any:
    # Configs may be objects or (for sub-configs of older checkpoints) plain dicts.
    return config.get(name) if isinstance(config, dict) else getattr(config, name, None)


def config_token_id(config: Any, processor: Any) -> int | None:
    """The image placeholder id: the processor's, else the config's (two spellings)."""
    for value in (
        getattr(processor, "image_token_id", None),
        get(config, "image_token_id"),
        get(config, "image_token_index"),
    ):
        if isinstance(value, int):
            return value
    return None


class Family:
    """One architecture family. Subclasses read their config in `__init__` (raising
    UserError for a variant they cannot map) and say per image what it got."""

    #: model_type values of transformers configs this family serves
    model_types: ClassVar[tuple[str, ...]] = ()
    #: the checkpoints it was written for (README model table)
    examples: ClassVar[str] = ""
    #: how grid and pic-in-pic attention maps onto its tokens (README model table)
    picture: ClassVar[str] = ""
    #: images spread over several runs of image tokens (tiles, rows) rather than one
    tiled: ClassVar[bool] = False
    #: scoring may pass position ids computed from the mask, as generate() does; False
    #: where the model builds its own (M-RoPE): then every processor output goes as is
    positions_from_mask: ClassVar[bool] = True

    def __init__(self, config: Any, processor: Any, name: str) -> None:
        self.config = config
        self.processor = processor
        self.name = name
        self.model_type = get(config, "model_type") or type(config).__name__
        token_id = config_token_id(config, processor)
        if token_id is None:
            raise self.refuse("no image token id in the processor or the config")
        self.image_token_id = token_id

    def refuse(self, why: str) -> UserError:
        return UserError(f"model.path: {self.name} (model type {self.model_type!r}): {why}")

    # -- what a subclass provides -------------------------------------------------
    def pictures(self, ids: list[int], enc: Mapping[str, Any], images: range) -> list[Picture]:
        """Per image of one item (`images`: its indices in the batch's flat image
        list), its token count and picture view. `ids` are the item's own ids."""
        raise NotImplementedError

    def token_fill(self, key: str) -> int:
        """Value of a per-token processor output (token_type_ids...) on answer tokens."""
        return 0

    def training_processor(self, processor: Any) -> Any:
        """What TRL's vision collator should call as its processor: the processor itself,
        unless the family's cannot tokenize an answer on its own (PaliGemma)."""
        return processor

    # -- shared -----------------------------------------------------------------
    def image_tokens(
        self, ids: torch.Tensor | list[int], enc: Mapping[str, Any], images: range
    ) -> list[ImageTokens]:
        """Every image of one item, in order, with its columns in `ids` (1-D)."""
        seq = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        runs = token_runs([t == self.image_token_id for t in seq])
        return group_runs(runs, self.pictures(seq, enc, images), tiled=self.tiled)


def square_grid(n: int, what: str) -> tuple[int, int]:
    side = round(n**0.5)
    if side * side != n:
        raise ValueError(f"{what}: {n} tokens are not a square patch grid")
    return side, side
