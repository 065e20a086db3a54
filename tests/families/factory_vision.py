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
from tests.families.factory import _CHATML, HIDDEN, VISION_HIDDEN, _save, _text
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


VISION_FAMILIES: dict[str, Callable[[Path], Path]] = {
    "qwen2-vl": qwen2_vl,
    "qwen2.5-vl": qwen2_5_vl,
}
