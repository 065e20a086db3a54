"""Tiny models of the families whose real processors need torchvision (their "fast"
image processors and video processors are torchvision-only classes).

Built and tested in the vision environment (`make .venv-vision`: torch 2.14.1 with
torchvision 0.29.1, the pair that installs offline here); the rest of the suite runs
in `.venv` with the CPU torch 2.13 build, for which no torchvision wheel exists.
Same rules as tests/families/factory.py: real config, model and processor classes,
a local word-level tokenizer, a chat template in the checkpoint's role format.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.families import templates
from tests.families.factory import _CHATML, HEADS, HIDDEN, VISION_HIDDEN, _save, _text, _vision
from tests.families.tokenizer import TokenizerSpec, build_tokenizer

_QWEN_VISION = ("<|vision_start|>", "<|vision_end|>")


def _qwen_tokenizer() -> Any:
    return build_tokenizer(
        TokenizerSpec(
            bos=None,
            eos="<|im_end|>",
            pad="<|endoftext|>",
            special=(*_CHATML, *_QWEN_VISION, "<|video_pad|>"),
            named={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                   "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
        )
    )  # fmt: skip


def _qwen_image_processor(cls: Any, patch: int, merge: int) -> Any:
    # 64x64 pixels at most: a 4x4 grid of merged tokens for a square picture.
    side = 4 * patch * merge
    return cls(
        patch_size=patch, merge_size=merge, temporal_patch_size=2,
        size={"shortest_edge": (patch * merge) ** 2, "longest_edge": side * side},
    )  # fmt: skip


def _qwen(out: Path, version: str) -> Path:
    import transformers as tf

    patch, merge = 8, 2
    tok = _qwen_tokenizer()
    ids = {
        t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", *_QWEN_VISION)
    }
    # M-RoPE splits each head's rotary half (head_dim 16 -> 8) into t, h, w sections.
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    if version == "2":
        text = tf.Qwen2VLTextConfig(**_text(tok, rope_parameters=rope))
        vision = tf.models.qwen2_vl.configuration_qwen2_vl.Qwen2VLVisionConfig(
            depth=2, embed_dim=VISION_HIDDEN, hidden_size=HIDDEN, num_heads=2,
            patch_size=patch, spatial_merge_size=merge, temporal_patch_size=2,
        )  # fmt: skip
        config_cls, model_cls, proc_cls = (
            tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration, tf.Qwen2VLProcessor
        )  # fmt: skip
    else:
        text = tf.Qwen2_5_VLTextConfig(**_text(tok, rope_parameters=rope))
        vision = tf.models.qwen2_5_vl.configuration_qwen2_5_vl.Qwen2_5_VLVisionConfig(
            depth=2, hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN,
            num_heads=2, patch_size=patch, spatial_merge_size=merge, temporal_patch_size=2,
            out_hidden_size=HIDDEN, window_size=2 * patch * merge, fullatt_block_indexes=[1],
        )  # fmt: skip
        config_cls, model_cls, proc_cls = (
            tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLProcessor
        )  # fmt: skip
    config = config_cls(
        text_config=text, vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )  # fmt: skip
    processor = proc_cls(
        image_processor=_qwen_image_processor(tf.Qwen2VLImageProcessor, patch, merge),
        tokenizer=tok,
        video_processor=tf.Qwen2VLVideoProcessor(patch_size=patch, merge_size=merge),
        chat_template=templates.chatml("<|vision_start|><|image_pad|><|vision_end|>"),
    )
    return _save(out, model_cls, config, processor)


def qwen2_vl(out: Path) -> Path:
    """Qwen/Qwen2-VL-*: dynamic resolution, 2x2 patches merged per token, M-RoPE."""
    return _qwen(out, "2")


def qwen2_5_vl(out: Path) -> Path:
    """Qwen/Qwen2.5-VL-*: as Qwen2-VL, with window attention in the vision tower."""
    return _qwen(out, "2.5")


def llava_onevision(out: Path) -> Path:
    """llava-hf/llava-onevision-qwen2-*: SigLIP tower, anyres tiles (at most 9, pooled
    when more), base view first; Qwen2 decoder, ChatML template."""
    import transformers as tf

    size, patch = 32, 8
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    tok = build_tokenizer(
        TokenizerSpec(
            bos=None, eos="<|im_end|>", pad="<|endoftext|>", special=_CHATML,
            named={"image_token": "<image>", "video_token": "<video>"},
        )
    )  # fmt: skip
    config = tf.LlavaOnevisionConfig(
        vision_config=tf.SiglipVisionConfig(**_vision(image_size=size, patch_size=patch)),
        text_config=tf.Qwen2Config(**_text(tok)),
        image_token_index=tok.image_token_id,
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    processor = tf.LlavaOnevisionProcessor(
        image_processor=tf.LlavaOnevisionImageProcessor(
            size={"height": size, "width": size}, image_grid_pinpoints=pinpoints
        ),
        tokenizer=tok,
        video_processor=tf.LlavaOnevisionVideoProcessor(size={"height": size, "width": size}),
        num_image_tokens=(size // patch) ** 2,
        vision_feature_select_strategy="full",
        chat_template=templates.chatml("<image>"),
    )
    # seed 1: with the default seed the random model often answers `<unk>`, which the score
    # stage rightly drops (not reproducible from the text), leaving too few answers to test
    return _save(out, tf.LlavaOnevisionForConditionalGeneration, config, processor, seed=1)


def smolvlm(out: Path) -> Path:
    """HuggingFaceTB/SmolVLM-*: Idefics3's image splitting (tiles + a global view) on a
    SmolLM decoder; `<end_of_utterance>` closes turns."""
    import transformers as tf

    tile, patch, scale = 64, 8, 2
    rows = [f"<row_{r}_col_{c}>" for r in range(1, 4) for c in range(1, 4)]
    tok = build_tokenizer(
        TokenizerSpec(
            bos="<|im_start|>", eos="<end_of_utterance>", pad="<|im_end|>",
            special=("<fake_token_around_image>", "<global-img>", *rows),
            named={"image_token": "<image>", "video_token": "<video>",
                   "fake_image_token": "<fake_token_around_image>",
                   "global_image_token": "<global-img>",
                   "end_of_utterance_token": "<end_of_utterance>"},
        )
    )  # fmt: skip
    config = tf.SmolVLMConfig(
        vision_config=tf.SmolVLMVisionConfig(**_vision(image_size=tile, patch_size=patch)),
        text_config=tf.LlamaConfig(**_text(tok)),
        image_token_id=tok.image_token_id,
        scale_factor=scale,
    )
    processor = tf.SmolVLMProcessor(
        image_processor=tf.SmolVLMImageProcessor(
            size={"longest_edge": 2 * tile}, max_image_size={"longest_edge": tile}
        ),
        tokenizer=tok,
        video_processor=tf.SmolVLMVideoProcessor(),
        image_seq_len=(tile // patch) ** 2 // scale**2,
        chat_template=templates.idefics3("<image>"),
    )
    return _save(out, tf.SmolVLMForConditionalGeneration, config, processor)


def internvl(out: Path) -> Path:
    """OpenGVLab/InternVL3-*-hf: an image is cut into up to `max_patches` tiles plus a
    thumbnail (last), each `image_seq_length` tokens after the pixel shuffle, all between
    `<img>` and `</img>`; Qwen2 decoder, ChatML template."""
    import transformers as tf

    size, patch = 64, 8  # 8x8 patches, pixel-shuffled by 0.5: 16 tokens per tile
    tok = build_tokenizer(
        TokenizerSpec(
            bos=None, eos="<|im_end|>", pad="<|endoftext|>",
            special=(*_CHATML, "<img>", "</img>", "<video>"),
            named={"start_image_token": "<img>", "end_image_token": "</img>",
                   "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
        )
    )  # fmt: skip
    vision = tf.InternVLVisionConfig(
        **_vision(image_size=[size, size], patch_size=[patch, patch], use_mean_pooling=False)
    )
    config = tf.InternVLConfig(
        vision_config=vision,
        text_config=tf.Qwen2Config(**_text(tok)),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=16,
        downsample_ratio=0.5,
    )
    processor = tf.InternVLProcessor(
        image_processor=tf.GotOcr2ImageProcessor(
            size={"height": size, "width": size}, crop_to_patches=True, max_patches=4
        ),
        tokenizer=tok,
        video_processor=tf.InternVLVideoProcessor(size={"height": size, "width": size}),
        image_seq_length=16,
        chat_template=templates.chatml("<IMG_CONTEXT>"),
    )
    return _save(out, tf.InternVLForConditionalGeneration, config, processor)


def mistral3(out: Path) -> Path:
    """mistralai/Mistral-Small-3.1-*: Pixtral tower at the image's own size, 2x2 patches
    merged, rows of `[IMG]` tokens closed by `[IMG_BREAK]` and the last by `[IMG_END]`."""
    import transformers as tf

    patch, merge = 8, 2
    tok = build_tokenizer(
        TokenizerSpec(
            bos="<s>", eos="</s>", pad="<pad>",
            special=("[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                     "[IMG_BREAK]", "[IMG_END]"),
            named={"image_token": "[IMG]"},
        )
    )  # fmt: skip
    vision = tf.PixtralVisionConfig(**_vision(image_size=64, patch_size=patch, head_dim=16))
    config = tf.Mistral3Config(
        vision_config=vision,
        text_config=tf.MistralConfig(**_text(tok, head_dim=HIDDEN // HEADS)),
        image_token_index=tok.image_token_id,
        spatial_merge_size=merge,
        vision_feature_layer=-1,
        # tied random embeddings make greedy decoding repeat the prompt's last token
        # ("[/INST]" forever: every answer empty); the real checkpoints are untied too
        tie_word_embeddings=False,
    )
    processor = tf.PixtralProcessor(
        image_processor=tf.PixtralImageProcessor(
            size={"longest_edge": 64}, patch_size={"height": patch, "width": patch}
        ),
        tokenizer=tok,
        patch_size=patch,
        spatial_merge_size=merge,
        chat_template=templates.mistral3("[IMG]"),
    )
    return _save(out, tf.Mistral3ForConditionalGeneration, config, processor)


VISION_FAMILIES: dict[str, Callable[[Path], Path]] = {
    "qwen2-vl": qwen2_vl,
    "qwen2.5-vl": qwen2_5_vl,
    "llava-onevision": llava_onevision,
    "smolvlm": smolvlm,
    "internvl": internvl,
    "mistral3": mistral3,
}
