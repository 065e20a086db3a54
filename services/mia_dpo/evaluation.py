"""Scoring models on the held-out benchmark: greedy answers, normalised exact match,
accuracy per cell, and the before / after report (docs/method.md §6, on our data).

Apart from the stage, so an evidence script can score any adapter on the items a
run already built: `read_items` -> `evaluate_models` -> `format_report`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from mia_dpo.answers import same_answer
from mia_dpo.config import GRID_COUNTS, SEQUENCE_COUNTS, ModelConfig, RunConfig
from mia_dpo.data.images import pad_to_square
from mia_dpo.errors import UserError
from mia_dpo.models.loading import LoadedModel, load_model, pad_fill
from mia_dpo.models.prompting import batch_inputs
from mia_dpo.paired import PairedDelta, paired_delta
from mia_dpo.records import Record

EvalFormat = Literal["sequence", "grid", "pic_in_pic", "single"]
ImagesLoader = Callable[["EvalItem"], list[Image.Image]]
# A LoadedModel, or a bare (model, processor) pair from an evidence script.
ModelLike = LoadedModel | tuple[Any, Any]

CELL_SINGLE = "single"
CELL_MULTI = "multi_image"
# Per-count cells only where a format has several counts: pic-in-pic always shows 2.
_COUNTED = {"sequence": SEQUENCE_COUNTS, "grid": GRID_COUNTS}
CELL_ORDER: tuple[str, ...] = (
    CELL_SINGLE,
    "sequence",
    *(f"sequence/{n}" for n in SEQUENCE_COUNTS),
    "grid",
    *(f"grid/{n}" for n in GRID_COUNTS),
    "pic_in_pic",
    CELL_MULTI,
)


class EvalItem(Record):
    """One benchmark question: a held-out sample in one format, or its image alone."""

    id: str = Field(description="'{source_id}-{format}': unique within a run.")
    source_id: str = Field(description="`id` of the held-out source sample.")
    format: EvalFormat = Field(description="sequence | grid | pic_in_pic | single.")
    n_images: int = Field(ge=1, description="Pictures shown, the target included.")
    images: list[str] = Field(description="What the model receives: local paths or s3:// URIs.")
    prompt: str = Field(description="Question with one <image> tag per entry of images.")
    answer: str = Field(description="Ground truth of the source's first turn.")
    target_index: int = Field(default=1, ge=1, description="1-based position of the target.")
    distractor_images: list[str] = Field(
        default_factory=list, description="Source-relative paths of the distractors used."
    )


class Prediction(Record):
    item_id: str
    model: str = Field(description="Name of the model in the report (base, adapted, ...).")
    prediction: str = Field(description="Greedy answer, special tokens removed.")
    correct: bool = Field(description="normalize_answer(prediction) == normalize_answer(answer).")


class Cell(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    n: int
    correct: int
    accuracy: float


class EvalReport(Record):
    base_model: str = Field(description="model.path of the base model.")
    adapter: str | None = Field(description="Where the evaluated adapter came from; null: none.")
    n_items: int
    items_sha256: str = Field(description="Digest of the items: equal digests, equal benchmark.")
    models: dict[str, dict[str, Cell]] = Field(description="model name -> cell -> accuracy.")
    delta: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="model name -> cell -> its accuracy minus base's (when base was evaluated).",
    )
    interval: dict[str, dict[str, PairedDelta]] = Field(
        default_factory=dict,
        description="model name -> cell -> the delta as a paired difference over the same "
        "items with its 95 % bootstrap interval.",
    )


# --- scoring ------------------------------------------------------------------------


def is_correct(prediction: str, answer: str) -> bool:
    return same_answer(prediction, answer)


def cells_of(item: EvalItem) -> list[str]:
    if item.format == "single":
        return [CELL_SINGLE]
    cells = [item.format, CELL_MULTI]
    if item.format in _COUNTED:
        cells.append(f"{item.format}/{item.n_images}")
    return cells


def accuracy_cells(pairs: Iterable[tuple[EvalItem, str]]) -> dict[str, Cell]:
    """(item, prediction) pairs -> accuracy per cell, in CELL_ORDER; empty cells omitted."""
    n: dict[str, int] = {}
    right: dict[str, int] = {}
    for item, prediction in pairs:
        ok = is_correct(prediction, item.answer)
        for cell in cells_of(item):
            n[cell] = n.get(cell, 0) + 1
            right[cell] = right.get(cell, 0) + ok
    order = [c for c in CELL_ORDER if c in n] + sorted(set(n) - set(CELL_ORDER))
    return {c: Cell(n=n[c], correct=right[c], accuracy=right[c] / n[c]) for c in order}


def items_digest(items: Sequence[EvalItem]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.id, it.prompt, it.images, it.answer]).encode() + b"\n")
    return h.hexdigest()


# --- models -------------------------------------------------------------------------


def load_adapter_model(base_cfg: ModelConfig, adapter_dir: Path) -> LoadedModel:
    """A fresh copy of the base model with the LoRA adapter (save_pretrained layout)
    merged in. Fresh, because the process-wide cached base must stay unadapted."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir}: no adapter_config.json (not a PEFT adapter)")
    if not (adapter_dir / "adapter_model.safetensors").is_file() and not base_cfg.allow_pickle:
        raise UserError(
            f"{adapter_dir}: no adapter_model.safetensors; pickle weights need model.allow_pickle"
        )
    lm = load_model(base_cfg)
    try:
        peft_model = PeftModel.from_pretrained(lm.model, str(adapter_dir), is_trainable=False)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"{adapter_dir}: cannot apply the adapter to {base_cfg.path}: {e}") from e
    # Merged, the model is the base class again: its own generate(), no LoRA overhead.
    model = peft_model.merge_and_unload().eval()
    return dataclasses.replace(lm, model=model, name=f"{lm.name} + {adapter_dir.name}")


