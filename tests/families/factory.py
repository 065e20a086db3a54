"""Tiny randomly initialised vision-language models, one builder per architecture family.

Each builder writes, with `save_pretrained`, a model built from the architecture's
real transformers config and model classes, its real processor and image-processor
classes, a local word-level tokenizer (tests/families/tokenizer.py) and a chat
template in the hub checkpoint's role format (tests/families/templates.py), into a
folder that `AutoProcessor` and `AutoModelForImageTextToText` load offline.

Sizes are the smallest that keep each architecture's shape rules (head dims that
rotary embeddings can split, image sizes that tile): a forward pass takes
milliseconds. Image processors are the PIL ("slow") classes: the default ("fast")
ones need torchvision, which has no wheel for the CPU torch we run (the local
torchvision 0.28 wheel, torch 2.13's match, is a CUDA build: its `_C.so` links
libtorch_cuda; 0.29 needs torch 2.14 and is CUDA-built too).

Not here, because without torchvision their real processor cannot even be built:
LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL and InternVL (the processor's `video_processor`
slot needs `VideoProcessorMixin`, a torchvision-only class, even when passed None),
SmolVLM (the same, and `num2words`), Mistral3 (`PixtralProcessor` requires torchvision).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel, ProcessorMixin

from tests.families import templates
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
    seed: int = SEED,
) -> Path:
    """Seeded random weights (eager attention: tests read attention maps), then save."""
    # fork_rng: the fixed seed must not reset the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
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
        chat_template=templates.chatml("<image>"),
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
        chat_template=templates.llava_next_mistral("<image>"),
    )
    return _save(out, LlavaNextForConditionalGeneration, config, processor)


def idefics3(out: Path) -> Path:
    """HuggingFaceM4/Idefics3-8B-Llama3: the image is split into tiles of
    `max_image_size` plus a global view, each tile `<fake_token_around_image><row_r_col_c>`
    + pixel-shuffled tokens; Llama decoder, Llama-3 tokenizer (adds BOS)."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3Processor,
        Idefics3VisionConfig,
        LlamaConfig,
    )
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    # 64-pixel tiles of 8-pixel patches, shuffled by 2: a 4x4 grid of 16 tokens per view,
    # enough to split into the 3x3 blocks of a 9-image grid collage.
    tile, patch, scale = 64, 8, 2
    rows = [f"<row_{r}_col_{c}>" for r in range(1, 4) for c in range(1, 4)]
    tok = build_tokenizer(
        TokenizerSpec(
            bos="<|begin_of_text|>",
            eos="<end_of_utterance>",
            pad="<|finetune_right_pad_id|>",
            special=("<fake_token_around_image>", "<global-img>", *rows),
            named={"image_token": "<image>"},
            add_bos=True,
        )
    )
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(**_vision(image_size=tile, patch_size=patch)),
        text_config=LlamaConfig(**_text(tok)),
        image_token_id=tok.image_token_id,
        scale_factor=scale,
    )
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 2 * tile}, max_image_size={"longest_edge": tile}
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tok,
        image_seq_len=(tile // patch) ** 2 // scale**2,
        chat_template=templates.idefics3("<image>"),
    )
    return _save(out, Idefics3ForConditionalGeneration, config, processor)


