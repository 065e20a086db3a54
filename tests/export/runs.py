"""A finished run to export, built with the real records and the real select stage:
images stored as blobs in the run's store (as the augment stage stores its collages),
score records for them, then `select` itself writes the pairs files."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw

from mia_dpo.config import RunConfig, load_config
from mia_dpo.records import AugmentedSample, Response, ScoredResponse, Task
from mia_dpo.runtime import layout
from mia_dpo.runtime.context import StageContext
from mia_dpo.runtime.store import BlobReader, Store
from mia_dpo.stages.select import run_shard

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 60, 220)}
NAMES = list(COLOURS)


def png(colour: str, size: tuple[int, int] = (80, 64)) -> bytes:
    img = Image.new("RGB", size, (240, 240, 240))  # not square, as source images rarely are
    ImageDraw.Draw(img).ellipse([20, 12, 60, 52], fill=COLOURS[colour])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def put_image(store: Store, run_id: str, name: str, data: bytes) -> str:
    key = f"{layout.augment_images_prefix(run_id, 0)}/{name}"
    store.put_bytes(key, data, "image/png")
    return store.uri(key)


def scored(i: int, images: list[str], answer: str, chosen: str) -> ScoredResponse:
    right = answer == chosen
    sample = AugmentedSample(
        sample_id=f"s{i}-sequence", source_id=f"s{i}", source="colors", format="sequence",
        images=images, target_index=2, n_images=2,
        prompt="Image1:<image>\nImage2:<image>\nIn Image2, what colour is the circle?",
        chosen=chosen, target_image=f"colors/s{i}.png",
    )  # fmt: skip
    response = Response(text=answer, token_ids=[5, 3], logprobs=[-0.7, -0.1], ppl=1.5)
    return ScoredResponse(
        sample=sample, response_index=0, response=response, layer=2,
        ratio=None if right else 0.3, decision="dropped" if right else "rejected",
        reason="equals_ground_truth" if right else "attention",
    )  # fmt: skip


def build_run(store: Store, run_id: str = "exp", n: int = 5) -> RunConfig:
    """`n` wrong two-image answers (each naming Image1's colour) and one right answer
    that label balancing keeps as an SFT-only row. Sample 1 reuses sample 0's second
    image (same URI), sample 2 holds a copy of it under another key (same bytes):
    both must end up as one exported file."""
    cfg = load_config(None, overrides={"select.label_balance": True, "train.sft_weight": 1.0})
    records = []
    for i in range(n):
        first, second = NAMES[i % 3], NAMES[(i + 1) % 3]
        uris = [put_image(store, run_id, f"s{i}-1.png", png(first))]
        if i == 1:
            uris.append(records[0].sample.images[1])
        else:
            uris.append(put_image(store, run_id, f"s{i}-2.png", png(second)))
        records.append(scored(i, uris, answer=first, chosen=second))
    rejected = records[0].response.text  # rejected once more than chosen: balanced below
    uris = [put_image(store, run_id, f"r-{k}.png", png(c)) for k, c in ((1, "blue"), (2, rejected))]
    records.append(scored(n, uris, answer=rejected, chosen=rejected))
    store.put_jsonl(layout.shard_key(run_id, "score", 0), [r.model_dump_json() for r in records])
    store.put_json(layout.config_key(run_id), cfg.model_dump(mode="json"))
    ctx = StageContext(store=store, blobs=BlobReader(cfg.store), config=cfg)
    run_shard(Task.make(run_id, "select", 0), ctx)
    store.put_json(layout.stage_done_key(run_id, "select"), {"at": 0.0, "dead_shards": []})
    return cfg
