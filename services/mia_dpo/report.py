"""Contact sheet: a PNG that shows what the augment stage made, a few samples per
format, the target outlined in red, with the prompt and the chosen answer."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from mia_dpo.config import RunConfig
from mia_dpo.data.images import decode_image
from mia_dpo.records import FORMATS, AugmentedSample
from mia_dpo.runtime import layout
from mia_dpo.runtime.store import BlobReader, Store

THUMB_H = 180
TEXT_W = 420
PAD = 12


def _samples(store: Store, run_id: str, per_format: int) -> dict[str, list[AugmentedSample]]:
    picked: dict[str, list[AugmentedSample]] = {f: [] for f in FORMATS}
    for key in store.list(layout.stage_prefix(run_id, "augment")):
        if not key.endswith(".jsonl") or key.endswith(".dropped.jsonl"):
            continue
        for line in store.get_jsonl(key):
            s = AugmentedSample.model_validate_json(line)
            if len(picked[s.format]) < per_format:
                picked[s.format].append(s)
        if all(len(v) >= per_format for v in picked.values()):
            break
    return picked


def _thumbs(sample: AugmentedSample, blobs: BlobReader) -> list[Image.Image]:
    out = []
    for i, uri in enumerate(sample.images):
        img = decode_image(blobs.read(uri), uri, 10**9, 1)
        scale = THUMB_H / img.height
        thumb = img.resize((max(1, round(img.width * scale)), THUMB_H), Image.Resampling.LANCZOS)
        draw = ImageDraw.Draw(thumb)
        if sample.target_box is not None:
            x0, y0, x1, y1 = (round(v * scale) for v in sample.target_box)
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(230, 0, 0), width=3)
        elif i + 1 == sample.target_index:
            draw.rectangle((0, 0, thumb.width - 1, thumb.height - 1), outline=(230, 0, 0), width=5)
        out.append(thumb)
    return out


def contact_sheet(
    store: Store, cfg: RunConfig, run_id: str, out: Path, per_format: int = 3
) -> Path:
    blobs = BlobReader(cfg.store)
    font = ImageFont.load_default(size=14)
    title_font = ImageFont.load_default(size=20)
    rows: list[tuple[str, list[Image.Image]]] = []
    for fmt, samples in _samples(store, run_id, per_format).items():
        for s in samples:
            text = (
                f"{fmt}  n_images={s.n_images}  target=Image{s.target_index}"
                + (f"  layout={s.layout[0]}x{s.layout[1]}" if s.layout else "")
                + f"\nid: {s.sample_id}\nprompt: {s.prompt}\nchosen: {s.chosen}"
            )
            wrapped = "\n".join(
                textwrap.fill(part, 56, subsequent_indent="  ") for part in text.splitlines()
            )
            rows.append((wrapped, _thumbs(s, blobs)))
    width = max([TEXT_W + sum(t.width + PAD for t in th) for _, th in rows] + [600]) + PAD
    height = 50 + sum(THUMB_H + PAD for _ in rows) + PAD
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text(
        (PAD, PAD),
        f"mia-dpo run {run_id}: augmented samples (target in red)",
        fill="black",
        font=title_font,
    )
    y = 50
    for text, thumbs in rows:
        draw.multiline_text((PAD, y), text, fill="black", font=font, spacing=3)
        x = TEXT_W
        for t in thumbs:
            sheet.paste(t, (x, y))
            x += t.width + PAD
        y += THUMB_H + PAD
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    out.write_bytes(buf.getvalue())
    return out
