"""`--format llamafactory`: LLaMA-Factory's sharegpt-style preference data.

LLaMA-Factory reads a dataset through an entry in `dataset_info.json` in its dataset
folder: `formatting: sharegpt` with `ranking: true` makes each record a conversation
(`messages`, ending with the user's turn) plus one `chosen` and one `rejected`
assistant message; `images` lists the record's pictures, resolved against the dataset
folder (its `media_dir` defaults to it). The prompt keeps our `<image>` tags where the
pictures go, which is LLaMA-Factory's own image placeholder, so the number of tags in
a record equals its number of images and their order is the prompt's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from mia_dpo.export.common import ImageCopier
from mia_dpo.records import Pair

DATA_FILE = "pairs.llamafactory.jsonl"
INFO_FILE = "dataset_info.json"


def dataset_name(run_id: str) -> str:
    """The entry's key in dataset_info.json, what a training YAML's `dataset:` names.
    Per run, so entries of several exports can sit in one dataset_info.json."""
    return "mia_dpo_" + re.sub(r"[^a-z0-9]+", "_", run_id)


def info_entry() -> dict[str, Any]:
    return {
        "file_name": DATA_FILE,
        "formatting": "sharegpt",
        "ranking": True,
        "columns": {
            "messages": "messages",
            "chosen": "chosen",
            "rejected": "rejected",
            "images": "images",
        },
        "tags": {
            "role_tag": "role",
            "content_tag": "content",
            "user_tag": "user",
            "assistant_tag": "assistant",
        },
    }


def record(pair: Pair, images: list[str]) -> dict[str, Any]:
    return {
        "id": pair.id,
        "messages": [{"role": "user", "content": pair.prompt}],
        "chosen": {"role": "assistant", "content": pair.chosen},
        "rejected": {"role": "assistant", "content": pair.rejected},
        "images": images,
    }


def write(pairs: list[Pair], copier: ImageCopier, folder: Path, run_id: str) -> list[str]:
    lines = [json.dumps(record(p, copier.copy_all(p)), ensure_ascii=False) + "\n" for p in pairs]
    (folder / DATA_FILE).write_text("".join(lines), encoding="utf-8")
    info = {dataset_name(run_id): info_entry()}
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return [DATA_FILE, INFO_FILE]
