"""`--format hf`: a `datasets` dataset saved to disk, images embedded as `Image()`
features, with a dataset card the hub reads."""

from __future__ import annotations

import io
import json
from pathlib import Path

import yaml
from PIL import Image

from mia_dpo.config import RunConfig
from mia_dpo.export.pairs import export_pairs
from mia_dpo.records import Pair
from mia_dpo.runtime import layout
from mia_dpo.runtime.store import BlobReader, LocalStore
from tests.export.training import dpo_steps


def _card(out: Path) -> tuple[dict, str]:
    text = (out / "README.md").read_text(encoding="utf-8")
    _, header, body = text.split("---\n", 2)
    return yaml.safe_load(header), body


def test_load_from_disk_gives_pil_images_and_the_pairs(
    run_store: tuple[LocalStore, RunConfig], tmp_path: Path
) -> None:
    import datasets

    store, cfg = run_store
    blobs = BlobReader(cfg.store)
    out = tmp_path / "hf"
    m = export_pairs(blobs, store, "exp", out, "hf")
    assert not (out / "images").exists()  # embedded, not beside
    ds = datasets.load_from_disk(str(out))
    assert isinstance(ds, datasets.Dataset)
    assert ds.features["images"] == datasets.List(datasets.Image())
    pairs = [Pair.model_validate_json(line) for line in store.get_jsonl(layout.pairs_key("exp"))]
    trl = [json.loads(line) for line in store.get_jsonl(layout.trl_pairs_key("exp"))]
    assert ds.num_rows == len(pairs) == m.pairs
    for row, pair, trl_row in zip(ds, pairs, trl, strict=True):
        assert row["id"] == pair.id and row["sft_only"] == pair.sft_only
        assert (row["format"], row["target_index"], row["ratio"]) == (
            pair.format, pair.target_index, pair.ratio,
        )  # fmt: skip
        # the same messages TRL gets from the select stage (Arrow fills absent keys)
        for col in ("prompt", "chosen", "rejected"):
            assert [
                {**msg, "content": [{k: v for k, v in part.items() if v is not None}
                                    for part in msg["content"]]}
                for msg in row[col]
            ] == trl_row[col]  # fmt: skip
        assert len(row["images"]) == len(pair.image)
        for img, uri in zip(row["images"], pair.image, strict=True):
            assert isinstance(img, Image.Image)
            want = Image.open(io.BytesIO(blobs.read(uri))).convert("RGB")
            assert img.convert("RGB").tobytes() == want.tobytes()


def test_the_card_and_the_hub_loader(
    run_store: tuple[LocalStore, RunConfig], tmp_path: Path
) -> None:
    import datasets

    store, cfg = run_store
    out = tmp_path / "hf"
    m = export_pairs(BlobReader(cfg.store), store, "exp", out, "hf", license="cc-by-4.0")
    header, body = _card(out)
    assert header["license"] == "cc-by-4.0"
    assert "image-text-to-text" in header["task_categories"]
    assert "dpo" in header["tags"]
    (config,) = header["configs"]
    (files,) = config["data_files"]
    # What the hub does with the card: load the files its `configs` name.
    hub = datasets.load_dataset(
        "arrow", data_files=str(out / files["path"]), split="train", cache_dir=str(tmp_path / "c")
    )
    assert hub.num_rows == m.pairs
    assert isinstance(hub[0]["images"][0], Image.Image)
    assert "run id: `exp`" in body
    for fmt, n in m.per_format.items():
        assert f"| {fmt} | {n} |" in body
    assert f"{m.sft_only} rows have a rejected answer equal" in body


def test_dpo_trainer_takes_it_as_loaded(
    run_store: tuple[LocalStore, RunConfig], tmp_path: Path, tiny_model_dir: Path
) -> None:
    import datasets

    store, cfg = run_store
    export_pairs(BlobReader(cfg.store), store, "exp", tmp_path / "hf", "hf")
    dpo_steps(datasets.load_from_disk(str(tmp_path / "hf")), tiny_model_dir, tmp_path / "t", 1)
