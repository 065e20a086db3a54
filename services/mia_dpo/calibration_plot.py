"""The calibration's picture: AUC by decoder layer, pooled and per format, with chance,
the floor and the chosen layer (band) marked; per-format choices dashed in their colour.
Pillow only, so the light image (no matplotlib, no torch) draws it too."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw

from mia_dpo.calibration import Calibration, band_name
from mia_dpo.records import FORMATS

_W, _H, _PAD = 560, 320, 48
_COLOURS = {"pooled": (20, 20, 20), "sequence": (31, 119, 180), "grid": (44, 160, 44),
            "pic_in_pic": (214, 39, 40)}  # fmt: skip
_SHORT = {"sequence": "seq", "grid": "grid", "pic_in_pic": "pip"}


def _format_auc(cal: Calibration) -> dict[str, list[float | None]]:
    """Per format, AUC per layer pooled over its image counts (weights: pairs)."""
    out: dict[str, list[float | None]] = {}
    n_layers = len(cal.auc_by_layer)
    for fmt in FORMATS:
        cells = [c for c in cal.cells if c.format == fmt]
        row: list[float | None] = []
        for i in range(n_layers):
            pairs = [(c.auc_by_layer[i], c.n_right * c.n_wrong) for c in cells
                     if c.auc_by_layer[i] is not None]  # fmt: skip
            weight = sum(p for _, p in pairs)
            row.append(sum(a * p for a, p in pairs) / weight if weight else None)  # type: ignore[operator]
        if any(v is not None for v in row):
            out[fmt] = row
    return out


def auc_plot_png(cal: Calibration) -> bytes:
    """AUC by decoder layer (pooled and per format), chance and the floor marked: a PNG."""
    img = Image.new("RGB", (_W, _H), "white")
    d = ImageDraw.Draw(img)
    x0, x1, y0, y1 = _PAD, _W - 130, _PAD // 2, _H - _PAD
    n = len(cal.auc_by_layer)

    def xy(layer: int, auc: float) -> tuple[float, float]:
        x = x0 + (x1 - x0) * (layer / max(n - 1, 1))
        return x, y1 - (y1 - y0) * min(max(auc, 0.0), 1.0)

    d.rectangle((x0, y0, x1, y1), outline=(120, 120, 120))
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        _, y = xy(0, tick)
        d.line((x0 - 4, y, x0, y), fill=(120, 120, 120))
        d.text((4, y - 6), f"{tick:.2f}", fill=(60, 60, 60))
    for level, colour in ((0.5, (170, 170, 170)), (cal.auc_floor, (230, 150, 60))):
        _, y = xy(0, level)
        d.line((x0, y, x1, y), fill=colour)
    for i in range(n):
        x, _ = xy(i, 0)
        d.text((x - 3, y1 + 6), str(i), fill=(60, 60, 60))
    d.text(((x0 + x1) // 2 - 40, _H - 18), "decoder layer", fill=(0, 0, 0))
    series = {"pooled": cal.auc_by_layer, **_format_auc(cal)}
    for row, (name, values) in enumerate(series.items()):
        colour = _COLOURS[name]
        pts = [xy(i, v) for i, v in enumerate(values) if v is not None]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=3 if name == "pooled" else 1)
        for x, y in pts:
            d.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        d.text((x1 + 12, y0 + 16 * row), name, fill=colour)
    for i in cal.layers:  # the chosen band
        x, _ = xy(i, 0)
        d.line((x, y0, x, y1), fill=(230, 150, 60))
    d.text((x1 + 12, y0 + 16 * (len(series) + 1)), f"chosen: {band_name(cal.layers)}",
           fill=(0, 0, 0))  # fmt: skip
    for row, (fmt, band) in enumerate(cal.format_layers.items()):  # per format: dashed
        for i in band:
            x, _ = xy(i, 0)
            for y in range(int(y0), int(y1), 8):
                d.line((x + 2, y, x + 2, y + 4), fill=_COLOURS[fmt])
        d.text((x1 + 12, y0 + 16 * (len(series) + 2 + row)),
               f"{_SHORT[fmt]}: {band_name(band)}", fill=_COLOURS[fmt])  # fmt: skip
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
