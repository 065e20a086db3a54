"""Calibrated attention selection (goes beyond the paper; docs/method.md §3a).

The paper reads one fixed layer and compares the target's attention share with one
threshold table, both set for LLaVA-1.5-7B. Nothing promises another model (or a
fine-tuned one) puts the signal at the same layer or scale. Calibration measures it:
over answers whose correctness is known, per decoder layer (or a band of adjacent
layers, ratios averaged) and per format and image count, the ROC AUC of the target's
share for right vs wrong answers; the layer (band) with the best pooled AUC is chosen,
and each cell's threshold is a quantile of its right answers' shares there.

Pure numpy and pydantic: the calibrate stage computes the shares with the model, the
score stage, the report and `status` only read `Calibration` (the light image has no
torch).
"""

from __future__ import annotations

import io
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field

from mia_dpo.answers import normalize_answer, same_answer
from mia_dpo.config import GRID_COUNTS, SEQUENCE_COUNTS, CalibrateConfig, ScoreConfig
from mia_dpo.records import FORMATS, Format

# A ground truth this short (in words) counts as found when the answer contains it.
PRESENCE_MAX_WORDS = 5


def correctness(response: str, chosen: str) -> bool | None:
    """True/False when known: the same answer, or a short ground truth found in it as
    whole words; None for a long ground truth the answer does not repeat (unknown)."""
    if same_answer(response, chosen):
        return True
    gold, said = normalize_answer(chosen), normalize_answer(response)
    if not gold:
        return None
    if len(gold.split()) <= PRESENCE_MAX_WORDS:
        return re.search(rf"(?<!\w){re.escape(gold)}(?!\w)", said) is not None
    return None


def roc_auc(right: Sequence[float], wrong: Sequence[float]) -> float | None:
    """P(a right answer's share > a wrong answer's), ties count one half (Mann-Whitney);
    None without both kinds."""
    r, w = np.asarray(right, dtype=float), np.asarray(wrong, dtype=float)
    if r.size == 0 or w.size == 0:
        return None
    w_sorted = np.sort(w)
    below = np.searchsorted(w_sorted, r, side="left")  # wrong strictly below each right
    ties = np.searchsorted(w_sorted, r, side="right") - below
    return float((below + 0.5 * ties).sum() / (r.size * w.size))


class Observation(BaseModel):
    """One answer as calibration sees it: its cell, correctness and share per layer."""

    model_config = ConfigDict(extra="forbid")
    format: Format
    n_images: int
    right: bool
    ratios: list[float] = Field(description="Target's share at every decoder layer, 0-based.")


class CellCalibration(BaseModel):
    format: Format
    n_images: int
    n_right: int
    n_wrong: int
    auc_by_layer: list[float | None] = Field(description="Per single layer; None: too few.")
    auc: float | None = Field(description="At the chosen layer (band).")
    threshold: float
    threshold_from: Literal["quantile", "format", "paper"] = Field(
        description="quantile: this cell's right answers; format: the format's right answers "
        "scaled by the chance share 1/n (too few here); paper: no right answer of the format."
    )


