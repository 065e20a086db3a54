"""Load an image-text-to-text model and learn where its image tokens are.

The score stage (docs/method.md §3) needs, for each image, the token columns
that hold it, and for grid and pic-in-pic the patch grid those tokens form. That
is only well defined for fixed-resolution LLaVA-style models, where every image
becomes the same square grid of tokens; dynamic-resolution models are refused
at load time, before their weights are read.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
from transformers.utils import logging as hf_logging

from mia_dpo.config import ModelConfig
from mia_dpo.errors import UserError
from mia_dpo.models.attention import decoder_layers
from mia_dpo.models.prompting import (
    INTERLEAVED_CHAT_TEMPLATE,
    chat_text,
    encode,
    keeps_image_order,
)

log = logging.getLogger("mia_dpo.models")

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Config attributes of models whose image token count depends on the image (tiling,
# merging of neighbouring patches, pooling): no fixed grid maps onto their tokens.
_DYNAMIC_MARKERS = (
    "image_grid_pinpoints",
    "spatial_merge_size",
    "temporal_patch_size",
    "downsample_factor",
    "downsample_ratio",
    "mm_tokens_per_image",
)


@dataclass
class LoadedModel:
    model: Any  # a transformers image-text-to-text model, in eval mode
    processor: Any
    tokenizer: Any  # processor.tokenizer, left-padded for batched generation
    image_token_id: int
    tokens_per_image: int
    # (rows, cols) of each image's patch tokens; with the "full" feature strategy the
    # first of an image's tokens_per_image tokens is CLS and the grid is the rest.
    patch_grid: tuple[int, int]
    num_layers: int  # decoder layers of the language model
    device: torch.device
    dtype: torch.dtype
    name: str


def _get(config: Any, name: str) -> Any:
    # Configs may be objects or (for sub-configs of older checkpoints) plain dicts.
    return config.get(name) if isinstance(config, dict) else getattr(config, name, None)


# The model types whose image tokens this project maps to attention blocks today: one
# fixed-resolution picture per image token run (LLaVA-1.5, LLaVA-Interleave).
SUPPORTED_MODEL_TYPES = ("llava",)
_SUPPORTED = ", ".join(f"{t} (fixed-resolution)" for t in SUPPORTED_MODEL_TYPES)
# Refused by name, with the reason (docs/method.md §3 needs image tokens in the decoder).
_REFUSED_WHY = {
    "mllama": "cross-attention model: its decoder has no image tokens to attend to",
    "paligemma": "prefix-LM (token_type_ids) not yet carried through scoring and training",
}
# Vision towers without a CLS token: every output token is a patch.
_NO_CLS_TOWERS = ("siglip_vision_model",)


def image_token_layout(model_config: Any, processor: Any) -> tuple[int, int, tuple[int, int]]:
    """(image_token_id, tokens_per_image, (rows, cols)) of a fixed-resolution LLaVA-style model.

    UserError when the model's image tokens cannot be mapped to one fixed patch grid,
    or when the processor would insert a different number of tokens than the model
    expects (the forward pass would fail with "Image features and image tokens do
    not match").
    """
    model_type = _get(model_config, "model_type") or type(model_config).__name__
    name = _get(model_config, "_name_or_path") or model_type
    vision = _get(model_config, "vision_config")
    if model_type in _REFUSED_WHY:
        raise UserError(
            f"model.path: {name}: model type {model_type!r} is not supported: "
            f"{_REFUSED_WHY[model_type]}; supported: {_SUPPORTED}"
        )
    unsupported = UserError(
        f"model.path: {name}: cannot map image tokens to a patch grid for model type "
        f"{model_type!r}; supported: {_SUPPORTED}"
    )
    if (
        model_type not in SUPPORTED_MODEL_TYPES
        or vision is None
        or any(_get(c, m) is not None for c in (model_config, vision) for m in _DYNAMIC_MARKERS)
    ):
        raise unsupported
    image_size, patch = _get(vision, "image_size"), _get(vision, "patch_size")
    token_id = _get(model_config, "image_token_id")
    if token_id is None:
        token_id = _get(model_config, "image_token_index")
    strategy = _get(model_config, "vision_feature_select_strategy") or "default"
    if not isinstance(patch, int) or patch <= 0 or token_id is None:
        raise unsupported
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    if strategy not in ("default", "full") or height % patch or width % patch:
        raise unsupported
    grid = (height // patch, width // patch)
    # The tower's output: the patches, plus a CLS token first unless it has none
    # (SigLIP, as in LLaVA-Interleave); "default" drops the first token, "full" keeps it.
    has_cls = _get(vision, "model_type") not in _NO_CLS_TOWERS
    if strategy == "default" and not has_cls:
        raise unsupported  # it would drop a real patch: no whole grid is left
    tokens = grid[0] * grid[1] + (1 if strategy == "full" and has_cls else 0)

    expected = _processor_tokens_per_image(processor)
    if expected is not None and expected != tokens:
        raise UserError(
            f"model.path: {name}: the processor inserts {expected} image tokens per image "
            f"but the model produces {tokens} ({grid[0]}x{grid[1]} patches, strategy {strategy!r})"
        )
    proc_id = getattr(processor, "image_token_id", None)
    if proc_id is not None and proc_id != token_id:
        raise UserError(
            f"model.path: {name}: processor image token id {proc_id} != model's {token_id}"
        )
    return int(token_id), tokens, grid


def _processor_tokens_per_image(processor: Any) -> int | None:
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


def image_spans(
    input_ids: torch.Tensor, image_token_id: int, tokens_per_image: int
) -> list[tuple[int, int]]:
    """(start, end) of each image's tokens in a 1-D id sequence, in order; end exclusive.

    A run of k * tokens_per_image tokens is k adjacent images (`<image><image>` with no
    text between them); any other run length is a ValueError, e.g. truncation that cut
    into an image.
    """
    if input_ids.dim() != 1:
        raise ValueError(f"image_spans expects 1-D ids, got shape {tuple(input_ids.shape)}")
    is_image = (input_ids == image_token_id).to(torch.int8)
    # Run boundaries: +1 where a run starts, -1 one past where it ends.
    edges = torch.diff(is_image, prepend=is_image.new_zeros(1), append=is_image.new_zeros(1))
    starts = (edges == 1).nonzero().flatten().tolist()
    ends = (edges == -1).nonzero().flatten().tolist()
    spans: list[tuple[int, int]] = []
    for start, end in zip(starts, ends, strict=True):
        if (end - start) % tokens_per_image:
            raise ValueError(
                f"image token run at {start}:{end} has {end - start} tokens, "
                f"not a multiple of {tokens_per_image} per image"
            )
        spans += [(s, s + tokens_per_image) for s in range(start, end, tokens_per_image)]
    return spans


def pad_fill(lm: Any) -> tuple[int, int, int]:
    """The colour LLaVA pads with: the image processor's mean (grey when it has none)."""
    mean = getattr(getattr(lm.processor, "image_processor", None), "image_mean", None)
    if mean is None or len(mean) != 3:
        return (127, 127, 127)
    return tuple(round(255 * m) for m in mean)  # type: ignore[return-value]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":  # bf16 halves memory on GPUs; CPUs are slow and inexact in it
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


def _check_local_dir(path: str, allow_pickle: bool) -> None:
    local = Path(path).expanduser()
    if not local.exists():
        if path.startswith(("/", "./", "../", "~")) or "\\" in path or path.count("/") > 1:
            raise UserError(f"model.path: directory {path} does not exist")
        return  # may be a hub id
    if not local.is_dir():
        raise UserError(f"model.path: {path} is not a directory (save_pretrained layout)")
    try:
        entries = [p for p in local.iterdir() if p.is_file()]
    except PermissionError:
        raise UserError(f"model.path: {path}: permission denied (cannot list it)") from None
    # A file the worker's user cannot read (save_pretrained writes 0600 files; a
    # container runs as another uid) would surface as a misleading "not found".
    unreadable = sorted(p.name for p in entries if not os.access(p, os.R_OK))
    if unreadable:
        raise UserError(
            f"model.path: {path}: cannot read {', '.join(unreadable[:3])} as uid {os.getuid()} "
            "(permission denied; make the files readable, e.g. chmod a+r)"
        )
    files = [p.name for p in entries]
    has_safe = any(f.endswith(".safetensors") for f in files)
    if not has_safe and not allow_pickle and any(f.endswith(_PICKLE_SUFFIXES) for f in files):
        raise UserError(
            f"model.path: {path} holds only pickle weights (*.bin/*.pt), which can run code "
            "when loaded; convert them to safetensors or set model.allow_pickle: true"
        )


def choose_chat_template(processor: Any, mode: str, name: str) -> None:
    """Make the processor's template one that keeps each image next to its label.
    The same processor serves generation, scoring and training, so whatever is
    chosen here is what all three see."""
    if mode == "interleaved" or (mode == "auto" and not keeps_image_order(processor)):
        if mode == "auto":
            log.warning(
                "%s: its chat template moves images away from their Image{k} labels; "
                "using the interleaved USER:/ASSISTANT: template (model.chat_template)",
                name,
            )
        processor.chat_template = INTERLEAVED_CHAT_TEMPLATE
    elif not keeps_image_order(processor):
        raise UserError(
            f"model.chat_template: {name}'s own template does not keep images in prompt "
            "order; use 'auto' or 'interleaved'"
        )


@dataclass(frozen=True)
class ImageLayout:
    """How a checked model's processor lays images out in the token stream."""

    image_token_id: int
    tokens_per_image: int
    patch_grid: tuple[int, int]


PROBE_PROMPT = "Image1:<image>\nImage2:<image>\nIn Image2, what is it?"


def probe_image_tokens(processor: Any, layout: ImageLayout, name: str, model_type: str) -> None:
    """Process a two-image probe prompt and compare the image tokens the processor really
    inserted with the layout the model was accepted for: a mismatch is refused here,
    with the config field named, instead of failing inside a stage."""
    images = [Image.new("RGB", (64, 48), (128, 128, 128)), Image.new("RGB", (48, 64), (9, 9, 9))]
    ids = encode(processor, [chat_text(processor, PROBE_PROMPT)], images, return_tensors="pt")
    ids = ids["input_ids"][0]
    found = int((ids == layout.image_token_id).sum())
    expected = 2 * layout.tokens_per_image
    try:
        if found != expected:
            raise ValueError(f"{found} image tokens for 2 images, expected {expected}")
        image_spans(ids, layout.image_token_id, layout.tokens_per_image)
    except ValueError as e:
        raise UserError(
            f"model.path: {name} (model type {model_type!r}): the processor's image tokens do "
            f"not match the model ({e}); supported: {_SUPPORTED}"
        ) from None


def _open(cfg: ModelConfig) -> tuple[Any, Any, dict[str, Any]]:
    if not cfg.path:
        raise UserError("model.path is empty: set a local model directory or a hub id")
    _check_local_dir(cfg.path, cfg.allow_pickle)
    common = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    with _load_errors(cfg):
        processor = AutoProcessor.from_pretrained(cfg.path, **common)
        config = AutoConfig.from_pretrained(cfg.path, **common)
    return processor, config, common


@contextlib.contextmanager
def _load_errors(cfg: ModelConfig) -> Iterator[None]:
    """Loading errors as one line naming model.path (a UserError: never retried)."""
    try:
        yield
    except ImportError as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"model.path: {cfg.path!r} needs a package that is not installed ({why}): "
            "pip install 'mia-dpo[model]'; fast image processors also need torchvision"
        ) from e
    except (OSError, ValueError) as e:
        hint = ""
        if "safetensors" in str(e) and not cfg.allow_pickle:
            hint = " (only pickle weights? convert to safetensors or set model.allow_pickle)"
        elif "trust_remote_code" in str(e):
            hint = " (the checkpoint ships code: review it, then set model.trust_remote_code)"
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model.path: cannot load {cfg.path!r}: {first_line}{hint}") from e


