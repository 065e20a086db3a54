"""`--format hf`: a `datasets.Dataset` saved with `save_to_disk`, images embedded.

Columns: `images` (a list of `Image()` per row, in prompt order), the TRL messages
(`prompt`, `chosen`, `rejected`, as in the trl export, so `DPOTrainer` takes
`load_from_disk(DIR)` as is) and the selection metadata. The image bytes are copied
into the Arrow file unchanged (no re-encoding), once per row that shows them.
`datasets` is imported here only: the other formats do not need it.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mia_dpo.export.common import IMAGES_DIR, ImageCopier
from mia_dpo.export.trl import trl_record
from mia_dpo.records import Pair

# save_to_disk's own names; the dataset card's `configs` point the hub's loader at them.
ARROW_GLOB = "data-*.arrow"


def features() -> Any:
    from datasets import Features, Image, List, Value

    messages = List({
        "role": Value("string"),
        "content": List({"type": Value("string"), "text": Value("string")}),
    })  # fmt: skip
    return Features({
        "images": List(Image()),
        "prompt": messages,
        "chosen": messages,
        "rejected": messages,
        "id": Value("string"),
        "format": Value("string"),
        "n_images": Value("int32"),
        "target_index": Value("int32"),
        "ratio": Value("float64"),
        "ppl": Value("float64"),
        "length_ratio": Value("float64"),
        "edit_distance": Value("float64"),
        "sft_only": Value("bool"),
    })  # fmt: skip


def _rows(rows: list[dict[str, Any]], folder: str) -> Iterator[dict[str, Any]]:
    for row in rows:
        # Bytes, not paths: the saved dataset must not point back at the scratch files.
        images = [
            {"bytes": (Path(folder) / rel).read_bytes(), "path": Path(rel).name}
            for rel in row["images"]
        ]
        yield {**row, "images": images}


def write(pairs: list[Pair], copier: ImageCopier, folder: Path) -> list[str]:
    import datasets

    rows = [{**trl_record(p, copier.copy_all(p)), "sft_only": p.sft_only} for p in pairs]
    # The generator's Arrow cache goes to a scratch folder, not the user's HF cache;
    # a fresh fingerprint spares datasets hashing every row to name that cache.
    # No progress bars: the CLI's output is its summary line (and, on a failed push,
    # the one error line).
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.cache-") as tmp:
            ds = datasets.Dataset.from_generator(
                _rows, gen_kwargs={"rows": rows, "folder": str(folder)}, features=features(),
                cache_dir=tmp, fingerprint=uuid.uuid4().hex,
            )  # fmt: skip
            ds.save_to_disk(str(folder))
            del ds
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    shutil.rmtree(folder / IMAGES_DIR)  # now inside the Arrow file
    return sorted(p.name for p in folder.glob(ARROW_GLOB))
