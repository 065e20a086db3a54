"""`--format trl`: TRL's vision preference layout, one JSON object per line.

Each row is the row the select stage wrote to `pairs.trl.jsonl` (and our train stage
trains on): conversational `prompt` / `chosen` / `rejected` messages whose prompt has
one `{"type": "image"}` part per picture, in order, plus the selection metadata. Only
`images` changes: paths relative to the export folder instead of store URIs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mia_dpo.export.common import ImageCopier
from mia_dpo.models.prompting import answer_messages, prompt_messages
from mia_dpo.records import Pair

DATA_FILE = "pairs.trl.jsonl"

# The select stage's metadata columns, in its order (stages.select.TRL_METADATA; the
# export may not import a stage, and tests/export compare the two files row by row).
METADATA = (
    "id", "format", "n_images", "target_index", "ratio", "ppl", "length_ratio", "edit_distance",
)  # fmt: skip


def trl_record(pair: Pair, images: list[str]) -> dict[str, Any]:
    return {
        "images": images,
        "prompt": prompt_messages(pair.prompt),
        "chosen": answer_messages(pair.chosen),
        "rejected": answer_messages(pair.rejected),
        **pair.model_dump(include=set(METADATA)),
    }


def write(pairs: list[Pair], copier: ImageCopier, folder: Path) -> list[str]:
    lines = [
        json.dumps(trl_record(p, copier.copy_all(p)), ensure_ascii=False) + "\n" for p in pairs
    ]
    (folder / DATA_FILE).write_text("".join(lines), encoding="utf-8")
    return [DATA_FILE]
