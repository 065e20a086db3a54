"""Method sections: what each stage computes, and from what.

The paper's constants (docs/method.md §1) are the defaults here and nowhere else.

`input` and `model` sit here, not with the connections: a run's outputs depend on
them (which samples are used and which are held out; which weights answer and are
scored), so `RunConfig.stage_params()` pins them together with the stage sections
and a resumed run may not change them. The connection sections only say where
data and tasks live and how workers start; no output depends on them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from mia_dpo.config.base import Section


class InputConfig(Section):
    path: str = Field(
        default="",
        description="LLaVA-format JSON or JSONL index: a local path or s3://bucket/key.",
    )
    image_root: str = Field(
        default="",
        description="Folder the `image` paths are relative to: a local directory or s3://bucket/prefix.",
    )
    shard_size: int = Field(default=64, ge=1, le=100_000, description="Source samples per shard.")
    max_image_pixels: int = Field(
        default=50_000_000,
        ge=1,
        description="Images with more pixels (width x height, read from the header) are dropped.",
    )
    min_image_side_px: int = Field(
        default=8, ge=1, description="Images narrower or shorter than this are dropped (px)."
    )
    limit: int | None = Field(
        default=None, ge=1, description="Use only the first N samples of the index (null: all)."
    )
    holdout_fraction: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description=(
            "Fraction of source samples held out for the evaluate stage, chosen by a hash of "
            "(seed, id); they never reach augment, pairs or training. 0: none."
        ),
    )


def _weights(field: str, value: dict[Any, float], allowed: tuple[Any, ...] | None = None) -> None:
    if allowed is not None:
        bad = [k for k in value if k not in allowed]
        if bad:
            raise ValueError(f"{field}: {bad[0]} images is not a layout (allowed: {list(allowed)})")
    if not value:
        raise ValueError(f"{field}: needs at least one entry")
    if any(w < 0 for w in value.values()) or sum(value.values()) <= 0:
        raise ValueError(f"{field}: weights must be >= 0 with a positive sum")


SEQUENCE_COUNTS = (2, 3, 4, 5)
GRID_COUNTS = (2, 3, 4, 6, 9)


class AugmentConfig(Section):
    formats: dict[Literal["sequence", "grid", "pic_in_pic"], float] = Field(
        default={"sequence": 1.0, "grid": 1.0, "pic_in_pic": 1.0},
        description="Relative weight of each format; each source sample gets one format.",
    )
    sequence_counts: dict[int, float] = Field(
        # Image-count mix of the reference's 62,461 sequence samples.
        default={2: 0.55, 3: 0.16, 4: 0.16, 5: 0.13},
        description="Sequence: weight of each image count (2-5).",
    )
    grid_counts: dict[int, float] = Field(
        # Image-count mix of the reference's 90,000 collages.
        default={2: 0.53, 3: 0.16, 4: 0.16, 6: 0.08, 9: 0.08},
        description="Grid collage: weight of each image count (2, 3, 4, 6, 9).",
    )
    grid_tile_px: int = Field(default=448, ge=16, description="Grid: side of a square tile (px).")
    grid_margin_px: int = Field(
        default=40, ge=0, description="Grid: gap between tiles and height of the label band (px)."
    )
    grid_label_font_px: int = Field(default=36, ge=6, description="Grid: label font size (px).")
    pip_scale: float = Field(
        default=0.7,
        gt=0.0,
        lt=1.0,
        description="Pic-in-pic: the target fits within this fraction of the background's sides.",
    )
    pip_phrasings: list[str] | None = Field(
        default=None,
        description="Pic-in-pic: question prefixes naming the centre image (null: built-in list).",
    )
    skip_bbox_for: list[Literal["grid", "pic_in_pic"]] = Field(
        default=["grid", "pic_in_pic"],
        description=(
            "Formats that must not carry questions with [x1, y1, x2, y2] coordinates (they move "
            "when images are composed); such samples are given the sequence format instead, "
            "or dropped when sequence has weight 0."
        ),
    )
    image_format: Literal["jpeg", "png"] = Field(
        default="jpeg", description="Encoding of composed images (grid, pic-in-pic)."
    )
    jpeg_quality: int = Field(
        default=95, ge=1, le=100, description="JPEG quality of composed images."
    )
    max_distractor_tries: int = Field(
        default=20,
        ge=0,
        description="Unreadable distractors skipped before a sample is dropped.",
    )

    @model_validator(mode="after")
    def _check(self) -> AugmentConfig:
        _weights("formats", self.formats)
        _weights("sequence_counts", self.sequence_counts, SEQUENCE_COUNTS)
        _weights("grid_counts", self.grid_counts, GRID_COUNTS)
        if self.pip_phrasings is not None:
            bad = [p for p in self.pip_phrasings if "{question}" not in p]
            if not self.pip_phrasings or bad:
                raise ValueError("pip_phrasings: each entry must contain '{question}'")
        return self


class ScoreConfig(Section):
    batch_size: int = Field(default=4, ge=1, description="Samples per teacher-forced forward pass.")
    layer: int | Literal["auto"] | None = Field(
        default=None,
        description=(
            "Decoder layer whose attention is read (0-based; null: num_layers // 2, the "
            "paper's; auto: the layer (band) the calibrate stage found to separate best)."
        ),
    )
    thresholds: Literal["paper", "calibrated"] = Field(
        default="paper",
        description=(
            "paper: the tables below (set for LLaVA-1.5-7B at its middle layer); calibrated: "
            "per format and image count from the calibrate stage (calibration.json)."
        ),
    )
    sequence_thresholds: dict[int, float] = Field(
        default={2: 0.8, 3: 0.7, 4: 0.6, 5: 0.6},
        description="Sequence: reject when ratio <= threshold, per image count.",
    )
    grid_thresholds: dict[int, float] = Field(
        default={2: 0.7, 3: 0.6, 4: 0.5, 6: 0.4, 9: 0.3},
        description="Grid: reject when ratio < threshold, per image count.",
    )
    pic_in_pic_threshold: float = Field(
        default=0.8, description="Pic-in-pic: reject when the centre region's share < this."
    )
    pip_border_fraction: float = Field(
        default=1 / 6,
        ge=0.0,
        lt=0.5,
        description="Pic-in-pic: border of the patch grid outside the centre region (24 -> 16x16).",
    )
    min_ppl: float = Field(
        default=1.1, ge=1.0, description="Only responses with perplexity above this are rejected."
    )
    keep_token_attention: bool = Field(
        default=True, description="Store the per-image-token attention values for reports."
    )

    @property
    def needs_calibration(self) -> bool:
        return self.layer == "auto" or self.thresholds == "calibrated"

    @model_validator(mode="after")
    def _check(self) -> ScoreConfig:
        if isinstance(self.layer, int) and self.layer < 0:
            raise ValueError(f"layer: must be >= 0, null or 'auto', got {self.layer}")
        for name, table, allowed in (
            ("sequence_thresholds", self.sequence_thresholds, SEQUENCE_COUNTS),
            ("grid_thresholds", self.grid_thresholds, GRID_COUNTS),
        ):
            missing = [n for n in allowed if n not in table]
            if missing:
                raise ValueError(f"{name}: no threshold for {missing[0]} images")
        return self


class CalibrateConfig(Section):
    """How the calibrate stage measures, per decoder layer, whether the target's attention
    share tells right answers from wrong ones (ROC AUC), and sets thresholds from it."""

    max_answers: int = Field(
        default=800,
        ge=10,
        description="Answers read (a deterministic slice of the generated ones, right and wrong).",
    )
    max_band: int = Field(
        default=1,
        ge=1,
        description="Widest band of adjacent layers whose ratios are averaged (1: single layers).",
    )
    layer_per: Literal["run", "format"] = Field(
        default="run",
        description=(
            "run: one layer (band) for every format, the best pooled AUC (the paper reads "
            "one layer). format: each format (sequence, grid, pic-in-pic) its own best band, "
            "for a model whose formats route through different layers; a format with no "
            "measurable AUC takes the run's band. Only with score.layer auto."
        ),
    )
    quantile: float = Field(
        default=0.5,
        gt=0.0,
        lt=1.0,
        description=(
            "Threshold per format and image count: this quantile of the right answers' ratios "
            "(0.5: a wrong answer is rejected when it looks at its target less than the median "
            "right answer does; on the demo model 0.1 kept only 65 of 480 wrong answers)."
        ),
    )
    auc_floor: float = Field(
        default=0.6,
        ge=0.5,
        le=1.0,
        description="Below this best AUC the report and status say selection is near chance "
        "(with layer_per format: each format's AUC; the summary names the formats below).",
    )
    min_answers_per_cell: int = Field(
        default=8,
        ge=2,
        description="Right and wrong answers a cell needs for its own AUC and threshold.",
    )
    batch_size: int = Field(default=4, ge=1, description="Answers per teacher-forced pass.")


class SelectConfig(Section):
    iqr_multiplier: float = Field(
        default=1.5, gt=0.0, description="Tukey fences: drop outside [Q1 - k*IQR, Q3 + k*IQR]."
    )
    metrics: list[Literal["ppl", "length_ratio", "edit_distance"]] = Field(
        default=["ppl", "length_ratio", "edit_distance"],
        description="Metrics whose outliers are dropped (empty: no post-selection).",
    )
    min_pairs_for_fences: int = Field(
        default=8, ge=1, description="Below this many pairs quartiles mean little: keep them all."
    )
    strategy: Literal["attention", "random", "random_wrong", "ppl_only"] = Field(
        default="attention",
        description=(
            "attention: MIA-DPO. Ablations: random: as many pairs as attention gives, answers "
            "drawn from all generated ones, right or wrong (a right one makes a pair with no "
            "DPO signal); random_wrong: the same, drawn from the scored wrong answers only; "
            "ppl_only: every scored wrong answer with PPL > score.min_ppl, no attention rule, "
            "then the same outlier fences."
        ),
    )
    label_balance: bool = Field(
        default=False,
        description=(
            "Per answer label, add correctly answered samples as SFT-only rows (rejected = "
            "chosen: no DPO signal, only train.sft_weight's term) until the label is chosen "
            "as often as it is rejected, so DPO does not learn the labels' prior."
        ),
    )
