"""The dataset card (README.md) of an export: the YAML header the Hugging Face hub reads
(license, task tags, which files hold the rows), then what the columns mean, the
counts per format and where the pairs came from."""

from __future__ import annotations

from typing import Any

import yaml

from mia_dpo.export.common import ExportManifest

TASK_CATEGORIES = ["image-text-to-text", "visual-question-answering"]
TAGS = ["dpo", "preference", "multi-image", "mia-dpo"]

_LOADING = {
    "trl": """```python
from datasets import Image, List, load_dataset

# Image paths are relative to this folder: run from it (or prefix them in a map).
ds = load_dataset("json", data_files="{data}", split="train")
ds = ds.cast_column("images", List(Image()))
# DPOTrainer(model=..., train_dataset=ds, processing_class=processor, ...)
```""",
    "llamafactory": """In a LLaMA-Factory training YAML:

```yaml
dataset_dir: path/to/this/folder   # holds dataset_info.json; images resolve against it
dataset: {name}
stage: dpo
```""",
    "hf": """```python
from datasets import load_from_disk

ds = load_from_disk("path/to/this/folder")   # images decode to PIL
# DPOTrainer(model=..., train_dataset=ds, processing_class=processor, ...)
```""",
}

_COLUMNS = {
    "trl": (
        "- `images`: the pictures of the prompt, in order (paths relative to this folder).\n"
        "- `prompt`: the user turn as chat content parts, one `image` part per picture.\n"
        "- `chosen`, `rejected`: one assistant turn each; `chosen` is the ground truth, "
        "`rejected` the model's answer that attended to the wrong image.\n"
    ),
    "llamafactory": (
        "- `messages`: the user turn; its `<image>` tags mark where each picture goes.\n"
        "- `chosen`, `rejected`: one assistant message each (ground truth / confused answer).\n"
        "- `images`: the pictures, in tag order, relative to this folder.\n"
        "- `id`: the pair's id in the run.\n"
    ),
}
_COLUMNS["hf"] = _COLUMNS["trl"].replace(
    "(paths relative to this folder)", "(`Image()` features, decoded to PIL)"
)
_METADATA = (
    "- `id`, `format` (sequence, grid, pic_in_pic), `n_images`, `target_index` (the image "
    "the question is about, 1-based): the augmented sample.\n"
    "- `ratio` (the attention ratio on the target image; empty for SFT-only rows), `ppl`, "
    "`length_ratio`, `edit_distance`: "
    "the metrics that selected the pair.\n"
)


def size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")):
        if n < limit:
            return name
    return "100K<n<1M" if n < 1_000_000 else "n>1M"


def render(m: ExportManifest, *, license: str, data_glob: str, name: str = "",
           source: dict[str, Any] | None = None) -> str:  # fmt: skip
    """`data_glob`: the files of the rows, for the hub's `configs`; `source`: facts of
    the run (base model, selection strategy) when its config could be read."""
    header = {
        "license": license,
        "task_categories": TASK_CATEGORIES,
        "tags": TAGS,
        "size_categories": [size_category(m.pairs)],
        "pretty_name": f"MIA-DPO preference pairs ({m.run_id})",
        "configs": [
            {"config_name": "default", "data_files": [{"split": "train", "path": data_glob}]}
        ],
    }
    counts = "\n".join(f"| {fmt} | {n} |" for fmt, n in m.per_format.items())
    facts = "".join(f"- {k}: `{v}`\n" for k, v in (source or {}).items() if v is not None)
    metadata = _METADATA if m.format in ("trl", "hf") else ""
    sft = "`sft_only` marks them; " if m.format == "hf" else ""
    return (
        f"---\n{yaml.safe_dump(header, sort_keys=False)}---\n\n"
        f"# MIA-DPO preference pairs: run `{m.run_id}`\n\n"
        "Multi-image preference pairs written by `mia-dpo export --format "
        f"{m.format}` (mia-dpo {m.version}). Each row asks about one picture among "
        "several; the rejected answer is one the model gave while attending to the wrong "
        "picture.\n\n"
        f"## Counts\n\n{m.pairs} rows, {m.images} distinct image files.\n\n"
        f"| format | rows |\n|---|---|\n{counts}\n\n"
        f"{m.sft_only} rows have a rejected answer equal to the chosen one (a right answer "
        f"kept for label balance): {sft}they give DPO no preference signal; only an SFT term "
        "on the chosen answer learns from them.\n\n"
        f"## Columns\n\n{_COLUMNS[m.format]}{metadata}\n"
        f"## Loading\n\n{_LOADING[m.format].format(data=data_glob, name=name)}\n\n"
        f"## Source\n\n- run id: `{m.run_id}`\n{facts}"
        f"- license: `{license}` (set with `--license`; the pairs inherit the terms of "
        "the source images and answers)\n"
    )
