"""Method sections: what each stage computes, and from what.

The paper's constants (docs/method.md §1) are the defaults here and nowhere else.

`input` and `model` sit here, not with the connections: a run's outputs depend on
them (which samples are used and which are held out; which weights answer and are
scored), so `RunConfig.stage_params()` pins them together with the stage sections
and a resumed run may not change them. The connection sections only say where
data and tasks live and how workers start; no output depends on them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

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


# owner/name as the hub spells repository ids (no leading or doubled separators).
HUB_ID = re.compile(r"[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?/[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?")
REPORT_TO = ("none", "tensorboard", "wandb", "mlflow")

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


class ModelConfig(Section):
    path: str = Field(
        default="",
        description=(
            "Hugging Face image-text-to-text model: a local directory (save_pretrained layout) "
            "or a hub id such as llava-hf/llava-1.5-7b-hf (needs network unless cached)."
        ),
    )
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit).")
    hub_id: str | None = Field(
        default=None,
        description=(
            "The Hugging Face hub id of the base model (owner/name), for the model card and "
            "adapter_config.json; null: model.path when that looks like owner/name and is not "
            "an existing local path, else unknown (the card says the base is a local model)."
        ),
    )
    license: str | None = Field(
        default=None,
        description=(
            "License id of the base model (hub spelling, e.g. llama2, apache-2.0) for the "
            "adapter's card; null: other (the card says the base model's terms apply)."
        ),
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto", description="Weights dtype; auto: bfloat16 on CUDA, float32 on CPU."
    )
    device: str = Field(default="auto", description="auto (cuda if available), cpu, cuda, cuda:N.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        default="sdpa",
        description="Attention kernel; scoring captures its one layer with any of them.",
    )
    chat_template: Literal["auto", "checkpoint", "interleaved"] = Field(
        default="auto",
        description=(
            "checkpoint: the model's own chat template (refused if it moves images away from "
            "their Image{k} labels); interleaved: our LLaVA-1.5 style USER:/ASSISTANT: template "
            "that keeps text and images in prompt order; auto: checkpoint if it keeps the "
            "order, else interleaved."
        ),
    )
    pad_to_square: bool = Field(
        default=True,
        description=(
            "Pad each image to a square with the image processor's mean colour before its own "
            "resize and crop, as LLaVA-1.5 does (image_aspect_ratio 'pad'); without it a centre "
            "crop cuts off the outer tiles of a wide collage."
        ),
    )
    allow_pickle: bool = Field(
        default=False,
        description="Allow .bin/.pt (pickle) weights; off: safetensors only, pickle can run code.",
    )
    trust_remote_code: bool = Field(
        default=False, description="Run model code shipped with the checkpoint (off: refuse)."
    )

    @field_validator("hub_id")
    @classmethod
    def _hub_id(cls, value: str | None) -> str | None:
        if value is not None and not HUB_ID.fullmatch(value):
            raise ValueError(f"not a hub id of the form owner/name: {value!r}")
        return value

    def base_model_id(self) -> str | None:
        """The base model's hub id: hub_id, else a path that reads as owner/name and is
        no folder here (a pod-local copy of the weights has no public name)."""
        if self.hub_id:
            return self.hub_id
        if HUB_ID.fullmatch(self.path) and not Path(self.path).exists():
            return self.path
        return None


class GenerateConfig(Section):
    batch_size: int = Field(default=8, ge=1, description="Prompts per generate() call.")
    max_new_tokens: int = Field(
        default=512, ge=1, description="Longest response, in tokens (reference: 512)."
    )
    num_samples: int = Field(
        default=1, ge=1, description="Responses per prompt (reference: 1, greedy)."
    )
    temperature: float = Field(
        default=0.0, ge=0.0, description="0: greedy decoding (reference); > 0: sampling."
    )
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling when sampling.")
    max_chosen_chars: int = Field(
        default=512,
        ge=1,
        description="Samples whose ground truth is this long or longer are skipped.",
    )
    noise: bool = Field(
        default=False,
        description=(
            "Add Gaussian noise to the generation input (reference code, not the paper): "
            "grid: target tile only; pic-in-pic: whole image; sequence: none."
        ),
    )
    noise_sigma_grid: float = Field(
        default=225.0, ge=0, description="Noise std for grids (0-255 scale)."
    )
    noise_sigma_pip: float = Field(
        default=49.0, ge=0, description="Noise std for pic-in-pic (0-255)."
    )


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
        description="Below this best AUC the report and status say selection is near chance.",
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


class TrainConfig(Section):
    method: Literal["dpo", "sft"] = Field(
        default="dpo", description="dpo: MIA-DPO; sft: SFT on the chosen answers (a baseline)."
    )
    beta: float = Field(default=0.1, gt=0.0, description="DPO beta (docs/method.md §5).")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field(
        default="sigmoid", description="DPO loss (TRL loss_type); sigmoid is standard DPO."
    )
    sft_weight: float = Field(
        default=0.0, ge=0.0, description="Weight of an added SFT loss on chosen (0: none)."
    )
    lora_r: int = Field(default=128, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(default=256, ge=1, description="LoRA alpha.")
    lora_dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="LoRA dropout.")
    learning_rate: float = Field(default=5e-5, gt=0.0, description="Peak learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field(
        default="linear", description="Learning-rate schedule after warm-up."
    )
    warmup_ratio: float = Field(default=0.1, ge=0.0, lt=1.0, description="Warm-up fraction.")
    weight_decay: float = Field(default=0.0, ge=0.0, description="AdamW weight decay.")
    epochs: float = Field(default=1.0, gt=0.0, description="Passes over the pairs.")
    batch_size: int = Field(default=1, ge=1, description="Pairs per device per step.")
    gradient_accumulation_steps: int = Field(
        default=8, ge=1, description="Steps accumulated per optimizer step (reference: 8 x 8 GPUs)."
    )
    max_length: int = Field(
        default=4096, ge=16, description="Longest prompt + answer in tokens (never cut images)."
    )
    bf16: Literal["auto", "on", "off"] = Field(
        default="auto", description="bf16 mixed precision; auto: on when CUDA supports it."
    )
    gradient_checkpointing: Literal["auto", "on", "off"] = Field(
        default="auto", description="Recompute activations to save memory; auto: on with CUDA."
    )
    save_steps: int = Field(
        default=50, ge=1, description="Checkpoint to the store every N optimizer steps."
    )
    logging_steps: int = Field(default=5, ge=1, description="Log the loss every N steps.")
    merge_adapter: bool = Field(
        default=False, description="Also save the base model with the adapter merged in."
    )
    report_to: list[str] = Field(
        default=["none"],
        description=(
            "Experiment tracking, passed to TRL (TrainingArguments.report_to): none, "
            "tensorboard (event files stored under runs/ID/train/tensorboard/), wandb or "
            "mlflow (configured by their own environment variables); one name or a list."
        ),
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to(cls, value: Any) -> Any:
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"must be one of {list(REPORT_TO)} or a list of them")
        bad = [n for n in names if n not in REPORT_TO]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a tracker (allowed: {list(REPORT_TO)})")
        if "none" in names and len(names) > 1:
            raise ValueError("'none' cannot be combined with a tracker")
        return names or ["none"]

    @property
    def trackers(self) -> list[str]:
        """The trackers to report to ([] for none)."""
        return [n for n in self.report_to if n != "none"]


class EvaluateConfig(Section):
    batch_size: int = Field(default=16, ge=1, description="Questions per generate() call.")
    max_new_tokens: int = Field(default=16, ge=1, description="Answers are short: tokens.")
    formats: list[Literal["sequence", "grid", "pic_in_pic"]] = Field(
        default=["sequence", "grid", "pic_in_pic"],
        description="Multi-image formats built from every held-out sample.",
    )
    single_image: bool = Field(
        default=True, description="Also ask each held-out question about its image alone."
    )
    compare_base: bool = Field(
        default=True, description="Evaluate the base model too, on identical inputs."
    )