@dataclasses.dataclass
class _Bare:
    """What answer_batch needs of a model given as a bare (model, processor) pair."""

    model: Any
    processor: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype


def _as_loaded(m: ModelLike) -> Any:
    if not isinstance(m, tuple):
        return m
    model, processor = m
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"  # batched generation appends on the right
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    param = next(model.parameters())
    return _Bare(model.eval(), processor, tokenizer, param.device, param.dtype)


def answer_batch(
    lm: Any, items: Sequence[EvalItem], images: list[list[Image.Image]], cfg: RunConfig
) -> list[str]:
    """Greedy answers to one batch, left-padded, images as generation sees them."""
    if cfg.model.pad_to_square:
        fill = pad_fill(lm)
        images = [[pad_to_square(img, fill) for img in imgs] for imgs in images]
    inputs = batch_inputs(lm, [it.prompt for it in items], images)
    tok = lm.tokenizer
    eos = lm.model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos if eos is not None else tok.eos_token_id])
    with torch.no_grad():
        out = lm.model.generate(
            **inputs,
            max_new_tokens=cfg.evaluate.max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tok.pad_token_id,
        )
    answers = []
    for row in out[:, inputs["input_ids"].shape[1] :].tolist():  # (B, new_tokens)
        cut = next((i for i, t in enumerate(row) if t in eos_ids), len(row))
        answers.append(tok.decode(row[:cut], skip_special_tokens=True).strip())
    return answers


