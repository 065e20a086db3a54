"""What the model sees for an augmented sample, shared by generate and score so
the teacher-forced scoring pass reads exactly the input that generation saw.

Noise (docs/method.md §2, reference code only, default off): Gaussian noise on
the generation input, never on the saved image: grid, the target tile only;
pic-in-pic, the whole image; sequence, none. Values are clipped to [0, 255] (the
reference wrapped uint8 values modulo 256, a bug we do not copy).
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

import numpy as np
from PIL import Image

from mia_dpo.config import GenerateConfig, RunConfig
from mia_dpo.data.images import ImageLoader, pad_to_square
from mia_dpo.models.loading import load_model, pad_fill
from mia_dpo.records import AugmentedSample
from mia_dpo.runtime.context import StageContext


def sample_seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\x00{key}".encode()).digest()[:8], "big")


def add_noise(
    img: Image.Image, sigma: float, rng: np.random.Generator, box: tuple[int, int, int, int] | None
) -> Image.Image:
    arr = np.asarray(img, dtype=np.float32).copy()  # (H, W, 3)
    x0, y0, x1, y1 = box if box is not None else (0, 0, img.width, img.height)
    region = arr[y0:y1, x0:x1]
    region += rng.normal(0.0, sigma, size=region.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), "RGB")


def noised(
    sample: AugmentedSample, images: list[Image.Image], cfg: GenerateConfig, seed: int
) -> list[Image.Image]:
    if not cfg.noise or sample.format == "sequence":
        return images
    rng = np.random.default_rng(sample_seed(seed, "noise:" + sample.sample_id))
    if sample.format == "grid":
        return [add_noise(images[0], cfg.noise_sigma_grid, rng, sample.target_box)]
    return [add_noise(images[0], cfg.noise_sigma_pip, rng, None)]


def read_images(ctx: StageContext, uris: list[str], label: str) -> list[Image.Image]:
    """A record's images, decoded; SampleError naming `label` if one is gone. They were
    checked once when made; the pixel limit only guards against a store edited behind
    our back."""
    return ImageLoader(ctx.blobs, ctx.config.input.max_image_pixels).load_all(uris, label)


def load_images(ctx: StageContext, sample: AugmentedSample, lm: Any = None) -> list[Image.Image]:
    """The sample's images as the model gets them: RGB, noised if configured, padded
    to a square if configured (with `lm`'s mean colour); SampleError if one is gone."""
    cfg: RunConfig = ctx.config
    images = read_images(ctx, sample.images, sample.sample_id)
    # Noise first: its target box is in the composed image's own coordinates.
    images = noised(sample, images, cfg.generate, cfg.seed)
    if lm is not None and cfg.model.pad_to_square:
        fill = pad_fill(lm)
        images = [pad_to_square(img, fill) for img in images]
    return images


_MODELS: dict[str, Any] = {}
_MODELS_LOCK = threading.Lock()
# Inline workers are threads of one process: they share one copy of the model and
# take turns with it (torch already uses every core inside one forward pass, and
# the attention probe switches the model's attention function while it runs).
MODEL_USE_LOCK = threading.RLock()


def cached_model(ctx: StageContext) -> Any:
    """One model per process, loaded on first use: a cache, not state (a fresh
    worker loads it again)."""
    key = ctx.config.model.model_dump_json()
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS.clear()  # a different model: free the old one first
            _MODELS[key] = load_model(ctx.config.model)
        return _MODELS[key]
