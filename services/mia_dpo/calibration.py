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

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mia_dpo.answers import normalize_answer, same_answer
from mia_dpo.config import GRID_COUNTS, SEQUENCE_COUNTS, CalibrateConfig, ScoreConfig
from mia_dpo.records import Format

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
    format_layers: dict[str, list[int]] = Field(
        default_factory=dict,
        description="calibrate.layer_per format: each format's band, which overrides `layers` "
        "for its answers; empty: `layers` for every format.",
    )
    format_auc: dict[str, float | None] = Field(
        default_factory=dict, description="Each format's AUC at its band (layer_per format)."
    )
    auc: float | None = Field(
        description="Pooled AUC at the chosen band(s) (pairs within cells; per format: each "
        "cell at its format's band)."
    )
    auc_by_layer: list[float | None] = Field(description="Pooled AUC per single layer.")
    band_auc: dict[str, float | None] = Field(description="'a-b' (inclusive) -> pooled AUC.")
    best_layers: list[int] = Field(description="The band with the best pooled AUC.")
    best_auc: float | None
    separates: bool = Field(
        description="Best pooled AUC at or above auc_floor (per format: any format's AUC)."
    )
    auc_floor: float
    quantile: float
    n_answers: int
    n_right: int
    n_wrong: int
    n_unknown: int = Field(description="Answers whose correctness could not be told (skipped).")
    cells: list[CellCalibration]

    def layers_for(self, fmt: str) -> list[int]:
        """The band whose ratios score an answer of this format."""
        return self.format_layers.get(fmt, self.layers)

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
        if self.format_layers:
            line += "; per format: " + ", ".join(
                f"{fmt} {band_name(b)} (AUC {_f(self.format_auc.get(fmt)).strip()})"
                for fmt, b in self.format_layers.items()
            )
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
        elif chance := [f for f, a in self.format_auc.items() if a is None or a < self.auc_floor]:
            line += f"; near chance (AUC below {self.auc_floor:.2f}): {', '.join(chance)}"
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

    def pooled(band: Sequence[int], fmt: str | None = None) -> float | None:
        """AUC over right/wrong pairs of the same cell (of `fmt`, or all): cells weighted
        by pairs compared."""
        return _pooled([cell_auc(obs, band) for (f, _), obs in by_cell.items()
                        if fmt is None or f == fmt])  # fmt: skip

    bands = [
        list(range(a, a + w))
        for w in range(1, min(cfg.max_band, num_layers) + 1)
        for a in range(num_layers - w + 1)
    ]
    band_auc = {band_name(b): pooled(b) for b in bands}
    best_band = _best(bands, band_auc) or [num_layers // 2]
    best = band_auc.get(band_name(best_band))
    if fixed_layer is not None:
        chosen, layer_from = [fixed_layer], "config"
    else:
        chosen, layer_from = best_band, "best_auc"
    format_layers: dict[str, list[int]] = {}
    if cfg.layer_per == "format" and fixed_layer is None:
        for fmt in dict.fromkeys(f for f, _ in _cells() if any(f == g for g, _ in by_cell)):
            by_band = {band_name(b): pooled(b, fmt) for b in bands}
            format_layers[fmt] = _best(bands, by_band) or chosen

    def band_of(fmt: str) -> list[int]:
        return format_layers.get(fmt, chosen)

    cells = []
    right_by_format: dict[str, list[float]] = defaultdict(list)  # share x n (chance = 1)
    for (fmt, n), obs in by_cell.items():
        right_by_format[fmt] += [
            float(v) * n for v, o in zip(band_ratio(obs, band_of(fmt)), obs, strict=True) if o.right
        ]
    for fmt, n in _cells():
        obs = by_cell.get((fmt, n), [])
        vals = band_ratio(obs, band_of(fmt)) if obs else np.zeros(0)
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
            auc=cell_auc(obs, band_of(fmt))[0] if obs else None,
            threshold=round(min(thr, 1.0), 6), threshold_from=source,
        ))  # fmt: skip
    n_right = sum(o.right for o in observations)
    auc = band_auc.get(band_name(chosen), pooled(chosen))
    if format_layers:
        auc = _pooled([cell_auc(obs, band_of(f)) for (f, _), obs in by_cell.items()])
    format_auc = {f: pooled(b, f) for f, b in format_layers.items()}
    return Calibration(
        layers=chosen, layer_from=layer_from, auc=auc, format_layers=format_layers,
        format_auc=format_auc,
        auc_by_layer=[band_auc[str(i)] for i in range(num_layers)], band_auc=band_auc,
        best_layers=best_band, best_auc=best,
        separates=any(a is not None and a >= cfg.auc_floor for a in (best, *format_auc.values())),
        auc_floor=cfg.auc_floor,
        quantile=cfg.quantile, n_answers=len(observations), n_right=n_right,
        n_wrong=len(observations) - n_right, n_unknown=n_unknown, cells=cells,
    )  # fmt: skip


def _pooled(aucs: Sequence[tuple[float | None, int]]) -> float | None:
    """Cells' (AUC, pairs compared) pooled: each cell weighted by its pairs."""
    total = weight = 0.0
    for auc, pairs in aucs:
        if auc is not None:
            total, weight = total + auc * pairs, weight + pairs
    return total / weight if weight else None


def _best(bands: Sequence[list[int]], aucs: Mapping[str, float | None]) -> list[int] | None:
    """The band with the best AUC; a tie keeps the narrower, then the earlier one (list
    order); None when no band was measured."""
    scored = [(aucs[band_name(b)], b) for b in bands if aucs[band_name(b)] is not None]
    return max(scored, key=lambda t: t[0])[1] if scored else None  # type: ignore[arg-type,return-value]


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
    where = (", ".join(f"{f} {band_name(b)}" for f, b in cal.format_layers.items())
             if cal.format_layers else band_name(cal.layers))  # fmt: skip
    lines.append(f"thresholds at layer {where} (quantile {cal.quantile} of "
                 "right answers' ratios): "
                 + ", ".join(f"{c.format} {c.n_images}: {c.threshold:.3f}"
                             + ("" if c.threshold_from == "quantile" else f" ({c.threshold_from})")
                             for c in cal.cells))  # fmt: skip
    return "\n".join(lines)


def as_tables(
    cal: Calibration | None, score: ScoreConfig
) -> tuple[Mapping[int, float], Mapping[int, float], float]:
    """The thresholds the score stage applies: calibrated when configured, else the paper's."""
    if score.thresholds == "calibrated":
        if cal is None:
            raise ValueError("score.thresholds calibrated needs a calibration")
        return cal.tables()
    return score.sequence_thresholds, score.grid_thresholds, score.pic_in_pic_threshold
