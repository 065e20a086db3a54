"""Run configuration: one YAML file, pydantic models, environment overrides.

The paper's constants (method.md section 1) are the defaults here and nowhere
else. Connection settings may come from the environment; credentials may ONLY
come from the environment (or a Kubernetes Secret mounted as environment), so a
config file or a stored copy of it never holds one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from mia_dpo.errors import UserError
from mia_dpo.records import STAGE_ORDER

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class Section(BaseModel):
    # Unknown keys are typos until proven otherwise: refuse them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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


class StoreConfig(Section):
    backend: Literal["local", "s3"] = Field(
        default="local", description="local directory or S3/MinIO bucket."
    )
    root: str = Field(default="./mia-dpo-data", description="Local backend: root directory.")
    endpoint: str = Field(
        default="localhost:9000",
        description="S3 backend: host:port of the S3/MinIO endpoint (env MIA_DPO_S3_ENDPOINT).",
    )
    bucket: str = Field(
        default="mia-dpo", description="S3 backend: bucket (env MIA_DPO_S3_BUCKET)."
    )
    prefix: str = Field(default="", description="S3 backend: key prefix inside the bucket.")
    secure: bool = Field(default=False, description="S3 backend: use TLS (env MIA_DPO_S3_SECURE).")
    region: str | None = Field(
        default=None, description="S3 backend: region (env MIA_DPO_S3_REGION)."
    )
    create_bucket: bool = Field(
        default=True, description="S3 backend: create the bucket if missing."
    )
    retry_seconds: float = Field(
        default=120.0,
        gt=0,
        description="Keep retrying transient S3 errors (connection refused, 5xx) this long (s).",
    )
    # Credentials: environment only (MIA_DPO_S3_ACCESS_KEY / MIA_DPO_S3_SECRET_KEY).
    access_key: SecretStr | None = Field(default=None, exclude=True, repr=False)
    secret_key: SecretStr | None = Field(default=None, exclude=True, repr=False)

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, v: str) -> str:
        # S3's naming rules, checked here so a typo is one line, not a client traceback.
        if not _BUCKET.fullmatch(v) or ".." in v:
            raise ValueError(
                f"{v!r} is not an S3 bucket name (3-63 characters: lowercase letters, "
                "digits, '.' and '-', starting and ending with a letter or digit)"
            )
        return v


class QueueConfig(Section):
    backend: Literal["memory", "redis"] = Field(
        default="memory",
        description="memory: in-process, one controller process; redis: shared by processes.",
    )
    url: str = Field(
        default="redis://localhost:6379/0",
        description="Redis URL without a password (env MIA_DPO_REDIS_URL).",
    )
    namespace: str = Field(default="mia-dpo", description="Prefix of every Redis key.")
    lease_seconds: float = Field(
        default=60.0,
        gt=0,
        description="A claimed task not renewed for this long is reclaimed by another worker (s).",
    )
    max_attempts: int = Field(
        default=3, ge=1, description="Deliveries of a task before it is dead-lettered."
    )
    poll_seconds: float = Field(
        default=0.5, gt=0, description="Longest wait between claim attempts on an idle queue (s)."
    )
    password: SecretStr | None = Field(default=None, exclude=True, repr=False)

    @model_validator(mode="after")
    def _no_password_in_url(self) -> QueueConfig:
        if urlsplit(self.url).password:
            raise ValueError(
                "url must not carry credentials; set MIA_DPO_REDIS_PASSWORD (or MIA_DPO_REDIS_URL)"
            )
        return self


class KubernetesLauncherConfig(Section):
    namespace: str | None = Field(
        default=None,
        description=(
            "Namespace of the stage Jobs; null: the controller pod's own namespace "
            "(its service-account token folder), else 'default'."
        ),
    )
    job_templates: str = Field(
        default="/etc/mia-dpo/jobs",
        description=(
            "Folder holding one batch/v1 Job manifest per stage, `<stage>.yaml` (the Helm "
            "chart mounts them from its ConfigMap)."
        ),
    )
    cleanup: Literal["on_success", "always", "never"] = Field(
        default="on_success",
        description=(
            "Delete a stage's Job (and its pods) when the stage ends: only if it succeeded "
            "(failed ones stay for `kubectl logs`), always, or never."
        ),
    )
    poll_seconds: float = Field(
        default=2.0, gt=0, description="Seconds between reads of a stage Job's status."
    )
    drain_seconds: float = Field(
        default=300.0,
        gt=0,
        description="After a stage closes, how long to wait for its Job to finish (s).",
    )
    api_retry_seconds: float = Field(
        default=120.0,
        gt=0,
        description="Keep polling through API server outages (5xx, refused) this long (s).",
    )


class LauncherConfig(Section):
    kind: Literal["inline", "local", "external", "kubernetes"] = Field(
        default="inline",
        description=(
            "inline: worker threads inside the controller (embedded default); local: worker "
            "subprocesses; external: workers started by someone else (Compose); kubernetes: "
            "one Job per stage, created from a template by the controller."
        ),
    )
    kubernetes: KubernetesLauncherConfig = Field(
        default_factory=KubernetesLauncherConfig,
        description="kubernetes launcher: where the stage Job templates are and what to clean.",
    )
    workers: dict[str, int] = Field(
        default_factory=dict, description="Workers per stage, e.g. {augment: 4}; default 1."
    )
    default_workers: int = Field(
        default=1, ge=1, le=1024, description="Workers for unlisted stages."
    )
    max_restarts: int = Field(
        default=10, ge=0, description="local: restarts of crashed worker processes per stage."
    )
    failure_budget: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Fraction of a stage's shards that may be dead-lettered and the run go on.",
    )

    def workers_for(self, stage: str) -> int:
        return self.workers.get(stage, self.default_workers)

    @model_validator(mode="after")
    def _known_stages(self) -> LauncherConfig:
        for stage, n in self.workers.items():
            if stage not in STAGE_ORDER:
                raise ValueError(
                    f"workers: unknown stage {stage!r} (known: {', '.join(STAGE_ORDER)})"
                )
            if n < 1:
                raise ValueError(f"workers.{stage}: must be >= 1, got {n}")
        return self


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


class ModelConfig(Section):
    path: str = Field(
        default="",
        description=(
            "Hugging Face image-text-to-text model: a local directory (save_pretrained layout) "
            "or a hub id such as llava-hf/llava-1.5-7b-hf (needs network unless cached)."
        ),
    )
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit).")
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
    layer: int | None = Field(
        default=None,
        ge=0,
        description="Decoder layer whose attention is read (0-based; null: num_layers // 2).",
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

    @model_validator(mode="after")
    def _check(self) -> ScoreConfig:
        for name, table, allowed in (
            ("sequence_thresholds", self.sequence_thresholds, SEQUENCE_COUNTS),
            ("grid_thresholds", self.grid_thresholds, GRID_COUNTS),
        ):
            missing = [n for n in allowed if n not in table]
            if missing:
                raise ValueError(f"{name}: no threshold for {missing[0]} images")
        return self


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
    strategy: Literal["attention", "random"] = Field(
        default="attention",
        description=(
            "attention: MIA-DPO; random: an ablation that rejects randomly chosen responses "
            "(not equal to the ground truth), as many as attention selection would give."
        ),
    )


class TrainConfig(Section):
    method: Literal["dpo", "sft"] = Field(
        default="dpo", description="dpo: MIA-DPO; sft: SFT on the chosen answers (a baseline)."
    )
    beta: float = Field(default=0.1, gt=0.0, description="DPO beta (method.md 5).")
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


class RunConfig(Section):
    """Everything one run needs. Stored (without credentials) under runs/{run_id}/."""

    run_id: str | None = Field(default=None, description="Run id (null: generated, or --run-id).")
    seed: int = Field(
        default=0, ge=0, description="Run seed; each sample is seeded from (seed, id)."
    )
    stages: list[Literal["augment", "generate", "score", "select", "train", "evaluate"]] = Field(
        default=list(STAGE_ORDER), description="Stages to run, in pipeline order."
    )
    input: InputConfig = Field(default_factory=InputConfig, description="Source data to augment.")
    store: StoreConfig = Field(
        default_factory=StoreConfig, description="Where runs keep shards, images and markers."
    )
    queue: QueueConfig = Field(
        default_factory=QueueConfig, description="Task queue of the workers."
    )
    launcher: LauncherConfig = Field(
        default_factory=LauncherConfig, description="How and how many workers are started."
    )
    augment: AugmentConfig = Field(
        default_factory=AugmentConfig, description="Multi-image augmentation (method.md 1)."
    )
    model: ModelConfig = Field(
        default_factory=ModelConfig, description="The policy model that answers and is scored."
    )
    generate: GenerateConfig = Field(
        default_factory=GenerateConfig, description="Generation (method.md 2)."
    )
    score: ScoreConfig = Field(
        default_factory=ScoreConfig, description="Attention-aware selection (method.md 3)."
    )
    select: SelectConfig = Field(
        default_factory=SelectConfig, description="Post-selection over all pairs (method.md 4)."
    )
    train: TrainConfig = Field(
        default_factory=TrainConfig, description="DPO with LoRA (method.md 5)."
    )
    evaluate: EvaluateConfig = Field(
        default_factory=EvaluateConfig, description="Multi-image evaluation, before / after."
    )

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.queue.backend == "memory" and self.launcher.kind != "inline":
            raise ValueError(
                f"launcher.kind {self.launcher.kind!r} needs queue.backend 'redis' "
                "(an in-process queue is visible only to inline workers)"
            )
        order = [s for s in STAGE_ORDER if s in self.stages]
        if order != list(self.stages):
            raise ValueError(f"stages: must follow pipeline order {list(STAGE_ORDER)}")
        return self

    def stage_params(self) -> dict[str, Any]:
        """The part of the config that decides outputs: a resumed run must not change it."""
        # Batch sizes and the device are how, not what: a run resumed on other
        # hardware may change them (greedy outputs do not depend on them).
        return self.model_dump(
            mode="json",
            include={
                "seed",
                "input",
                "augment",
                "model",
                "generate",
                "score",
                "select",
                "train",
                "evaluate",
            },
            exclude={
                "generate": {"batch_size"},
                "score": {"batch_size"},
                "model": {"device"},
                "evaluate": {"batch_size"},
            },
        )


# Environment variable -> (section, field). Applied after the file, so the
# environment always wins; credentials have no file field to lose to.
ENV_OVERRIDES: dict[str, tuple[str, str]] = {
    "MIA_DPO_REDIS_URL": ("queue", "url"),
    "MIA_DPO_REDIS_PASSWORD": ("queue", "password"),
    "MIA_DPO_S3_ENDPOINT": ("store", "endpoint"),
    "MIA_DPO_S3_BUCKET": ("store", "bucket"),
    "MIA_DPO_S3_PREFIX": ("store", "prefix"),
    "MIA_DPO_S3_SECURE": ("store", "secure"),
    "MIA_DPO_S3_REGION": ("store", "region"),
    "MIA_DPO_S3_ACCESS_KEY": ("store", "access_key"),
    "MIA_DPO_S3_SECRET_KEY": ("store", "secret_key"),
}
SECRET_FIELDS = {("queue", "password"), ("store", "access_key"), ("store", "secret_key")}


def _redis_url_from_env(raw: str, section: dict[str, Any]) -> None:
    """A Redis URL from the environment may carry a password: split it out (the
    user name, an ACL user, stays in the URL)."""
    parts = urlsplit(raw)
    if parts.password:
        section["password"] = unquote(parts.password)
        host = parts.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        if parts.port:
            netloc += f":{parts.port}"
        if parts.username:
            netloc = f"{parts.username}@{netloc}"
        raw = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    section["url"] = raw


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line: `source: field.path: message` for every problem."""
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        # A section-level check names its field first ("grid_counts: ..."): fold it
        # into the dotted path so every message reads `section.field: problem`.
        m = re.match(r"^([a-z_]+): (.*)$", msg, flags=re.S)
        if m and e["loc"]:
            loc, msg = f"{loc}.{m.group(1)}", m.group(2)
        problems.append(f"{loc}: {msg}")
    return f"{source}: " + "; ".join(problems)


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> RunConfig:
    """Read the YAML file (or defaults), apply overrides then the environment, validate."""
    environ = dict(os.environ if environ is None else environ)
    source = str(path) if path else "config"
    raw: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"{p}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{p}: not valid YAML: {first}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError(f"{p}: top level must be a mapping, got {type(loaded).__name__}")
        raw = loaded
        for section, field in SECRET_FIELDS:
            if isinstance(raw.get(section), dict) and field in raw[section]:
                raise UserError(
                    f"{p}: {section}.{field}: credentials are read only from the environment "
                    f"({_env_name(section, field)}), never from a config file"
                )
    for dotted, value in (overrides or {}).items():
        target = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            target = target.setdefault(key, {})
        target[leaf] = value
    for var, (section, field) in ENV_OVERRIDES.items():
        if environ.get(var) not in (None, ""):
            sec = raw.setdefault(section, {})
            if not isinstance(sec, dict):
                continue  # the validator reports the malformed section
            if var == "MIA_DPO_REDIS_URL":
                _redis_url_from_env(environ[var], sec)
            else:
                sec[field] = environ[var]
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise UserError(format_validation_error(e, source)) from None


def _env_name(section: str, field: str) -> str:
    return next(k for k, v in ENV_OVERRIDES.items() if v == (section, field))
