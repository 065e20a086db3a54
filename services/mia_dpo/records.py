"""Records that cross a stage boundary or travel through the queue.

Every record is a pydantic model with a schema version, serialised as one JSON
line. Readers refuse a schema version they do not know rather than guessing.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SCHEMA_VERSION = 1

Format = Literal["sequence", "grid", "pic_in_pic"]
FORMATS: tuple[Format, ...] = ("sequence", "grid", "pic_in_pic")

# Stages a queue message may name. Later stages (generate, score, ...) add
# themselves here as they are implemented.
StageName = Literal["augment", "generate", "calibrate", "score", "select", "train", "evaluate"]
STAGE_ORDER: tuple[str, ...] = (
    "augment", "generate", "calibrate", "score", "select", "train", "evaluate",
)  # fmt: skip
# What a run does unless told otherwise; calibrate joins when the score config asks for it.
DEFAULT_STAGES: tuple[str, ...] = tuple(s for s in STAGE_ORDER if s != "calibrate")
# Stages that run one task over the whole run instead of one per shard.
SINGLE_TASK_STAGES: frozenset[str] = frozenset({"calibrate", "select", "train", "evaluate"})
MODEL_STAGES: frozenset[str] = frozenset({"generate", "calibrate", "score", "train", "evaluate"})

_RUN_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def check_run_id(value: str) -> str:
    """Run ids become store prefixes, Redis keys and Kubernetes label values."""
    if not _RUN_ID.match(value):
        raise ValueError(
            f"run id {value!r} must be 1-63 characters of a-z, 0-9 and '-', "
            "starting and ending with a letter or digit"
        )
    return value


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    schema_version: int = Field(default=SCHEMA_VERSION, description="Record schema version.")

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(f"unsupported schema_version {v} (this build reads {SCHEMA_VERSION})")
        return v


class Task(Record):
    """One unit of queued work: a shard of one stage of one run."""

    task_id: str = Field(description="Deterministic id: '{run_id}/{stage}/{shard:05d}'.")
    run_id: str = Field(description="Run this task belongs to.")
    stage: StageName = Field(description="Stage to run.")
    shard: int = Field(ge=0, description="Shard index, 0-based.")

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, v: str) -> str:
        return check_run_id(v)

    @classmethod
    def make(cls, run_id: str, stage: str, shard: int) -> Task:
        return cls(task_id=f"{run_id}/{stage}/{shard:05d}", run_id=run_id, stage=stage, shard=shard)


class Turn(Record):
    """One exchange of a conversation after augmentation."""

    question: str = Field(description="Rewritten question (names the target image).")
    answer: str = Field(description="Ground-truth answer from the source data.")


class AugmentedSample(Record):
    """Output of the augment stage: one multi-image prompt built around a target."""

    sample_id: str = Field(description="'{source_id}-{format}': unique within a run.")
    source_id: str = Field(description="`id` of the source sample.")
    source: str = Field(description="Source subset (coco, gqa, ...); distractors share it.")
    format: Format = Field(description="sequence | grid | pic_in_pic.")
    images: list[str] = Field(
        description="Images the model receives, in order: local paths or s3:// URIs."
    )
    target_index: int = Field(
        ge=1,
        description=(
            "1-based position of the target among the n_images pictures: the Image{k} of "
            "a sequence or grid; 2 (the inset) for pic-in-pic, whose picture 1 is the background."
        ),
    )
    n_images: int = Field(ge=2, description="Pictures shown, the target included.")
    layout: tuple[int, int] | None = Field(
        default=None, description="[rows, cols] of a grid collage, else null."
    )
    target_box: tuple[int, int, int, int] | None = Field(
        default=None,
        description="Pixel box [x0, y0, x1, y1] of the target inside a composed image.",
    )
    prompt: str = Field(description="First question with one <image> tag per entry of images.")
    chosen: str = Field(description="Ground-truth answer of the target's first turn.")
    turns: list[Turn] = Field(
        default_factory=list, description="Later turns, each question rewritten the same way."
    )
    distractor_images: list[str] = Field(
        default_factory=list, description="Source-relative paths of the distractors used."
    )
    target_image: str = Field(description="Source-relative path of the target image.")


class Response(Record):
    """One answer of the policy model to an augmented prompt."""

    text: str = Field(description="Decoded response, special tokens removed.")
    token_ids: list[int] = Field(description="Generated token ids, up to and including EOS.")
    logprobs: list[float] = Field(description="log p of each generated token, as sampled.")
    ppl: float = Field(description="exp(-mean(logprobs)).")


class GeneratedSample(Record):
    """Output of the generate stage: the sample and the model's responses to it."""

    sample: AugmentedSample
    responses: list[Response] = Field(description="num_samples responses, in sampling order.")
    noise: bool = Field(default=False, description="Whether the input images were noised.")


class ScoredResponse(Record):
    """Output of the score stage: one response judged by where its attention went."""

    sample: AugmentedSample
    response_index: int = Field(ge=0, description="Index in GeneratedSample.responses.")
    response: Response
    layer: int = Field(description="Decoder layer read (0-based).")
    ratio: float | None = Field(description="Attention ratio on the target (docs/method.md §3).")
    image_shares: list[float] = Field(
        default_factory=list,
        description="Share of attention per picture (sequence: per image; grid: per tile).",
    )
    token_attention: list[float] = Field(
        default_factory=list, description="Mean attention per image token (for reports)."
    )
    threshold: float | None = Field(default=None, description="Reject threshold applied.")
    decision: Literal["rejected", "dropped"]
    reason: str = Field(description="Why: 'attention' for rejected, else the drop reason.")


class Pair(Record):
    """A DPO preference pair, with the metrics that selected it."""

    id: str = Field(description="'{sample_id}-r{response_index}'.")
    # `image`, as in the reference's released pairs, although it is a list.
    image: list[str] = Field(description="Local paths or s3:// URIs, in prompt order.")
    prompt: str = Field(description="Question with one <image> tag per image.")
    chosen: str = Field(description="Ground truth.")
    rejected: str = Field(description="The model's confused response.")
    format: Format
    n_images: int
    target_index: int
    ratio: float | None = Field(description="Attention ratio; None for an answer not scored.")
    ppl: float
    length_ratio: float = Field(description="len(rejected) / len(chosen), in tokens.")
    edit_distance: float = Field(description="Normalised edit distance chosen vs rejected.")
    sft_only: bool = Field(
        default=False,
        description="A right answer (rejected = chosen): no DPO signal, only the SFT term's. "
        "Written only when true.",
    )


class ShardStats(BaseModel):
    """What one shard of a stage did: counts by outcome and drop reason."""

    model_config = ConfigDict(extra="forbid")
    stage: str
    shard: int
    total: int = 0
    kept: int = 0
    dropped: dict[str, int] = Field(default_factory=dict)
    notes: dict[str, int] = Field(
        default_factory=dict, description="Other counts worth reporting (e.g. bbox_to_sequence)."
    )
    seconds: float = 0.0

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def merge(self, other: ShardStats) -> None:
        self.total += other.total
        self.kept += other.kept
        self.seconds += other.seconds
        for reason, n in other.dropped.items():
            self.dropped[reason] = self.dropped.get(reason, 0) + n
        for note, n in other.notes.items():
            self.notes[note] = self.notes.get(note, 0) + n
