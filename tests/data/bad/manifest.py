"""What the bad-input corpus promises: the expected outcome of every index record, bad
index file and bad config (`manifest.json`), and the limits the good configs lower so
that some real images fall foul of them."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Literal

KEPT = "kept"
# Lowered limits in augment.yaml: big.jpg (1100x1000) is over max_image_pixels.
MAX_IMAGE_PIXELS = 1_000_000
MIN_SIDE = 8
PROMPT_CHARS = 1_000_000
GOOD_INPUT = "data.jsonl"  # what run.yaml augments


@dataclass(frozen=True)
class Case:
    """One record of an index. `id` is how outputs name it: the sample id, or `line-N`
    when the record has no usable id; `expect` is `kept` or the drop reason; `detail`
    a fragment of the recorded drop detail; `where` the place the drop is recorded
    (`augment`: the stage's shard-*.dropped.jsonl, `plan`: plan/problems.jsonl)."""

    id: str
    line: int
    case: str
    expect: str
    detail: str | None = None
    where: Literal["augment", "plan"] = "augment"


@dataclass
class Manifest:
    image_root: str = "images"
    good_config: str = "augment.yaml"
    run_config: str = "run.yaml"
    run_input: str = GOOD_INPUT
    indexes: dict[str, list[Case]] = field(default_factory=dict)
    bad_indexes: dict[str, str] = field(default_factory=dict)  # file -> error fragment
    bad_configs: dict[str, str] = field(default_factory=dict)  # file -> error fragment
    cases: dict[str, str] = field(default_factory=dict)  # file -> what is wrong with it

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        raw["indexes"] = {k: [Case(**c) for c in v] for k, v in raw["indexes"].items()}
        return cls(**raw)
