"""The model-family layer: one module per architecture family (docs/method.md §3).

`family_for` picks the family from the config's `model_type`; an unknown type, or
one refused by name with its reason, is a one-line UserError naming `model.path`.
"""

from __future__ import annotations

from typing import Any

from mia_dpo.errors import UserError
from mia_dpo.models.families.base import Family, get
from mia_dpo.models.families.gemma3 import Gemma3
from mia_dpo.models.families.idefics3 import Idefics3
from mia_dpo.models.families.internvl import InternVL
from mia_dpo.models.families.llava import Llava
from mia_dpo.models.families.llava_next import LlavaNext
from mia_dpo.models.families.paligemma import PaliGemma
from mia_dpo.models.families.pixtral import Pixtral
from mia_dpo.models.families.qwen2_vl import Qwen2VL

FAMILIES: tuple[type[Family], ...] = (
    Llava, LlavaNext, Qwen2VL, Idefics3, Gemma3, InternVL, Pixtral, PaliGemma
)  # fmt: skip
_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_BY_TYPE)
SUPPORTED = ", ".join(SUPPORTED_MODEL_TYPES)

# Refused by name, with the reason (docs/method.md §3 needs image tokens in the decoder).
REFUSED_WHY = {
    "mllama": "cross-attention model: its decoder has no image tokens to attend to",
    "internlmxcomposer2": (
        "remote-code model: its image embeddings are spliced in at text markers, so its "
        "spans would have to come from its own masks"
    ),
}


def family_for(config: Any, processor: Any, name: str) -> Family:
    model_type = get(config, "model_type") or type(config).__name__
    if model_type in REFUSED_WHY:
        raise UserError(
            f"model.path: {name}: model type {model_type!r} is not supported: "
            f"{REFUSED_WHY[model_type]}; supported: {SUPPORTED}"
        )
    family = _BY_TYPE.get(model_type)
    vision = get(config, "vision_config")
    if model_type == "llava" and vision is not None and get(vision, "model_type") == "pixtral":
        family = Pixtral  # pixtral-12b: a LLaVA config around a Pixtral tower
    if family is None:
        raise UserError(
            f"model.path: {name}: model type {model_type!r} has no model family here; "
            f"supported: {SUPPORTED}"
        )
    return family(config, processor, name)


__all__ = ["FAMILIES", "REFUSED_WHY", "SUPPORTED", "SUPPORTED_MODEL_TYPES", "Family", "family_for"]
