"""LLaMA-Factory's documented dataset schema, written down independently of our export
code, so the tests check our folder against what LLaMA-Factory reads (its data/README:
sharegpt format, preference data with `ranking: true`, multimodal `images` resolved
against the dataset folder, one `<image>` placeholder per image).

LLaMA-Factory itself cannot run in CI: 0.9.x pins datasets<=4.0.0, trl<=0.24 and
peft<=0.18.1 (we use 5.2, 1.16 and 0.21) and needs torchaudio. `llamafactory_check.py`
beside this file runs its real loader on an export by hand (see its docstring).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

PLACEHOLDER = "<image>"  # LLaMA-Factory's IMAGE_PLACEHOLDER default


class Columns(BaseModel):
    model_config = ConfigDict(extra="forbid")
    messages: str
    chosen: str
    rejected: str
    images: str | None = None
    system: str | None = None
    tools: str | None = None


class Tags(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role_tag: str = "from"
    content_tag: str = "value"
    user_tag: str = "human"
    assistant_tag: str = "gpt"
    observation_tag: str = "observation"
    function_tag: str = "function_call"
    system_tag: str = "system"


class Entry(BaseModel):
    """One dataset of dataset_info.json, as a local-file preference dataset."""

    model_config = ConfigDict(extra="forbid")
    file_name: str
    formatting: Literal["sharegpt"]
    ranking: Literal[True]
    columns: Columns
    tags: Tags = Tags()
    split: str = "train"


def check_folder(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """Every entry of folder/dataset_info.json and every record of its file; returns the
    records per dataset name. Raises AssertionError naming the first problem."""
    info = json.loads((folder / "dataset_info.json").read_text(encoding="utf-8"))
    assert isinstance(info, dict) and info, "dataset_info.json: expected a non-empty object"
    out = {}
    for name, raw in info.items():
        try:
            entry = Entry.model_validate(raw)
        except ValidationError as e:
            raise AssertionError(f"dataset_info.json {name}: {e}") from None
        path = folder / entry.file_name
        assert path.suffix in (".json", ".jsonl"), f"{name}: {path.name}: not a json file"
        text = path.read_text(encoding="utf-8")
        rows = json.loads(text) if path.suffix == ".json" else [
            json.loads(line) for line in text.splitlines() if line.strip()
        ]  # fmt: skip
        for n, row in enumerate(rows, 1):
            check_record(row, entry, folder, f"{name} record {n}")
        out[name] = rows
    return out


def check_record(row: dict[str, Any], entry: Entry, folder: Path, where: str) -> None:
    c, t = entry.columns, entry.tags
    messages = row.get(c.messages)
    assert isinstance(messages, list) and messages, f"{where}: {c.messages}: expected turns"
    # user, assistant, user, ...: a ranking example ends on the user's turn (odd count)
    for i, m in enumerate(messages):
        want = t.user_tag if i % 2 == 0 else t.assistant_tag
        assert m.get(t.role_tag) == want, f"{where}: turn {i}: role {m.get(t.role_tag)!r}"
        assert isinstance(m.get(t.content_tag), str), f"{where}: turn {i}: content not text"
    assert len(messages) % 2 == 1, f"{where}: {len(messages)} turns, must end with the user's"
    for col in (c.chosen, c.rejected):
        answer = row.get(col)
        assert isinstance(answer, dict), f"{where}: {col}: expected one message object"
        assert answer.get(t.role_tag) == t.assistant_tag, f"{where}: {col}: not the assistant's"
        assert isinstance(answer.get(t.content_tag), str), f"{where}: {col}: content not text"
    images = row.get(c.images) if c.images else []
    assert isinstance(images, list), f"{where}: {c.images}: expected a list"
    for img in images:
        assert isinstance(img, str) and not Path(img).is_absolute(), f"{where}: {img!r}"
        assert (folder / img).is_file(), f"{where}: {img}: no such file under the folder"
    tags = sum(str(m[t.content_tag]).count(PLACEHOLDER) for m in messages)
    assert tags == len(images), f"{where}: {tags} {PLACEHOLDER} tags for {len(images)} images"