class Calibration(BaseModel):
    """calibration.json: what the calibrate stage measured and chose."""

    layers: list[int] = Field(description="The chosen layer band (0-based, adjacent).")
    layer_from: Literal["best_auc", "config"]
    auc: float | None = Field(description="Pooled AUC of the chosen band (pairs within cells).")
    auc_by_layer: list[float | None] = Field(description="Pooled AUC per single layer.")
    band_auc: dict[str, float | None] = Field(description="'a-b' (inclusive) -> pooled AUC.")
    best_layers: list[int] = Field(description="The band with the best pooled AUC.")
    best_auc: float | None
    separates: bool = Field(description="Best pooled AUC at or above auc_floor.")
    auc_floor: float
    quantile: float
    n_answers: int
    n_right: int
    n_wrong: int
    n_unknown: int = Field(description="Answers whose correctness could not be told (skipped).")
    cells: list[CellCalibration]

    def threshold(self, fmt: str, n_images: int) -> float:
        for c in self.cells:
            if c.format == fmt and c.n_images == n_images:
                return c.threshold
        raise KeyError(f"no calibrated threshold for {fmt} with {n_images} images")

    def tables(self) -> tuple[dict[int, float], dict[int, float], float]:
        """(sequence, grid, pic-in-pic) thresholds, shaped like ScoreConfig's."""
        seq = {c.n_images: c.threshold for c in self.cells if c.format == "sequence"}
        grid = {c.n_images: c.threshold for c in self.cells if c.format == "grid"}
        return seq, grid, self.threshold("pic_in_pic", 2)

    def summary(self) -> str:
        band = band_name(self.layers)
        auc = "n/a" if self.auc is None else f"{self.auc:.3f}"
        line = f"layer {band} (AUC {auc}, {self.n_right} right / {self.n_wrong} wrong answers)"
        if self.layer_from == "config" and self.best_layers != self.layers:
            best = "n/a" if self.best_auc is None else f"{self.best_auc:.3f}"
            line += f"; best would be layer {band_name(self.best_layers)} (AUC {best})"
        if self.best_auc is None:
            line += (
                "; WARNING: too few right and wrong answers in any cell to measure an AUC "
                "(calibrate.min_answers_per_cell)"
            )
        elif not self.separates:
            line += (
                f"; WARNING: no layer reaches AUC {self.auc_floor:.2f}: attention selection "
                "is no better than chance for this model"
            )
        return line


def band_name(layers: Sequence[int]) -> str:
    return str(layers[0]) if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"


def _cells() -> list[tuple[Format, int]]:
    return [
        *(("sequence", n) for n in SEQUENCE_COUNTS),
        *(("grid", n) for n in GRID_COUNTS),
        ("pic_in_pic", 2),
    ]


def _paper(score: ScoreConfig, fmt: str, n: int) -> float:
    if fmt == "sequence":
        return score.sequence_thresholds[n]
    if fmt == "grid":
        return score.grid_thresholds[n]
    return score.pic_in_pic_threshold


