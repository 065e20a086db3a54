"""One multi-image prompt from one source sample (docs/method.md §1).

Used by the augment stage for training samples and by the evaluate stage for its
benchmark. For a source sample: draw a format and an image count
from the configured mix, a random position for the target, distractors from the
same source subset (never the target image), then build the images the model will
see and rewrite the question so it names the target. Every draw comes from an RNG
seeded by (run seed, sample id), so any worker, any rerun, gives the same bytes.
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import Any, Protocol

from PIL import Image

from mia_dpo.augmentation.compose import (
    compose_grid,
    compose_pic_in_pic,
    encode_image,
    grid_layout,
)
from mia_dpo.config import GRID_COUNTS, SEQUENCE_COUNTS, AugmentConfig, InputConfig, RunConfig
from mia_dpo.data.images import BlobSource, ImageLoader
from mia_dpo.data.source import SourceSample
from mia_dpo.errors import SampleError
from mia_dpo.prompts import (
    DEFAULT_PIP_PHRASINGS,
    choose_phrasing,
    grid_prompt,
    has_bbox,
    later_turn,
    pip_prompt,
    sequence_prompt,
    strip_image_tag,
)
from mia_dpo.records import FORMATS, AugmentedSample, Format, Turn


class ImageSink(Protocol):
    """Where composed images go (the run's store): a key in, a URI back."""

    def put_bytes(self, key: str, data: bytes) -> None: ...

    def uri(self, key: str) -> str: ...


def sample_rng(seed: int, sample_id: str) -> random.Random:
    """Independent of worker, shard size and PYTHONHASHSEED."""
    digest = hashlib.sha256(f"{seed}\x00{sample_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _pick(rng: random.Random, weights: dict[Any, float], order: list[Any]) -> Any:
    keys = [k for k in order if weights.get(k, 0) > 0]  # canonical order, not YAML order
    return rng.choices(keys, [weights[k] for k in keys])[0]


# Recent source images kept decoded per worker: distractors repeat within a shard.
SOURCE_IMAGE_CACHE = 64


def source_images(blobs: BlobSource, inp: InputConfig) -> ImageLoader:
    """The loader of source images (paths relative to `input.image_root`)."""
    return ImageLoader(
        blobs, inp.max_image_pixels, inp.min_image_side_px,
        root=inp.image_root, capacity=SOURCE_IMAGE_CACHE,
    )  # fmt: skip


def draw_distractors(
    rng: random.Random, pool: list[str], target: str, k: int, loader: ImageLoader, max_failures: int
) -> list[tuple[str, Image.Image]]:
    """k distinct loadable images of the pool, never the target, in random order."""
    tries = min(len(pool), k + max_failures + 1)
    picked: list[tuple[str, Image.Image]] = []
    failures = 0
    for idx in rng.sample(range(len(pool)), tries):
        rel = pool[idx]
        if rel == target:
            continue
        try:
            picked.append((rel, loader.load(rel)))
        except SampleError:
            failures += 1
            if failures > max_failures:
                break
            continue
        if len(picked) == k:
            return picked
    raise SampleError(
        "too_few_distractors",
        f"source pool has {len(picked)} usable distractor images, {k} needed "
        f"({failures} unreadable)",
    )


def _image_key(prefix: str, sample_id: str, ext: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", sample_id)[:80]
    tag = hashlib.sha1(sample_id.encode()).hexdigest()[:8]  # keeps sanitised ids apart
    return f"{prefix}/{safe}-{tag}.{ext}"


def choose_format(
    rng: random.Random, sample: SourceSample, acfg: AugmentConfig, fmt: Format | None = None
) -> tuple[Format, bool]:
    """Draw the format (or take `fmt`, forced); a bbox question cannot go into a
    composed image. Returns (format, whether it fell back to sequence because of
    coordinates). A forced format never falls back: the caller asked for that one."""
    forced = fmt is not None
    if fmt is None:
        fmt = _pick(rng, acfg.formats, list(FORMATS))
    if fmt in acfg.skip_bbox_for and any(
        has_bbox(t.question) or has_bbox(t.answer) for t in sample.turns
    ):
        if not forced and acfg.formats.get("sequence", 0) > 0:
            return "sequence", True
        raise SampleError(
            "bbox_coordinates", f"{fmt}: the conversation holds [x1, y1, x2, y2] coordinates"
        )
    return fmt, False


def augment_sample(
    sample: SourceSample,
    pools: dict[str, list[str]],
    loader: ImageLoader,
    sink: ImageSink,
    image_prefix: str,
    cfg: RunConfig,
    *,
    fmt: Format | None = None,
    salt: str = "",
) -> tuple[AugmentedSample, bool]:
    """`fmt` forces the format; `salt` gives draws independent of the augment stage's
    (the evaluate stage builds its benchmark with both); composed images are written
    to `sink` under `image_prefix`. Returns (sample, whether a bbox question fell back
    to the sequence format)."""
    acfg = cfg.augment
    rng = sample_rng(cfg.seed, salt + sample.id)
    fmt, fell_back = choose_format(rng, sample, acfg, fmt)
    if fmt == "sequence":
        n = _pick(rng, acfg.sequence_counts, list(SEQUENCE_COUNTS))
    elif fmt == "grid":
        n = _pick(rng, acfg.grid_counts, list(GRID_COUNTS))
    else:
        n = 2
    position = rng.randrange(n)  # 0-based slot of the target
    phrasing = choose_phrasing(rng, acfg.pip_phrasings or DEFAULT_PIP_PHRASINGS)
    target = loader.load(sample.image)  # validates the target even when it is only referenced
    distractors = draw_distractors(
        rng, pools.get(sample.source, []), sample.image, n - 1, loader, acfg.max_distractor_tries
    )
    question = strip_image_tag(sample.turns[0].question)
    sample_id = f"{sample.id}-{fmt}"
    ext = "jpg" if acfg.image_format == "jpeg" else "png"
    common: dict[str, Any] = {
        "sample_id": sample_id,
        "source_id": sample.id,
        "source": sample.source,
        "format": fmt,
        "n_images": n,
        "chosen": sample.turns[0].answer,
        "target_image": sample.image,
        "distractor_images": [rel for rel, _ in distractors],
    }

    def save(img: Image.Image) -> list[str]:
        """Composed images go to the store; records point at them."""
        key = _image_key(image_prefix, sample_id, ext)
        sink.put_bytes(key, encode_image(img, acfg.image_format, acfg.jpeg_quality))
        return [sink.uri(key)]

    if fmt == "pic_in_pic":
        ((_, background),) = distractors
        composite, box = compose_pic_in_pic(background, target, acfg.pip_scale)
        k = 2  # the inset; picture 1 is the background
        record = dict(
            images=save(composite), target_index=k, target_box=box,
            prompt=pip_prompt(phrasing, question),
        )  # fmt: skip
    elif fmt == "sequence":
        ordered = [rel for rel, _ in distractors]
        ordered.insert(position, sample.image)
        k = position + 1
        record = dict(
            images=[loader.uri(rel) for rel in ordered], target_index=k,
            prompt=sequence_prompt(n, k, question),
        )  # fmt: skip
    else:
        imgs = [img for _, img in distractors]
        imgs.insert(position, target)
        k = position + 1
        canvas, boxes = compose_grid(
            imgs, acfg.grid_tile_px, acfg.grid_margin_px, acfg.grid_label_font_px
        )
        record = dict(
            images=save(canvas), target_index=k, layout=grid_layout(n),
            target_box=boxes[position], prompt=grid_prompt(k, question),
        )  # fmt: skip
    turns = [
        Turn(question=later_turn(fmt, k, phrasing, strip_image_tag(t.question)), answer=t.answer)
        for t in sample.turns[1:]
    ]
    return AugmentedSample(**common, **record, turns=turns), fell_back
