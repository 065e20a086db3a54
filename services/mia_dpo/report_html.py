"""The run report: one self-contained HTML file a person can open.

Per format a few pairs with their images (target outlined), the chosen and the
rejected answer and the share of attention per picture; every stage's drop
reasons; the attention calibration (AUC by layer, when the run calibrated); the
training loss curve and a link to its TensorBoard logs (train.report_to tensorboard);
the evaluation table. Images are embedded as
small JPEG thumbnails, so the file travels on its own.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from PIL import Image, ImageDraw

from mia_dpo.calibration import Calibration, format_calibration
from mia_dpo.data.images import decode_image
from mia_dpo.errors import NotFound
from mia_dpo.records import FORMATS, STAGE_ORDER, ScoredResponse, ShardStats
from mia_dpo.runtime import layout
from mia_dpo.runtime.store import BlobReader, Store

THUMB_PX = 150

CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}
.pair{display:flex;gap:16px;margin:12px 0;padding:8px;border:1px solid #eee}
.imgs img{margin-right:4px;vertical-align:top}.txt{min-width:360px;font-size:14px}
.bar{display:inline-block;height:10px;background:#c33;vertical-align:middle}
.ok{color:#171}.bad{color:#a11}pre{background:#f7f7f7;padding:8px}
"""


def _thumb(img: Image.Image, box: tuple[int, int, int, int] | None, outline: bool) -> str:
    scale = THUMB_PX / max(img.size)
    t = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
    draw = ImageDraw.Draw(t)
    if box is not None:
        draw.rectangle(tuple(round(v * scale) for v in box), outline=(230, 0, 0), width=3)
    elif outline:
        draw.rectangle((0, 0, t.width - 1, t.height - 1), outline=(230, 0, 0), width=4)
    buf = io.BytesIO()
    t.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _pair_html(rec: ScoredResponse, blobs: BlobReader) -> str:
    s = rec.sample
    imgs = []
    for i, uri in enumerate(s.images):
        try:
            img = decode_image(blobs.read(uri), uri, 10**9, 1)
        except (NotFound, ValueError):
            imgs.append("<i>(image missing)</i>")
            continue
        src = _thumb(img, s.target_box, outline=s.format == "sequence" and i + 1 == s.target_index)
        imgs.append(f'<img src="{src}">')
    labels = [f"Image{i + 1}" for i in range(len(rec.image_shares))]
    if s.format == "pic_in_pic":
        labels = ["background", "inset"]
    bars = "".join(
        f"<div>{html.escape(lab)}{' (target)' if (i + 1 == s.target_index) else ''}: "
        f'<span class="bar" style="width:{round(200 * share)}px"></span> {share:.2f}</div>'
        for i, (lab, share) in enumerate(zip(labels, rec.image_shares, strict=False))
    )
    return (
        f'<div class="pair"><div class="imgs">{"".join(imgs)}</div><div class="txt">'
        f"<b>{html.escape(s.sample_id)}</b> ({s.format}, {s.n_images} images, "
        f"target Image{s.target_index})<br><pre>{html.escape(s.prompt)}</pre>"
        f'chosen: <span class="ok">{html.escape(s.chosen)}</span><br>'
        f'rejected: <span class="bad">{html.escape(rec.response.text)}</span><br>'
        f"ratio {rec.ratio:.3f} (reject below {rec.threshold}), ppl {rec.response.ppl:.2f}, "
        f"layer {rec.layer}<br>attention share per picture:{bars}</div></div>"
    )


def _examples(store: Store, run_id: str, per_format: int) -> dict[str, list[ScoredResponse]]:
    picked: dict[str, list[ScoredResponse]] = {f: [] for f in FORMATS}
    for key in store.list(layout.stage_prefix(run_id, "score") + "shard-"):
        if not key.endswith(".jsonl") or key.endswith(".dropped.jsonl"):
            continue
        for line in store.get_jsonl(key):
            rec = ScoredResponse.model_validate_json(line)
            if rec.decision == "rejected" and len(picked[rec.sample.format]) < per_format:
                picked[rec.sample.format].append(rec)
        if all(len(v) >= per_format for v in picked.values()):
            break
    return picked


def _loss_svg(history: list[dict]) -> str:
    points = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    if len(points) < 2:
        return "<p>(no training curve logged)</p>"
    w, h, pad = 520, 200, 30
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx = (w - 2 * pad) / ((x1 - x0) or 1)
    sy = (h - 2 * pad) / ((y1 - y0) or 1)
    path = " ".join(f"{pad + (x - x0) * sx:.1f},{h - pad - (y - y0) * sy:.1f}" for x, y in points)
    return (
        f'<svg width="{w}" height="{h}" style="border:1px solid #ddd">'
        f'<polyline fill="none" stroke="#c33" stroke-width="2" points="{path}"/>'
        f'<text x="{pad}" y="16" font-size="12">loss {y1:.3f} .. {y0:.3f}, '
        f"steps {x0}..{x1}</text></svg>"
    )


