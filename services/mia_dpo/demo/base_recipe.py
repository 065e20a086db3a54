"""The base model's training recipe: its parameters, the examples it trains and is
evaluated on, and what each step trains on.

MIA-DPO needs a policy that answers single images well but is often fooled by the
other images of a sequence: wrong answers to reject, headroom to gain. So: perception
first (single images only), then the image labels (the index task), then the mix;
distractors answer differently from the target, so an answer tells which image was
read.

The defaults (run N of docs/evidence.md), measured on CPU (one thread, seed 0, 1153 s):
single-image accuracy 0.985, two-image sequence accuracy 0.715 (0.325 / 0.335 / 0.300
for 3 / 4 / 5 images), 47 % of the wrong two-image answers being the distractor's
answer, attention AUC (right vs wrong, two images) 0.630 / 0.370 / 0.800 / 0.739 by
layer: the 0.65-0.75 and >= 0.75 issue 12 asked for. What it took, and what did not:
- the previous defaults (no attention supervision, lr 3e-4, 2000 steps, 40 % sequence
  steps): 0.375 two-image accuracy, AUC 0.648 at best; 74 % of errors the distractor's answer,
  but where the answer came from was not where the answer rows' attention went;
- recipe "r2" (patch 32, so 4 tokens per image; lr 1e-3, cosine over 7000 steps stopped
  at 4000; 55 % sequence steps) reached 0.705 two-image accuracy but AUC 0.56 at best,
  and with 4 tokens per image a grid collage cannot be split into its tiles nor
  pic-in-pic into its centre, so the pipeline cannot score it;
- attention supervision (an auxiliary loss putting the answer's attention on the
  target at supervised_layers) at layer 1, 4000 steps: AUC 0.890 at layer 1 but 0.345
  two-image accuracy (the route used, mostly misrouted); at layer 2: 0.785 accuracy,
  AUC 0.52 (routing perfect for right and wrong answers alike); layer 1 for 6000 steps
  with 40 % sequence steps (run M): 0.710 accuracy, AUC 0.648. 60 % sequence steps
  (N) gave both.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import defaultdict
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mia_dpo.prompts import IMAGE_TAG, sequence_prompt, strip_image_tag

# Bump when the same BaseParams would train different weights or measure differently
# (data, sampling or evaluation code changed): a cached model of another recipe retrains.
RECIPE_VERSION = 3  # 3: training pinned to one thread (the weights depend on it)
SEQUENCE_SIZES = (2, 3, 4)  # image counts of multi-image training examples
EVAL_SEQUENCE_SIZES = (2, 3, 4, 5)  # the pipeline's sequences run to 5 images
CELLS = ("single", *(f"seq{n}" for n in EVAL_SEQUENCE_SIZES))

Record = tuple[Path, str, str, str]  # (image, question, answer, sub-source)
Example = tuple[str, str, list[int]]  # (prompt, answer, record indices in prompt order)


class BaseParams(BaseModel):
    """Everything that decides the trained weights and the measured figures."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(default=0, description="Seeds the initial weights, the data and batches.")
    steps: int = Field(
        default=6000,
        ge=1,
        description="Optimizer steps run (~0.19 s each on one thread). May stop part-way "
        "down the schedule: a model right on nearly every sequence leaves MIA-DPO nothing "
        "to reject (recipe r2 at 5500 of 7000 steps: 1.0).",
    )
    schedule_steps: int = Field(
        default=6000,
        ge=1,
        description="Length the warm-up and cosine lr are planned over, separate from steps "
        "so that stopping early does not also shorten the schedule (which changes the model).",
    )
    batch_size: int = Field(default=16, ge=1, description="Images per step (n-image rows: //n).")
    lr: float = Field(default=1e-3, gt=0, description="Peak AdamW lr (previous default: 3e-4).")
    warmup_fraction: float = Field(
        default=0.05, ge=0, lt=1, description="Linear warm-up, as a share of schedule_steps."
    )
    n_train: int = Field(default=4000, ge=12, description="Synthetic training images.")
    single_steps: int = Field(
        default=500,
        ge=0,
        description="Curriculum, first: single-image steps only, so shapes, colours and "
        "counts are perceived before several images compete.",
    )
    index_steps: int = Field(
        default=300,
        ge=0,
        description="Curriculum, then: half single-image steps, half index-task steps "
        "('Which image is the red circle?' -> 'Image2'), which tie each ImageK label to "
        "its image before sequence questions need that.",
    )
    index_fraction: float = Field(
        default=0.2, ge=0, le=1, description="After the curriculum: share of index-task steps."
    )
    multi_fraction: float = Field(
        default=0.6,
        ge=0,
        le=1,
        description="After the curriculum: share of sequence-question steps (2-4 images); "
        "single-image steps take the rest (20% index, 60% sequence, 20% single; previously "
        "40% sequence; r2: 55%). More sequence steps, more supervised steps (run N vs M).",
    )
    distinct: bool = Field(
        default=True,
        description="Distractors of multi-image training examples answer the question "
        "differently from the target, so the answer says which image was read.",
    )
    image_px: int = Field(default=64, ge=32, description="Image side, model and data alike.")
    patch_size: int = Field(
        default=8,
        ge=1,
        description="Vision patch: (image_px // patch_size)**2 tokens per image (64). "
        "Scoring a grid collage splits an image's patch grid into its rows and columns, and "
        "pic-in-pic needs a centre region: recipe r2's patch 32 (4 tokens) cannot do either.",
    )
    text_layers: int = Field(default=4, ge=1, description="Decoder layers (an AUC each).")
    vision_layers: int = Field(default=3, ge=1, description="Vision tower layers.")
    vision_hidden: int = Field(default=96, ge=8, description="Vision tower width.")
    attention_supervision: float = Field(
        default=5.0,
        ge=0,
        description="Weight of an auxiliary loss on sequence-question steps: -log of the "
        "target image's share of the answer rows' image attention at supervised_layers (the "
        "quantity the score stage reads). It asks the base to be confused the way the "
        "paper assumes of LLaVA (a wrong answer showing as attention on the wrong image); "
        "0 turns it off (the previous default). docs/evidence.md has what each weight reached.",
    )
    supervised_layers: tuple[int, ...] = Field(
        default=(1,),
        min_length=1,
        description="Decoder layers (0-based) the auxiliary loss acts on, averaged. Layer 1 "
        "supervised, the answer comes to follow the routing and layer 2's share tells right "
        "from wrong (run N: AUC 0.800); supervising layer 2 itself made the routing perfect "
        "for right and wrong answers alike (run G: AUC 0.52).",
    )
    eval_per_cell: int = Field(default=200, ge=1, description="Evaluation questions per cell.")
    eval_images: int = Field(
        default=900,
        ge=30,
        description="Synthetic evaluation images (another seed); sequences need enough "
        "per sub-source that answer differently from each target.",
    )

    @model_validator(mode="after")
    def _shares_fit(self) -> BaseParams:
        if self.index_fraction + self.multi_fraction > 1:
            raise ValueError("index_fraction + multi_fraction must be <= 1")
        outside = [x for x in self.supervised_layers if not 0 <= x < self.text_layers]
        if outside:
            raise ValueError(
                f"supervised_layers {outside} are not layers of the {self.text_layers} "
                "decoder layers"
            )
        if self.image_px % self.patch_size:
            raise ValueError(f"image_px {self.image_px} is not a multiple of {self.patch_size}")
        return self


