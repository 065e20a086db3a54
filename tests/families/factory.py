"""Tiny randomly initialised vision-language models, one builder per architecture family.

Each builder writes, with `save_pretrained`, a model built from the architecture's
real transformers config and model classes, its real processor and image-processor
classes, a local word-level tokenizer (tests/families/tokenizer.py) and a chat
template in the hub checkpoint's role format (tests/families/templates.py), into a
folder that `AutoProcessor` and `AutoModelForImageTextToText` load offline.

Sizes are the smallest that keep each architecture's shape rules (head dims that
rotary embeddings can split, image sizes that tile): a forward pass takes
milliseconds. Image processors are the PIL ("slow") classes: the default ("fast")
ones need torchvision, which has no wheel for the CPU torch we run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel, ProcessorMixin

from tests.families.templates import chatml, llava_next_mistral
from tests.families.tokenizer import TokenizerSpec, build_tokenizer

SEED = 0
HIDDEN = 64
HEADS = 4
TEXT_LAYERS = 2
VISION_HIDDEN = 32
VISION_LAYERS = 2

# Qwen-style specials shared by the families with a ChatML template.
_CHATML = ("<|im_start|>", "<|im_end|>")


def _text(tokenizer: Any, **extra: Any) -> dict[str, Any]:
    """Keyword arguments every decoder config takes: tiny sizes and our token ids."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": TEXT_LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS // 2,
        "max_position_embeddings": 4096,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        **extra,
    }


def _vision(**extra: Any) -> dict[str, Any]:
    """Keyword arguments the ViT-style vision configs (CLIP, SigLIP, Idefics3...) take."""
    return {
        "hidden_size": VISION_HIDDEN,
        "intermediate_size": 2 * VISION_HIDDEN,
        "num_hidden_layers": VISION_LAYERS,
        "num_attention_heads": 2,
        **extra,
    }


def _save(
    out: Path,
    model_cls: type[PreTrainedModel],
    config: PretrainedConfig,
    processor: ProcessorMixin,
) -> Path:
    """Seeded random weights (eager attention: tests read attention maps), then save."""
    # fork_rng: the fixed seed must not reset the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = model_cls._from_config(config, attn_implementation="eager")
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def llava_interleave(out: Path) -> Path:
    """llava-hf/llava-interleave-qwen-*: SigLIP tower (no CLS token), Qwen2 decoder,
    every patch an image token ("full" feature strategy)."""
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    size, patch = 32, 8
    tok = build_tokenizer(
        TokenizerSpec(
            bos=None,
            eos="<|im_end|>",
            pad="<|endoftext|>",
            special=_CHATML,
            named={"image_token": "<image>"},
        )
    )
    config = LlavaConfig(
        vision_config=SiglipVisionConfig(**_vision(image_size=size, patch_size=patch)),
        text_config=Qwen2Config(**_text(tok)),
        image_token_id=tok.image_token_id,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_seq_length=(size // patch) ** 2,
    )
    processor = LlavaProcessor(
        image_processor=SiglipImageProcessorPil(size={"height": size, "width": size}),
        tokenizer=tok,
        patch_size=patch,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        chat_template=chatml("<image>"),
    )
    return _save(out, LlavaForConditionalGeneration, config, processor)


# Anyres: a 32-pixel base view plus tiles; pinpoints kept few and small.
_PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def llava_next(out: Path) -> Path:
    """llava-hf/llava-v1.6-mistral-*: CLIP tower (CLS dropped), anyres tiles chosen by
    `image_sizes`, a newline embedding per row; Mistral decoder and BOS-adding tokenizer."""
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
        MistralConfig,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )

    size, patch = 32, 8
    tok = build_tokenizer(
        TokenizerSpec(
            bos="<s>",
            eos="</s>",
            pad="<pad>",
            special=("[INST]", "[/INST]"),
            named={"image_token": "<image>"},
            add_bos=True,
        )
    )
    vision = CLIPVisionConfig(**_vision(image_size=size, patch_size=patch, projection_dim=32))
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=MistralConfig(**_text(tok, head_dim=HIDDEN // HEADS)),
        image_token_index=tok.image_token_id,
        image_grid_pinpoints=_PINPOINTS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=(size // patch) ** 2,
    )
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_grid_pinpoints=_PINPOINTS,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, which "default" drops again
        chat_template=llava_next_mistral("<image>"),
    )
    return _save(out, LlavaNextForConditionalGeneration, config, processor)


FAMILIES: dict[str, Callable[[Path], Path]] = {
    "llava-interleave": llava_interleave,
    "llava-next": llava_next,
}