def _stats_table(store: Store, run_id: str) -> str:
    rows = []
    for stage in ("plan", *STAGE_ORDER):
        try:
            st = ShardStats.model_validate(store.get_json(layout.stage_stats_key(run_id, stage)))
        except NotFound:
            continue
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(st.dropped.items())) or "-"
        notes = ", ".join(f"{k} {v}" for k, v in sorted(st.notes.items())) or ""
        rows.append(
            f'<tr><td class="l">{stage}</td><td>{st.total}</td><td>{st.kept}</td>'
            f'<td class="l">{html.escape(reasons)}</td><td class="l">{html.escape(notes)}</td></tr>'
        )
    head = '<tr><th class="l">stage</th><th>in</th><th>kept</th><th class="l">dropped by reason'
    return f'<table>{head}</th><th class="l">notes</th></tr>{"".join(rows)}</table>'


def _calibration_html(store: Store, run_id: str) -> list[str]:
    """The AUC-by-layer plot and table; a loud banner when no layer separates."""
    try:
        cal = Calibration.model_validate_json(store.get_text(layout.calibration_key(run_id)))
    except NotFound:
        return []
    parts = ["<h2>Attention calibration: right vs wrong answers, ROC AUC by decoder layer</h2>"]
    if cal.best_auc is None or not cal.separates:
        parts.append(
            '<p class="bad"><b>WARNING: attention selection is no better than chance for this '
            f"model</b>: the best layer's AUC is {cal.best_auc} (floor {cal.auc_floor}).</p>"
        )
    try:
        png = store.get_bytes(layout.calibration_key(run_id, "auc_by_layer.png"))
        b64 = base64.b64encode(png).decode()
        parts.append(f'<img alt="AUC by layer" src="data:image/png;base64,{b64}">')
    except NotFound:
        pass
    parts.append(f"<pre>{html.escape(format_calibration(cal))}</pre>")
    return parts


def _tensorboard_html(store: Store, run_id: str) -> list[str]:
    """Where the run's TensorBoard event files are, and the command that shows them."""
    prefix = layout.tensorboard_prefix(layout.train_prefix(run_id))
    if next(iter(store.list(prefix)), None) is None:
        return []
    uri = store.uri(prefix.rstrip("/"))
    href = uri if "://" in uri else Path(uri).resolve().as_uri()
    return [
        f'<p>TensorBoard logs: <a href="{html.escape(href)}">{html.escape(uri)}</a>; view them '
        f"with <code>tensorboard --logdir {html.escape(uri)}</code> (an s3:// folder: copy it "
        "locally first, e.g. <code>aws s3 cp --recursive</code>).</p>"
    ]


def write_report(
    store: Store, blobs: BlobReader, run_id: str, out: Path, per_format: int = 3
) -> Path:
    parts = [
        f"<h1>mia-dpo run {html.escape(run_id)}</h1>",
        "<h2>Stages</h2>",
        _stats_table(store, run_id),
        *_calibration_html(store, run_id),
    ]
    parts.append("<h2>Pairs: chosen (ground truth) vs rejected (the model's confused answer)</h2>")
    for fmt, recs in _examples(store, run_id, per_format).items():
        parts.append(f"<h3>{fmt}</h3>")
        parts.extend(_pair_html(r, blobs) for r in recs)
        if not recs:
            parts.append("<p>(no pair of this format)</p>")
    parts.append("<h2>Training</h2>")
    try:
        meta = store.get_json(layout.train_metadata_key(layout.train_prefix(run_id)))
        parts.append(_loss_svg(meta.get("log_history", [])))
        summary = {k: meta[k] for k in ("method", "steps", "train_loss") if k in meta}
        parts.append(f"<pre>{html.escape(json.dumps(summary, indent=1))}</pre>")
        parts.extend(_tensorboard_html(store, run_id))
    except NotFound:
        parts.append("<p>(not trained yet)</p>")
    parts.append("<h2>Evaluation (held-out questions, exact match)</h2>")
    try:
        table = store.get_text(layout.evaluate_key(run_id, "report.md"))
        parts.append(f"<pre>{html.escape(table)}</pre>")
    except NotFound:
        parts.append("<p>(not evaluated yet)</p>")
    doc = f"<!doctype html><meta charset=utf-8><title>mia-dpo {html.escape(run_id)}</title>"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(doc + f"<style>{CSS}</style>" + "\n".join(parts), encoding="utf-8")
    return out
