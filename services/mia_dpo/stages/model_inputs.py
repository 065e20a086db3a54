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
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from mia_dpo.config import GenerateConfig, RunConfig
from mia_dpo.data.images import ImageLoader, pad_to_square
from mia_dpo.models.attention import capture_layers_attention
from mia_dpo.models.loading import load_model, pad_fill
from mia_dpo.models.prompting import batch_inputs, reproduces
from mia_dpo.models.spans import ImageTokens
from mia_dpo.records import AugmentedSample, Response
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


# --- Teacher forcing (score and calibrate) ----------------------------------------


@dataclass
class TeacherForced:
    """A left-padded batch of prompt + generated answer, ready for the model."""

    inputs: dict[str, Any]  # every processor output, on the model's device
    rows: list[tuple[int, int]]  # per item: the query rows that predict its answer
    images: list[list[ImageTokens]]  # per item: its images' columns in the padded batch


Item = tuple[AugmentedSample, list[Any], Response]  # sample, its model images, a response


def teacher_forced(lm: Any, items: list[Item]) -> TeacherForced:
    """The prompts through one processor call, as at generation (images nested per
    prompt); each response's generated ids appended, and every per-token output of the
    processor (token_type_ids...) grown with the family's value for answer tokens."""
    enc = batch_inputs(lm, [s.prompt for s, _, _ in items], [im for _, im, _ in items])
    prompt_ids, prompt_mask = enc["input_ids"].cpu(), enc["attention_mask"].cpu().bool()
    per_token = [
        k for k, v in enc.items()
        if k not in ("input_ids", "attention_mask")
        and isinstance(v, torch.Tensor) and v.shape == prompt_ids.shape
    ]  # fmt: skip
    rows_ids, rows_extra = [], []
    for i, (_, _, response) in enumerate(items):
        answer = torch.tensor(response.token_ids, dtype=prompt_ids.dtype)
        rows_ids.append(torch.cat([prompt_ids[i][prompt_mask[i]], answer]))
        rows_extra.append({
            k: torch.cat([enc[k][i].cpu()[prompt_mask[i]],
                          torch.full_like(answer, lm.family.token_fill(k))])
            for k in per_token
        })  # fmt: skip
    width = max(len(ids) for ids in rows_ids)
    pad = lm.tokenizer.pad_token_id or 0
    input_ids = torch.full((len(items), width), pad, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    extra = {k: torch.zeros((len(items), width), dtype=enc[k].dtype) for k in per_token}
    spans, rows, first_image = [], [], 0
    for i, ids in enumerate(rows_ids):
        offset = width - len(ids)  # left padding, as in batched generation
        input_ids[i, offset:] = ids
        mask[i, offset:] = 1
        for k in per_token:
            extra[k][i, offset:] = rows_extra[i][k]
        n_prompt = int(prompt_mask[i].sum())
        # the rows that predict response tokens: the last prompt position onwards
        rows.append((offset + n_prompt - 1, offset + len(ids) - 1))
        images = range(first_image, first_image + len(items[i][1]))
        found = lm.family.image_tokens(ids[:n_prompt], enc, images)
        first_image = images.stop
        spans.append([ImageTokens(t.picture, tuple((s + offset, e + offset) for s, e in t.runs))
                      for t in found])  # fmt: skip
    inputs = {**enc, **extra, "input_ids": input_ids, "attention_mask": mask}
    if lm.family.positions_from_mask:  # positions as generate() computes them for left padding
        inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    inputs = {k: v.to(lm.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    return TeacherForced(inputs, rows, spans)


def score_batch_layers(
    lm: Any, items: list[Item], layers: list[int]
) -> list[tuple[list[np.ndarray], list[ImageTokens]]]:
    """Teacher-forced pass over a left-padded batch; per item, per layer listed, the mean
    attention of its response rows over every image token (images in order), and where
    its images are."""
    batch = teacher_forced(lm, items)
    r0, r1 = min(r for r, _ in batch.rows), max(r for _, r in batch.rows)
    per_layer = capture_layers_attention(lm.model, batch.inputs, layers, (r0, r1))  # (B, R, T)s
    out = []
    for i, images in enumerate(batch.images):
        a, b = batch.rows[i]
        values = []
        for weights in per_layer:
            att = weights[i, a - r0 : b - r0].mean(0)  # (T,)
            cols = torch.cat([att[s:e] for t in images for s, e in t.runs])  # image tokens
            values.append(cols.float().cpu().numpy())
        out.append((values, images))
    return out


def score_batch(
    lm: Any, items: list[Item], layer: int
) -> list[tuple[np.ndarray, list[ImageTokens]]]:
    """`score_batch_layers` for one layer."""
    return [(vals[0], images) for vals, images in score_batch_layers(lm, items, [layer])]


def unscorable(lm: Any, sample: AugmentedSample, response: Response) -> str | None:
    """Why a wrong-or-right answer cannot be teacher-forced as generated, or None."""
    if not response.text.strip():
        return "empty_response"
    if lm.image_token_id in response.token_ids:
        # an image placeholder in the answer would be read as a picture with no
        # pixels when teacher-forced, and when TRL tokenizes the answer text
        return "image_token_in_answer"
    if not reproduces(lm.processor, sample.prompt, response.text, response.token_ids):
        # training re-tokenizes the answer text: its ids must be the generated ones
        return "answer_not_reproducible"
    return None
