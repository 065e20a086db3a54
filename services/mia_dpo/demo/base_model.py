"""Train the demo's base model: the tiny LLaVA taught the synthetic questions, on CPU.

    mia-dpo base-model --out runs/base [--seed 0] [--steps 1500]
    # without the CLI:
    python -c "from mia_dpo.demo.base_model import ensure_base_model as e; e('runs/base')"

MIA-DPO needs a policy that already answers single-image questions but is confused
by several images, so there are wrong answers to reject and headroom to gain
(docs/evidence.md). All weights of `build_tiny_model` are trained with a plain
AdamW loop on single-image questions, plus a fraction of `sequence_prompt`
questions so the model has at least seen `In Image{k}, ...`. The loss covers the
answer and EOS only, on ids rendered by the pipeline's own chat template. Greedy
exact-match accuracy on fresh synthetic questions (another seed) is measured per
cell and saved with the model in `base.json`, which is written last: it marks the
folder complete, and `ensure_base_model` reuses the folder when its parameters match.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from transformers import AutoProcessor, LlavaForConditionalGeneration

from mia_dpo import __version__
from mia_dpo.data.images import pad_to_square
from mia_dpo.demo.synthetic import write_synthetic
from mia_dpo.demo.tiny import build_tiny_model
from mia_dpo.models.loading import pad_fill
from mia_dpo.models.prompting import chat_text, encode
from mia_dpo.prompts import IMAGE_TAG, sequence_prompt, strip_image_tag

REPORT_NAME = "base.json"
SEQUENCE_SIZES = (2, 3, 4)
CELLS = ("single", *(f"seq{n}" for n in SEQUENCE_SIZES))
# Evaluation images come from another synthetic stream than the training images.
EVAL_SEED_OFFSET = 10_000
EVAL_BATCH = 32


class BaseParams(BaseModel):
    """Everything that decides the trained weights and the measured accuracies."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(default=0, description="Seeds the initial weights, the data and batches.")
    steps: int = Field(default=1500, ge=1, description="Optimizer steps (~0.1 s each on 2 cores).")
    batch_size: int = Field(default=16, ge=1, description="Images per step (n-image rows: //n).")
    lr: float = Field(default=3e-4, gt=0, description="Peak AdamW lr (1e-3 trains unstably).")
    warmup_fraction: float = Field(default=0.05, ge=0, lt=1, description="Linear warm-up share.")
    n_train: int = Field(default=4000, ge=12, description="Synthetic training images (>= 4 each).")
    multi_fraction: float = Field(default=0.3, ge=0, le=1, description="Share of 2-4 image steps.")
    eval_per_cell: int = Field(default=150, ge=1, description="Evaluation questions per cell.")
    image_px: int = Field(default=64, ge=32, description="Image side, model and data alike.")


class BaseModelReport(BaseModel):
    params: BaseParams
    accuracy: dict[str, float] = Field(description="Greedy exact match per cell (CELLS).")
    steps: int
    final_loss: float = Field(description="Mean loss over the last logging window.")
    losses: list[tuple[int, float]] = Field(description="(step, mean loss since the last log).")
    train_seconds: float
    seconds: float = Field(description="Wall time of the whole call, data and evaluation included.")
    cpu_seconds: float = Field(description="CPU time, all threads (load inflates wall time).")
    version: str


Record = tuple[Path, str, str, str]  # (image, question, answer, sub-source)
Example = tuple[str, str, list[int]]  # (prompt, answer, record indices in prompt order)


def read_records(data_json: Path) -> list[Record]:
    records = []
    for r in json.loads(data_json.read_text(encoding="utf-8")):
        human, gpt = r["conversations"]
        subsource = r["image"].split("/")[0]  # images are stored as {subsource}/{id}.png
        path = data_json.parent / "images" / r["image"]
        records.append((path, strip_image_tag(human["value"]), gpt["value"], subsource))
    return records


def group_by_source(records: list[Record]) -> dict[str, list[int]]:
    by_source: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_source[r[3]].append(i)
    return by_source


def sample_example(
    rng: random.Random, records: list[Record], by_source: dict[str, list[int]], n: int
) -> Example:
    """One question about one image (n=1) or about image k of n distinct images of
    one sub-source, so the distractors look like the target (the paper's sequence)."""
    if n == 1:
        i = rng.randrange(len(records))
        return f"{IMAGE_TAG}\n{records[i][1]}", records[i][2], [i]
    idx = rng.sample(by_source[rng.choice(sorted(by_source))], n)
    k = rng.randint(1, n)
    _, question, answer, _ = records[idx[k - 1]]
    return sequence_prompt(n, k, question), answer, idx


