"""`--format llamafactory`: the pairs and a dataset_info.json entry in LLaMA-Factory's
documented sharegpt preference schema (tests/export/llamafactory_schema.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mia_dpo.config import RunConfig
from mia_dpo.export.pairs import export_pairs
from mia_dpo.records import Pair
from mia_dpo.runtime import layout
from mia_dpo.runtime.store import BlobReader, LocalStore
from tests.export.llamafactory_schema import check_folder


def test_folder_matches_llamafactorys_schema(
    run_store: tuple[LocalStore, RunConfig], tmp_path: Path
) -> None:
    from datasets import load_dataset

    store, cfg = run_store
    blobs = BlobReader(cfg.store)
    out = tmp_path / "lf"
    m = export_pairs(blobs, store, "exp", out, "llamafactory")
    records = check_folder(out)
    assert list(records) == ["mia_dpo_exp"]
    rows = records["mia_dpo_exp"]
    pairs = [Pair.model_validate_json(line) for line in store.get_jsonl(layout.pairs_key("exp"))]
    assert len(rows) == len(pairs) == m.pairs
    for row, pair in zip(rows, pairs, strict=True):
        assert row["messages"][0]["content"] == pair.prompt  # the tags where the images go
        assert (row["chosen"]["content"], row["rejected"]["content"]) == (
            pair.chosen, pair.rejected,
        )  # fmt: skip
        assert [(out / p).read_bytes() for p in row["images"]] == [
            blobs.read(u) for u in pair.image
        ]
    # LLaMA-Factory reads a local file with datasets' json builder: one consistent schema.
    info = json.loads((out / "dataset_info.json").read_text())["mia_dpo_exp"]
    data = str(out / info["file_name"])
    ds = load_dataset("json", data_files=data, split="train", cache_dir=str(tmp_path / "c"))
    assert ds.num_rows == len(rows)
    assert set(info["columns"].values()) <= set(ds.column_names)


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda r: r.update(images=r["images"][:-1]), "tags for"),
        (lambda r: r["chosen"].update(role="user"), "not the assistant's"),
        (lambda r: r["messages"].append({"role": "assistant", "content": "x"}), "turns"),
        (lambda r: r.update(images=["images/missing.png"] * len(r["images"])), "no such file"),
    ],
)
def test_the_schema_check_catches_what_llamafactory_refuses(
    run_store: tuple[LocalStore, RunConfig], tmp_path: Path, edit, problem: str
) -> None:
    """The checker itself: each mistake LLaMA-Factory would skip or reject fails it."""
    store, cfg = run_store
    out = tmp_path / "lf"
    export_pairs(BlobReader(cfg.store), store, "exp", out, "llamafactory")
    path = out / "pairs.llamafactory.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    edit(rows[1])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(AssertionError, match=problem):
        check_folder(out)