def read_records(data_json: Path) -> list[Record]:
    records = []
    for r in json.loads(data_json.read_text(encoding="utf-8")):
        human, gpt = r["conversations"]
        subsource = r["image"].split("/")[0]  # images are stored as {subsource}/{id}.png
        path = data_json.parent / "images" / r["image"]
        records.append((path, strip_image_tag(human["value"]), gpt["value"], subsource))
    return records


def group_by_source(records: list[Record]) -> dict[str, list[int]]:
    by_source: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_source[r[3]].append(i)
    return by_source


def _distinct_images(
    rng: random.Random, records: list[Record], pool: list[int], n: int, k: int
) -> list[int]:
    """n distinct images of `pool`, image k the target, every other one answering its
    question differently from the target (a right answer is never luck)."""
    target = rng.choice(pool)
    answer = records[target][2]
    others: list[int] = []
    # Rejection sampling, the random stream recipe r2 was measured with; the bound only
    # turns a pool without enough other answers into an error instead of a hang.
    for _ in range(1000 * n):
        if len(others) == n - 1:
            break
        j = rng.choice(pool)
        if records[j][2] != answer and j not in others:
            others.append(j)
    if len(others) < n - 1:
        raise ValueError(f"too few images answering other than {answer!r} for {n} images")
    return [*others[: k - 1], target, *others[k - 1 :]]


