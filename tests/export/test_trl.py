"""`--format trl`: the select stage's TRL rows with local images, which `datasets`
loads and TRL's DPOTrainer trains on without any code of ours."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from mia_dpo.config import RunConfig
from mia_dpo.export.pairs import export_pairs
from mia_dpo.runtime import layout
from mia_dpo.runtime.store import BlobReader, LocalStore, S3Store, Store
from tests.export.runs import build_run
from tests.export.training import dpo_steps
from tests.runtime.test_store import s3_config


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def check_trl_export(store: Store, blobs: BlobReader, out: Path, run_id: str = "exp") -> None:
    exported = _rows(out / "pairs.trl.jsonl")
    stored = [json.loads(line) for line in store.get_jsonl(layout.trl_pairs_key(run_id))]
    assert len(exported) == len(stored) > 0
    uris = [u for row in stored for u in row["images"]]
    for mine, theirs in zip(exported, stored, strict=True):
        assert {k: v for k, v in mine.items() if k != "images"} == {
            k: v for k, v in theirs.items() if k != "images"
        }
        assert len(mine["images"]) == len(theirs["images"])
        for rel, uri in zip(mine["images"], theirs["images"], strict=True):
            assert not Path(rel).is_absolute() and rel.startswith("images/")
            assert (out / rel).read_bytes() == blobs.read(uri)  # copied, not re-encoded
    # one file per distinct content: fewer files than URIs, as many as contents
    contents = {hashlib.sha256(blobs.read(u)).hexdigest() for u in uris}
    files = sorted((out / "images").iterdir())
    assert len(files) == len(contents) < len(uris)
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["images"] == len(files) and manifest["pairs"] == len(stored)


def test_rows_are_the_select_stages_with_local_images(
    run_store: tuple[LocalStore, RunConfig], tmp_path: Path
) -> None:
    store, cfg = run_store
    blobs = BlobReader(cfg.store)
    m = export_pairs(blobs, store, "exp", tmp_path / "out", "trl")
    check_trl_export(store, blobs, tmp_path / "out")
    pairs = [json.loads(line) for line in store.get_jsonl(layout.pairs_key("exp"))]
    assert m.sft_only == sum(p.get("sft_only", False) for p in pairs) == 1


def test_exports_a_run_whose_images_live_in_s3(s3_bucket: dict[str, str], tmp_path: Path) -> None:
    """The case the export exists for: pairs whose images are s3:// URIs."""
    cfg = s3_config(s3_bucket)
    store = S3Store(cfg)
    build_run(store, "exp")
    stored = [json.loads(line) for line in store.get_jsonl(layout.trl_pairs_key("exp"))]
    assert all(u.startswith("s3://") for row in stored for u in row["images"])
    export_pairs(BlobReader(cfg), store, "exp", tmp_path / "out", "trl")
    check_trl_export(store, BlobReader(cfg), tmp_path / "out")


def test_datasets_loads_it_and_dpo_trainer_trains_on_it(
    run_store: tuple[LocalStore, RunConfig],
    tmp_path: Path,
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from datasets import Image, List, load_dataset

    store, cfg = run_store
    out = tmp_path / "out"
    m = export_pairs(BlobReader(cfg.store), store, "exp", out, "trl")
    monkeypatch.chdir(out)  # the image paths are relative to the folder
    ds = load_dataset(
        "json", data_files="pairs.trl.jsonl", split="train", cache_dir=str(tmp_path / "c")
    )
    assert ds.num_rows == m.pairs
    decoded = ds.cast_column("images", List(Image()))
    for row in decoded:
        assert len(row["images"]) == row["n_images"]
        assert all(img.size == (80, 64) and img.mode == "RGB" for img in row["images"])

    # The dataset exactly as load_dataset returned it: the processor opens the paths.
    dpo_steps(ds, tiny_model_dir, tmp_path / "trained")