def evaluate_models(
    items: Sequence[EvalItem],
    images_loader: ImagesLoader,
    models: dict[str, ModelLike],
    cfg: RunConfig,
    *,
    adapter: str | None = None,
    predictions: list[Prediction] | None = None,
) -> EvalReport:
    """Every model answers every item, batch by batch on the same decoded images;
    predictions (if a list is given) receive one row per (item, model)."""
    loaded = {name: _as_loaded(m) for name, m in models.items()}
    answers: dict[str, list[str]] = {name: [] for name in loaded}
    size = cfg.evaluate.batch_size
    for start in range(0, len(items), size):
        batch = items[start : start + size]
        images = [images_loader(it) for it in batch]
        for name, lm in loaded.items():
            answers[name] += answer_batch(lm, batch, images, cfg)
    cells = {name: accuracy_cells(zip(items, got, strict=True)) for name, got in answers.items()}
    if predictions is not None:
        for name, got in answers.items():
            predictions += [
                Prediction(
                    item_id=it.id, model=name, prediction=p, correct=is_correct(p, it.answer)
                )
                for it, p in zip(items, got, strict=True)
            ]
    delta: dict[str, dict[str, float]] = {}
    interval: dict[str, dict[str, PairedDelta]] = {}
    if "base" in cells:
        base = cells["base"]
        delta = {
            name: {c: round(cell.accuracy - base[c].accuracy, 6) for c, cell in got.items()}
            for name, got in cells.items()
            if name != "base"
        }
        interval = {name: paired_cells(items, answers["base"], answers[name]) for name in delta}
    return EvalReport(
        base_model=cfg.model.path,
        adapter=adapter,
        n_items=len(items),
        items_sha256=items_digest(items),
        models=cells,
        delta=delta,
        interval=interval,
    )


def paired_cells(
    items: Sequence[EvalItem], base: Sequence[str], variant: Sequence[str]
) -> dict[str, PairedDelta]:
    """Per cell, variant - base over the same items with a bootstrap interval."""
    right: dict[str, tuple[list[bool], list[bool]]] = {}
    for it, b, v in zip(items, base, variant, strict=True):
        for cell in cells_of(it):
            pair = right.setdefault(cell, ([], []))
            pair[0].append(is_correct(b, it.answer))
            pair[1].append(is_correct(v, it.answer))
    return {cell: paired_delta(b, v) for cell, (b, v) in right.items()}


# --- the human-readable report ------------------------------------------------------


def cell_label(cell: str) -> str:
    if cell == CELL_SINGLE:
        return "single image"
    if cell == CELL_MULTI:
        return "multi-image (all)"
    fmt, _, n = cell.partition("/")
    name = fmt.replace("_", "-")
    return f"{name}, {n} images" if n else (name if fmt == "pic_in_pic" else f"{name} (all)")


def format_report(report: EvalReport) -> str:
    """A markdown table: one row per cell, n, each model's accuracy, then the deltas."""
    # Base first: report.json is stored with sorted keys, which would put it after "adapted".
    names = sorted(report.models, key=lambda m: (m != "base", m))
    deltas = [m for m in names if m in report.delta]
    heads = ["cell", "n", *names]
    for d in deltas:
        heads += ["delta", "95 % interval"] if len(deltas) == 1 else [f"delta {d}", "interval"]
    seen = {c for cells in report.models.values() for c in cells}
    rows = []
    for cell in [c for c in CELL_ORDER if c in seen] + sorted(seen - set(CELL_ORDER)):
        n = next(cells[cell].n for cells in report.models.values() if cell in cells)
        accs = [
            f"{report.models[m][cell].accuracy:.3f}" if cell in report.models[m] else "-"
            for m in names
        ]
        diffs: list[str] = []
        for m in deltas:
            diffs.append(f"{report.delta[m][cell]:+.3f}" if cell in report.delta[m] else "-")
            ci = report.interval.get(m, {}).get(cell)
            diffs.append(f"[{ci.low:+.3f}, {ci.high:+.3f}]" if ci else "-")
        rows.append([cell_label(cell), str(n), *accs, *diffs])
    lines = [
        "# Evaluation on the held-out benchmark",
        "",
        f"- base model: `{report.base_model}`",
        f"- adapter: `{report.adapter}`" if report.adapter else "- adapter: none",
        f"- items: {report.n_items} (sha256 {report.items_sha256[:12]})",
        "- greedy decoding; normalised exact match against the first turn's ground truth",
        "",
        "| " + " | ".join(heads) + " |",
        "|" + "|".join("---" for _ in heads) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
        # What a reader needs to judge a delta: the noise of a cell.
        "A cell's accuracy has a standard error of at most 0.5/sqrt(n) (0.05 at n = 100). "
        "The interval is a 95 % paired bootstrap over the cell's items (2000 resamples): "
        "a delta whose interval contains 0 is not told apart from noise.",
        "",
    ]
    return "\n".join(lines)