def _describe(question: str, answer: str, subsource: str) -> str:
    """What singles the target out among distinct-answer images, in the tiny vocabulary."""
    words = question.rstrip("?").split()
    if subsource == "colors":  # "What colour is the circle?" + red -> "the red circle"
        return f"the {answer} {words[-1]}"
    if subsource == "counts":  # "How many circles are there?" + 3 -> "3 circles"
        return f"{answer} {words[2]}"
    return f"the {answer}"  # "Which shape is it?" + square -> "the square"


def sample_example(
    rng: random.Random,
    records: list[Record],
    by_source: dict[str, list[int]],
    n: int,
    distinct: bool = False,
    index_task: bool = False,
) -> Example:
    """One question about one image (n=1) or about image k of n distinct images of
    one sub-source, so the distractors look like the target (the paper's sequence).
    distinct: every distractor answers differently from the target.
    index_task: "Which image is the red circle?" -> "Image{k}", in the sequence layout
    (distractors always distinct, or the description would not single out the target)."""
    if n == 1:
        i = rng.randrange(len(records))
        return f"{IMAGE_TAG}\n{records[i][1]}", records[i][2], [i]
    source = rng.choice(sorted(by_source))
    k = rng.randint(1, n)
    if distinct or index_task:
        idx = _distinct_images(rng, records, by_source[source], n, k)
    else:
        idx = rng.sample(by_source[source], n)
    _, question, answer, subsource = records[idx[k - 1]]
    if index_task:
        header = "".join(f"Image{i}:{IMAGE_TAG}\n" for i in range(1, n + 1))
        return f"{header}Which image is {_describe(question, answer, subsource)}?", f"Image{k}", idx
    return sequence_prompt(n, k, question), answer, idx


def target_position(prompt: str) -> int:
    """k of a sequence question's "In Image{k}, ..."."""
    match = re.search(r"\bIn Image(\d+),", prompt)
    if match is None:
        raise ValueError(f"not a sequence question: {prompt!r}")
    return int(match.group(1))


def step_task(rng: random.Random, step: int, p: BaseParams) -> tuple[int, bool]:
    """(image count, index task?) of 1-based training step `step`: the curriculum.
    One image count per batch: mixed counts would pad single-image rows to four images."""
    if step <= p.single_steps:
        return 1, False
    if step <= p.single_steps + p.index_steps:
        n = rng.choice(SEQUENCE_SIZES) if rng.random() < 0.5 else 1
        return n, n > 1
    u = rng.random()
    n = rng.choice(SEQUENCE_SIZES) if u < p.multi_fraction + p.index_fraction else 1
    return n, u < p.index_fraction


def lr_factor(step: int, p: BaseParams) -> float:
    """Multiplier of the peak lr after `step` optimizer steps: linear warm-up, then a
    cosine over schedule_steps to a tenth of the peak (held there past its end)."""
    warmup = int(p.warmup_fraction * p.schedule_steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, p.schedule_steps - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def eval_sets(records: list[Record], n_per_cell: int, seed: int) -> dict[str, list[Example]]:
    """Questions per cell (CELLS); sequence distractors always answer differently from
    the target, so a right answer is never luck and a wrong one can be traced."""
    by_source = group_by_source(records)
    rng = random.Random(f"mia-dpo-base-eval:{seed}")
    sets = {"single": [sample_example(rng, records, by_source, 1) for _ in range(n_per_cell)]}
    for n in EVAL_SEQUENCE_SIZES:
        sets[f"seq{n}"] = [
            sample_example(rng, records, by_source, n, distinct=True) for _ in range(n_per_cell)
        ]
    return sets
