"""Load an image-text-to-text model and learn where its image tokens are.

The score stage (docs/method.md §3) needs, for each image, the token columns that
hold it, and for grid and pic-in-pic the patch grid of the picture. The model-family
layer (`models/families/`) reads both from what the processor emits; a model no
family serves is refused here, from its config and processor, before any weights
are read and before any stage runs.
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
from mia_dpo.models.families import SUPPORTED, Family, family_for
from mia_dpo.models.prompting import (
    INTERLEAVED_CHAT_TEMPLATE,
    chat_text,
    encode,
    keeps_image_order,
)
from mia_dpo.models.spans import ImageTokens
from mia_dpo.models.templates import interleaved_template, role_format

log = logging.getLogger("mia_dpo.models")

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: Any  # a transformers image-text-to-text model, in eval mode
    processor: Any
    tokenizer: Any  # processor.tokenizer, left-padded for batched generation
    family: Family  # where its image tokens are (models/families/)
    num_layers: int  # decoder layers of the language model
    device: torch.device
    dtype: torch.dtype
    name: str

    @property
    def image_token_id(self) -> int:
        return self.family.image_token_id


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


def ensure_bos(processor: Any) -> None:
    """Give the template the BOS its tokenizer would add. Every encoding of ours and
    TRL's runs with the tokenizer's special tokens off (one token stream, no double
    BOS), so a template without one (llava-v1.6-mistral's, whose tokenizer adds it)
    would otherwise never show the model the BOS it was trained with."""
    tok = processor.tokenizer
    if not tok.bos_token or not processor.chat_template:
        return
    if tok("x", add_special_tokens=True)["input_ids"][:1] != [tok.bos_token_id]:
        return  # the tokenizer adds none: nothing to make up for
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "x"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    if not text.startswith(tok.bos_token):
        processor.chat_template = "{{ bos_token }}" + processor.chat_template


def choose_chat_template(processor: Any, mode: str, name: str) -> None:
    """Make the processor's template one that keeps each image next to its label.
    The same processor serves generation, scoring and training, so whatever is
    chosen here is what all three see."""
    if mode == "interleaved" or (mode == "auto" and not keeps_image_order(processor)):
        # the model's own role markup with images in place; the generic USER:/ASSISTANT:
        # one only for a template whose pieces cannot be read off
        fmt = role_format(processor) if processor.chat_template else None
        fallback = interleaved_template(fmt) if fmt else INTERLEAVED_CHAT_TEMPLATE
        if mode == "auto":
            log.warning(
                "%s: its chat template moves images away from their Image{k} labels; "
                "using %s with images in place (model.chat_template)",
                name,
                "its own role format" if fmt else "the USER:/ASSISTANT: template",
            )
        processor.chat_template = fallback
        if fmt and not keeps_image_order(processor):  # a format we misread: the generic one
            processor.chat_template = INTERLEAVED_CHAT_TEMPLATE
    elif not keeps_image_order(processor):
        raise UserError(
            f"model.chat_template: {name}'s own template does not keep images in prompt "
            "order; use 'auto' or 'interleaved'"
        )


PROBE_PROMPT = "Image1:<image>\nImage2:<image>\nIn Image2, what is it?"
# Two sizes and orientations, so that tiling that depends on the image shows.
_PROBE_SIZES = ((64, 48), (48, 64))


def probe_image_tokens(processor: Any, family: Family) -> list[ImageTokens]:
    """Process a two-image probe prompt and read it with the family: the image tokens
    the processor really inserted must be exactly the two images the family expects,
    each holding its picture's patch grid. A mismatch is refused here, naming the
    config field, instead of failing inside a stage."""
    images = [Image.new("RGB", size, (16 + 96 * i,) * 3) for i, size in enumerate(_PROBE_SIZES)]
    try:
        enc = encode(processor, [chat_text(processor, PROBE_PROMPT)], [images], return_tensors="pt")
        found = family.image_tokens(enc["input_ids"][0], enc, range(2))
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise family.refuse(
            f"the processor's image tokens do not match the model family "
            f"({type(family).__name__}: {e}); supported: {SUPPORTED}"
        ) from None
    if len(found) != 2:
        raise family.refuse(f"the probe's 2 images came out as {len(found)}")
    return found


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
        text = str(e).strip()
        why = text.splitlines()[0] if text else type(e).__name__
        if "torchvision" in text.lower():
            needs = why.split()[0] if why.split()[0][:1].isupper() else "its processor"
            raise UserError(
                f"model.path: {cfg.path!r}: {needs} needs torchvision, which is not installed: "
                "pip install 'mia-dpo[model,vision]' (torchvision built for your torch)"
            ) from e
        raise UserError(
            f"model.path: {cfg.path!r} needs a package that is not installed ({why}): "
            "pip install 'mia-dpo[model]' (and 'mia-dpo[vision]' for torchvision processors)"
        ) from e
    except (OSError, ValueError) as e:
        hint = ""
        if "safetensors" in str(e) and not cfg.allow_pickle:
            hint = " (only pickle weights? convert to safetensors or set model.allow_pickle)"
        elif "trust_remote_code" in str(e):
            hint = " (the checkpoint ships code: review it, then set model.trust_remote_code)"
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model.path: cannot load {cfg.path!r}: {first_line}{hint}") from e


def _check(cfg: ModelConfig, processor: Any, config: Any) -> Family:
    family = family_for(config, processor, cfg.path)
    choose_chat_template(processor, cfg.chat_template, cfg.path)
    ensure_bos(processor)
    probe_image_tokens(processor, family)
    return family


def check_model(cfg: ModelConfig) -> Family:
    """The self-check a run does before any stage: config and processor only (no
    weights), the model family, the chat template, the two-image probe."""
    processor, config, _ = _open(cfg)
    return _check(cfg, processor, config)


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Processor and model from a local save_pretrained directory or a hub id."""
    processor, config, common = _open(cfg)
    # Before the weights: refusing a 7B model should not take minutes.
    family = _check(cfg, processor, config)
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
        family=family,
        num_layers=len(decoder_layers(model)),
        device=device,
        dtype=dtype,
        name=cfg.path,
    )