def gemma3(out: Path) -> Path:
    """google/gemma-3-*-it: SigLIP tower pooled to `mm_tokens_per_image` soft tokens
    between `<start_of_image>`/`<end_of_image>`, `token_type_ids` marking them (images
    attend bidirectionally); Gemma tokenizer adds BOS and so does the template."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    size, patch, soft = 64, 8, 16  # 8x8 patches average-pooled to 4x4 soft tokens
    tok = build_tokenizer(
        TokenizerSpec(
            bos="<bos>",
            eos="<eos>",
            pad="<pad>",
            special=("<start_of_turn>", "<end_of_turn>"),
            named={
                "boi_token": "<start_of_image>",
                "eoi_token": "<end_of_image>",
                "image_token": "<image_soft_token>",
            },
            add_bos=True,
        )
    )
    head_dim = HIDDEN // HEADS
    text = Gemma3TextConfig(
        **_text(tok, head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=64)
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=SiglipVisionConfig(**_vision(image_size=size, patch_size=patch)),
        mm_tokens_per_image=soft,
        boi_token_index=tok.convert_tokens_to_ids(tok.boi_token),
        eoi_token_index=tok.convert_tokens_to_ids(tok.eoi_token),
        image_token_index=tok.image_token_id,
    )
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": size, "width": size}),
        tokenizer=tok,
        image_seq_length=soft,
        chat_template=templates.gemma("<start_of_image>"),
    )
    return _save(out, Gemma3ForConditionalGeneration, config, processor)


def paligemma(out: Path) -> Path:
    """google/paligemma-*: SigLIP tower, prefix-LM (`token_type_ids`: 0 for the prefix,
    1 for a suffix); the processor writes BOS after the last image itself."""
    from transformers import (
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipVisionConfig,
    )
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    size, patch = 32, 8
    tok = build_tokenizer(
        TokenizerSpec(bos="<bos>", eos="<eos>", pad="<pad>", named={"image_token": "<image>"})
    )
    # The processor adds PaliGemma's 1152 `<locNNNN>`/`<segNNN>` tokens to the tokenizer
    # at construction: build it first, so the vocabulary size includes them.
    image_processor = SiglipImageProcessorPil(size={"height": size, "width": size})
    image_processor.image_seq_length = (size // patch) ** 2
    processor = PaliGemmaProcessor(
        image_processor=image_processor, tokenizer=tok, chat_template=templates.plain("<image>")
    )
    vision = SiglipVisionConfig(**_vision(image_size=size, patch_size=patch, projection_dim=HIDDEN))
    config = PaliGemmaConfig(
        vision_config=vision,
        text_config=GemmaConfig(**_text(tok, head_dim=HIDDEN // HEADS)),
        image_token_index=tok.image_token_id,
        projection_dim=HIDDEN,
        hidden_size=HIDDEN,
    )
    return _save(out, PaliGemmaForConditionalGeneration, config, processor)


def mllama(out: Path) -> Path:
    """meta-llama/Llama-3.2-*-Vision: no image tokens in the decoder's sequence beyond
    one `<|image|>` per image; pictures enter through cross-attention layers, tiled
    (`aspect_ratio_ids`, `cross_attention_mask`); Llama-3 tokenizer adds BOS."""
    from transformers import (
        MllamaConfig,
        MllamaForConditionalGeneration,
        MllamaProcessor,
        MllamaTextConfig,
        MllamaVisionConfig,
    )
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    tile, patch, tiles = 32, 8, 2
    tok = build_tokenizer(
        TokenizerSpec(
            bos="<|begin_of_text|>",
            eos="<|eot_id|>",
            pad="<|finetune_right_pad_id|>",
            special=("<|start_header_id|>", "<|end_header_id|>", "<|python_tag|>"),
            named={"image_token": "<|image|>"},
            add_bos=True,
        )
    )
    # The projector reads the last layer plus these intermediate ones, concatenated.
    layers = [0]
    vision = MllamaVisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=2 * VISION_HIDDEN,
        num_hidden_layers=VISION_LAYERS,
        num_global_layers=1,
        attention_heads=2,
        image_size=tile,
        patch_size=patch,
        max_num_tiles=tiles,
        # What the image processor allows for 2 tiles (the default list assumes 4).
        supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
        intermediate_layers_indices=layers,
        vision_output_dim=VISION_HIDDEN * (len(layers) + 1),
    )
    text = MllamaTextConfig(**_text(tok), cross_attention_layers=[1])
    config = MllamaConfig(
        vision_config=vision, text_config=text, image_token_index=tok.image_token_id
    )
    processor = MllamaProcessor(
        image_processor=MllamaImageProcessorPil(
            size={"height": tile, "width": tile}, max_image_tiles=tiles
        ),
        tokenizer=tok,
        chat_template=templates.llama3("<|image|>"),
    )
    return _save(out, MllamaForConditionalGeneration, config, processor)


FAMILIES: dict[str, Callable[[Path], Path]] = {
    "llava-interleave": llava_interleave,
    "llava-next": llava_next,
    "idefics3": idefics3,
    "gemma3": gemma3,
    "paligemma": paligemma,
    "mllama": mllama,
}