def calibrate(
    observations: Sequence[Observation],
    num_layers: int,
    cfg: CalibrateConfig,
    score: ScoreConfig,
    fixed_layer: int | None = None,
    n_unknown: int = 0,
) -> Calibration:
    """Choose the band (or take `fixed_layer`) and every cell's threshold."""
    by_cell: dict[tuple[str, int], list[Observation]] = defaultdict(list)
    for o in observations:
        if len(o.ratios) != num_layers:
            raise ValueError(f"an observation has {len(o.ratios)} layers, expected {num_layers}")
        by_cell[(o.format, o.n_images)].append(o)

    def band_ratio(obs: list[Observation], band: Sequence[int]) -> np.ndarray:
        return np.asarray([np.mean([o.ratios[i] for i in band]) for o in obs], dtype=float)

    def cell_auc(obs: list[Observation], band: Sequence[int]) -> tuple[float | None, int]:
        """(AUC, pairs compared) of one cell; None when either side has too few answers."""
        vals = band_ratio(obs, band)
        right = vals[[o.right for o in obs]]
        wrong = vals[[not o.right for o in obs]]
        if min(right.size, wrong.size) < cfg.min_answers_per_cell:
            return None, 0
        return roc_auc(right, wrong), right.size * wrong.size

    def pooled(band: Sequence[int]) -> float | None:
        """AUC over right/wrong pairs of the same cell: cells weighted by pairs compared."""
        total = weight = 0.0
        for obs in by_cell.values():
            auc, pairs = cell_auc(obs, band)
            if auc is not None:
                total, weight = total + auc * pairs, weight + pairs
        return total / weight if weight else None

    bands = [
        list(range(a, a + w))
        for w in range(1, min(cfg.max_band, num_layers) + 1)
        for a in range(num_layers - w + 1)
    ]
    band_auc = {band_name(b): pooled(b) for b in bands}
    # the best band; a tie keeps the narrower, then the earlier one (list order)
    scored = [(band_auc[band_name(b)], b) for b in bands if band_auc[band_name(b)] is not None]
    best_band = max(scored, key=lambda t: t[0])[1] if scored else [num_layers // 2]
    best = band_auc.get(band_name(best_band))
    if fixed_layer is not None:
        chosen, layer_from = [fixed_layer], "config"
    else:
        chosen, layer_from = best_band, "best_auc"

    cells = []
    right_by_format: dict[str, list[float]] = defaultdict(list)  # share x n (chance = 1)
    for (fmt, n), obs in by_cell.items():
        right_by_format[fmt] += [
            float(v) * n for v, o in zip(band_ratio(obs, chosen), obs, strict=True) if o.right
        ]
    for fmt, n in _cells():
        obs = by_cell.get((fmt, n), [])
        vals = band_ratio(obs, chosen) if obs else np.zeros(0)
        right = vals[[o.right for o in obs]] if obs else vals
        if right.size >= cfg.min_answers_per_cell:
            thr, source = float(np.quantile(right, cfg.quantile)), "quantile"
        elif fmt != "pic_in_pic" and len(right_by_format[fmt]) >= cfg.min_answers_per_cell:
            # the format's right answers on the chance scale, brought back to n images
            thr = float(np.quantile(right_by_format[fmt], cfg.quantile)) / n
            source = "format"
        else:
            thr, source = _paper(score, fmt, n), "paper"
        cells.append(CellCalibration(
            format=fmt, n_images=n, n_right=int(sum(o.right for o in obs)),
            n_wrong=int(sum(not o.right for o in obs)),
            auc_by_layer=[cell_auc(obs, [i])[0] for i in range(num_layers)] if obs
            else [None] * num_layers,
            auc=cell_auc(obs, chosen)[0] if obs else None,
            threshold=round(min(thr, 1.0), 6), threshold_from=source,
        ))  # fmt: skip
    n_right = sum(o.right for o in observations)
    return Calibration(
        layers=chosen, layer_from=layer_from, auc=band_auc.get(band_name(chosen), pooled(chosen)),
        auc_by_layer=[band_auc[str(i)] for i in range(num_layers)], band_auc=band_auc,
        best_layers=best_band, best_auc=best,
        separates=best is not None and best >= cfg.auc_floor, auc_floor=cfg.auc_floor,
        quantile=cfg.quantile, n_answers=len(observations), n_right=n_right,
        n_wrong=len(observations) - n_right, n_unknown=n_unknown, cells=cells,
    )  # fmt: skip


def _f(v: float | None) -> str:
    return "  -  " if v is None else f"{v:.3f}"


def format_calibration(cal: Calibration) -> str:
    """AUC per layer (pooled, then per cell) and each cell's threshold, as text."""
    n = len(cal.auc_by_layer)
    head = "cell           right wrong | " + " ".join(f"L{i:<4}" for i in range(n))
    lines = [f"calibration: {cal.summary()}", head, "-" * len(head)]
    lines.append(f"{'pooled':14} {cal.n_right:5} {cal.n_wrong:5} | "
                 + " ".join(_f(v) for v in cal.auc_by_layer))  # fmt: skip
    for c in cal.cells:
        if c.n_right + c.n_wrong:
            lines.append(f"{c.format + ' ' + str(c.n_images):14} {c.n_right:5} {c.n_wrong:5} | "
                         + " ".join(_f(v) for v in c.auc_by_layer))  # fmt: skip
    lines.append(f"thresholds at layer {band_name(cal.layers)} (quantile {cal.quantile} of "
                 "right answers' ratios): "
                 + ", ".join(f"{c.format} {c.n_images}: {c.threshold:.3f}"
                             + ("" if c.threshold_from == "quantile" else f" ({c.threshold_from})")
                             for c in cal.cells))  # fmt: skip
    return "\n".join(lines)


# --- The plot --------------------------------------------------------------------

_W, _H, _PAD = 560, 320, 48
_COLOURS = {"pooled": (20, 20, 20), "sequence": (31, 119, 180), "grid": (44, 160, 44),
            "pic_in_pic": (214, 39, 40)}  # fmt: skip


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
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def as_tables(
    cal: Calibration | None, score: ScoreConfig
) -> tuple[Mapping[int, float], Mapping[int, float], float]:
    """The thresholds the score stage applies: calibrated when configured, else the paper's."""
    if score.thresholds == "calibrated":
        if cal is None:
            raise ValueError("score.thresholds calibrated needs a calibration")
        return cal.tables()
    return score.sequence_thresholds, score.grid_thresholds, score.pic_in_pic_threshold