def _check(cfg: ModelConfig, processor: Any, config: Any) -> ImageLayout:
    token_id, tokens, grid = image_token_layout(config, processor)
    choose_chat_template(processor, cfg.chat_template, cfg.path)
    layout = ImageLayout(token_id, tokens, grid)
    model_type = _get(config, "model_type") or type(config).__name__
    probe_image_tokens(processor, layout, cfg.path, model_type)
    return layout


def check_model(cfg: ModelConfig) -> ImageLayout:
    """The self-check a run does before any stage: config and processor only (no
    weights), the image layout, the chat template, the two-image probe."""
    processor, config, _ = _open(cfg)
    return _check(cfg, processor, config)


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Processor and model from a local save_pretrained directory or a hub id."""
    processor, config, common = _open(cfg)
    # Before the weights: refusing a 7B model should not take minutes.
    layout = _check(cfg, processor, config)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    # A per-tensor progress bar in every worker's log helps nobody.
    hf_logging.disable_progress_bar()
    with _load_errors(cfg):
        model = AutoModelForImageTextToText.from_pretrained(
            cfg.path,
            config=config,
            dtype=dtype,
            device_map={"": device},
            attn_implementation=cfg.attn_implementation,
            # None: prefer safetensors, fall back to .bin; True: safetensors or fail.
            use_safetensors=None if cfg.allow_pickle else True,
            **common,
        )
    model.eval()
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"  # batched generation appends on the right
    if tokenizer.pad_token is None:  # e.g. Llama tokenizers; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(
        model=model,
        processor=processor,
        tokenizer=tokenizer,
        image_token_id=layout.image_token_id,
        tokens_per_image=layout.tokens_per_image,
        patch_grid=layout.patch_grid,
        num_layers=len(decoder_layers(model)),
        device=device,
        dtype=dtype,
        name=cfg.path,
    )