def encode_example(processor: Any, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of prompt + answer as the pipeline renders them: the chat
    template's generation prompt, then " {answer}</s>" (its assistant turn); labels
    are -100 on the prompt, so only the answer and EOS are learned."""
    side = processor.image_processor.crop_size["height"]
    # Blank images only make the processor expand each <image> to its token count.
    blanks = [Image.new("RGB", (side, side))] * prompt.count(IMAGE_TAG)
    prompt_ids = encode(processor, [chat_text(processor, prompt)], blanks)["input_ids"][0]
    tok = processor.tokenizer
    answer_ids = tok(f" {answer}{tok.eos_token}", add_special_tokens=False)["input_ids"]
    return [*prompt_ids, *answer_ids], [-100] * len(prompt_ids) + answer_ids


def _pixels(processor: Any, path: Path) -> torch.Tensor:
    img = pad_to_square(Image.open(path).convert("RGB"), _fill(processor))
    return processor.image_processor(images=[img], return_tensors="pt")["pixel_values"][0]


def _fill(processor: Any) -> tuple[int, int, int]:
    return pad_fill(SimpleNamespace(processor=processor)) or (127, 127, 127)


def collate(
    encoded: list[tuple[list[int], list[int]]], images: list[torch.Tensor], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-padded batch; `images` flat, in prompt order of every row."""
    length = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for row, (x, y) in enumerate(encoded):
        ids[row, : len(x)] = torch.tensor(x)
        labels[row, : len(y)] = torch.tensor(y)
        mask[row, : len(x)] = 1
    pixel_values = torch.stack(images)  # (n_images, 3, H, W)
    return dict(input_ids=ids, labels=labels, attention_mask=mask, pixel_values=pixel_values)


def eval_sets(records: list[Record], n_per_cell: int, seed: int) -> dict[str, list[Example]]:
    by_source = group_by_source(records)
    rng = random.Random(f"mia-dpo-base-eval:{seed}")
    sets = {"single": [sample_example(rng, records, by_source, 1) for _ in range(n_per_cell)]}
    for n in SEQUENCE_SIZES:
        sets[f"seq{n}"] = [sample_example(rng, records, by_source, n) for _ in range(n_per_cell)]
    return sets


@torch.no_grad()
def evaluate(
    model: Any, processor: Any, records: list[Record], sets: dict[str, list[Example]]
) -> dict[str, float]:
    """Greedy exact-match accuracy per cell, through the processor as generation runs it."""
    model.eval()
    tok = processor.tokenizer
    tok.padding_side = "left"  # generation appends on the right
    fill = _fill(processor)
    accuracy = {}
    for cell, examples in sets.items():
        right = 0
        for start in range(0, len(examples), EVAL_BATCH):
            batch = examples[start : start + EVAL_BATCH]
            texts = [chat_text(processor, p) for p, _, _ in batch]
            paths = [records[i][0] for _, _, idx in batch for i in idx]
            images = [pad_to_square(Image.open(x).convert("RGB"), fill) for x in paths]
            inputs = encode(processor, texts, images, padding=True, return_tensors="pt")
            out = model.generate(
                **inputs, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id
            )
            new = out[:, inputs["input_ids"].shape[1] :]
            answers = tok.batch_decode(new, skip_special_tokens=True)
            right += sum(a.strip() == gold for a, (_, gold, _) in zip(answers, batch, strict=True))
        accuracy[cell] = round(right / len(examples), 4)
    return accuracy


def _say(progress: bool, msg: str) -> None:
    if progress:  # stderr: stdout is the CLI's answer
        print(f"base model: {msg}", file=sys.stderr, flush=True)


def _lr_factor(step: int, p: BaseParams) -> float:
    warmup = int(p.warmup_fraction * p.steps)
    if step < warmup:
        return (step + 1) / warmup
    # Cosine to a tenth of the peak: the last steps polish rather than stop.
    progress = (step - warmup) / max(1, p.steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_base_model(
    out_dir: Path | str,
    seed: int = 0,
    steps: int = 1500,
    batch_size: int = 16,
    lr: float = 3e-4,
    n_train: int = 4000,
    multi_fraction: float = 0.3,
    warmup_fraction: float = 0.05,
    eval_per_cell: int = 150,
    image_px: int = 64,
    log_every: int = 100,
    progress: bool = True,
) -> BaseModelReport:
    """Build, train, evaluate and save the base model into `out_dir`; see the module doc."""
    # Every keyword but out_dir, log_every and progress is a BaseParams field.
    p = BaseParams(**{k: v for k, v in locals().items() if k in BaseParams.model_fields})
    t0, cpu0 = time.perf_counter(), time.process_time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Stale marker first: an interrupted run must not pass for a finished one.
    (out_dir / REPORT_NAME).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="mia-dpo-base-") as tmp:
        # Data
        init = build_tiny_model(Path(tmp) / "init", seed=seed, image_size=image_px)
        records = read_records(write_synthetic(Path(tmp) / "train", n_train, seed, image_px))
        eval_json = write_synthetic(
            Path(tmp) / "eval", max(eval_per_cell, 12), seed + EVAL_SEED_OFFSET, image_px
        )
        eval_records = read_records(eval_json)
        processor = AutoProcessor.from_pretrained(init)
        model = LlavaForConditionalGeneration.from_pretrained(init, attn_implementation="sdpa")
        pixels = [_pixels(processor, r[0]) for r in records]  # each image preprocessed once
        by_source = group_by_source(records)

        # Training
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, p))
        rng = random.Random(f"mia-dpo-base:{seed}")
        # A few hundred distinct (prompt, answer) texts in all: encode each once.
        encode = functools.cache(functools.partial(encode_example, processor))
        pad_id = processor.tokenizer.pad_token_id
        losses: list[tuple[int, float]] = []
        window: list[float] = []
        t_train = time.perf_counter()
        for step in range(1, steps + 1):
            # One image count per batch (mixed counts would pad every single-image row to
            # four images' length), and batch_size // n rows, so every step holds about
            # batch_size images and costs about the same: sequence steps would otherwise
            # be 2-4x dearer and blow the CPU time budget.
            n = rng.choice(SEQUENCE_SIZES) if rng.random() < multi_fraction else 1
            rows = max(1, batch_size // n)
            batch = [sample_example(rng, records, by_source, n) for _ in range(rows)]
            encoded = [encode(prompt, answer) for prompt, answer, _ in batch]
            inputs = collate(encoded, [pixels[i] for _, _, idx in batch for i in idx], pad_id)
            loss = model(**inputs).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            window.append(loss.item())
            if step % log_every == 0 or step == steps:
                window_loss = round(sum(window) / len(window), 5)
                losses.append((step, window_loss))
                window = []
                lr_now, secs = sched.get_last_lr()[0], time.perf_counter() - t_train
                msg = f"step {step}/{steps} loss {window_loss:.4f} lr {lr_now:.2e} {secs:.0f}s"
                _say(progress, msg)
        train_seconds = time.perf_counter() - t_train

        # Evaluation and saving
        accuracy = evaluate(
            model, processor, eval_records, eval_sets(eval_records, eval_per_cell, seed)
        )
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
    report = BaseModelReport(
        params=p,
        accuracy=accuracy,
        steps=steps,
        final_loss=losses[-1][1],
        losses=losses,
        train_seconds=round(train_seconds, 2),
        seconds=round(time.perf_counter() - t0, 2),
        cpu_seconds=round(time.process_time() - cpu0, 2),
        version=__version__,
    )
    _say(progress, f"accuracy {accuracy}, {report.seconds:.0f}s -> {out_dir}")
    tmp_report = out_dir / f".{REPORT_NAME}.{os.getpid()}"
    tmp_report.write_text(report.model_dump_json(indent=1) + "\n", encoding="utf-8")
    os.replace(tmp_report, out_dir / REPORT_NAME)  # written last: the folder is complete
    return report


def read_report(out_dir: Path | str) -> BaseModelReport | None:
    path = Path(out_dir) / REPORT_NAME
    try:
        return BaseModelReport.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, or written by another version of this code
        return None


def ensure_base_model(
    out_dir: Path | str, log_every: int = 100, progress: bool = True, **params: Any
) -> Path:
    """`out_dir`, trained with `params` (BaseParams fields) unless it already is."""
    wanted = BaseParams(**params)
    report = read_report(out_dir)
    if report is None or report.params != wanted:
        train_base_model(out_dir, **wanted.model_dump(), log_every=log_every, progress=progress)
    return Path(out_dir)
