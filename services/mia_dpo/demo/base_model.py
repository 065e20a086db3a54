"""Train the demo's base model: the tiny LLaVA taught the synthetic questions, on CPU.

    mia-dpo base-model --out runs/base [--seed 0] [--steps 4000]
    # without the CLI:
    python -c "from mia_dpo.demo.base_model import ensure_base_model as e; e('runs/base')"

MIA-DPO needs a policy that already answers single-image questions but is confused
by several images, so there are wrong answers to reject and headroom to gain
(docs/evidence.md). All weights of `build_tiny_model` are trained with a plain AdamW
loop on the recipe of `base_recipe` (curriculum, distinct distractors, early stop).
The loss covers the answer and EOS only, on ids rendered by the pipeline's own chat
template. Measured on fresh synthetic questions (another seed) and saved with the
model in `base.json`: greedy exact-match accuracy per cell, how often a wrong
sequence answer is a distractor's, and per decoder layer how well the target image's
attention share tells right from wrong two-image answers (ROC AUC): what the
pipeline's attention selection relies on. `base.json` is written last: it marks the
folder complete, and `ensure_base_model` reuses the folder when recipe and
parameters match.
"""

from __future__ import annotations

import functools
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from PIL import Image
from pydantic import BaseModel, Field
from transformers import AutoProcessor, LlavaForConditionalGeneration

from mia_dpo import __version__
from mia_dpo.calibration import roc_auc
from mia_dpo.data.images import pad_to_square
from mia_dpo.demo.base_recipe import (
    CELLS,
    RECIPE_VERSION,
    BaseParams,
    Example,
    Record,
    eval_sets,
    group_by_source,
    lr_factor,
    read_records,
    sample_example,
    step_task,
    target_position,
)
from mia_dpo.demo.supervision import layers_share_loss
from mia_dpo.demo.synthetic import write_synthetic
from mia_dpo.demo.tiny import build_tiny_model
from mia_dpo.models.attention import capture_layers_attention
from mia_dpo.models.loading import pad_fill
from mia_dpo.models.prompting import chat_text, encode
from mia_dpo.models.ratios import sequence_ratio
from mia_dpo.prompts import IMAGE_TAG

__all__ = [
    "CELLS",
    "BaseModelReport",
    "BaseParams",
    "collate",
    "encode_example",
    "ensure_base_model",
    "format_report",
    "read_report",
    "sample_example",
    "train_base_model",
]

REPORT_NAME = "base.json"
# Evaluation images come from another synthetic stream than the training images.
EVAL_SEED_OFFSET = 10_000
EVAL_BATCH = 32
AUC_CELL = "seq2"  # the attention AUC is measured on two-image sequences
# The target: below it, attention selection hardly separates right from wrong.
AUC_TARGET = 0.75


class BaseModelReport(BaseModel):
    params: BaseParams
    recipe: int = Field(description="RECIPE_VERSION of the code that trained the model.")
    accuracy: dict[str, float] = Field(description="Greedy exact match per cell (CELLS).")
    wrong_is_distractor: dict[str, float | None] = Field(
        description="Per sequence cell: share of wrong answers that are a distractor's "
        "answer (None: no wrong answer)."
    )
    attention_auc: list[float | None] = Field(
        description=f"Per decoder layer (0-based), {AUC_CELL}: ROC AUC of the target image's "
        "share of the answer's image attention, right vs wrong answers (None: not both)."
    )
    best_layer: int | None = Field(description="Layer of the highest attention AUC.")
    best_auc: float | None
    steps: int
    final_loss: float = Field(description="Mean loss over the last logging window.")
    losses: list[tuple[int, float]] = Field(description="(step, mean loss since the last log).")
    train_seconds: float
    seconds: float = Field(description="Wall time of the whole call, data and evaluation included.")
    cpu_seconds: float = Field(description="CPU time, all threads (load inflates wall time).")
    version: str


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


def _answer_ids(row: list[int], eos_id: int) -> list[int]:
    """Generated ids up to and including EOS: generate pads only after it."""
    return row[: row.index(eos_id) + 1] if eos_id in row else row


@torch.no_grad()
def generate_answers(
    model: Any, processor: Any, records: list[Record], examples: list[Example]
) -> list[list[int]]:
    """Greedy answer ids per example (EOS included), through the processor as
    generation runs it: left padding, batches of EVAL_BATCH."""
    model.eval()
    tok = processor.tokenizer
    tok.padding_side = "left"  # generation appends on the right
    fill = _fill(processor)
    answers = []
    for start in range(0, len(examples), EVAL_BATCH):
        batch = examples[start : start + EVAL_BATCH]
        texts = [chat_text(processor, p) for p, _, _ in batch]
        paths = [records[i][0] for _, _, idx in batch for i in idx]
        images = [pad_to_square(Image.open(x).convert("RGB"), fill) for x in paths]
        inputs = encode(processor, texts, images, padding=True, return_tensors="pt")
        out = model.generate(
            **inputs, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id
        )
        for row in out[:, inputs["input_ids"].shape[1] :].tolist():
            answers.append(_answer_ids(row, tok.eos_token_id))
    return answers


@torch.no_grad()
def target_shares(
    model: Any, processor: Any, records: list[Record], example: Example, answer_ids: list[int]
) -> list[float]:
    """Per decoder layer: the target image's share of the attention paid to image tokens
    by the rows that predict the model's own answer, teacher-forced (head mean, rows
    mean, each image's mean over its tokens normalised to sum 1, as the score stage)."""
    prompt, _, idx = example
    fill = _fill(processor)
    images = [pad_to_square(Image.open(records[i][0]).convert("RGB"), fill) for i in idx]
    enc = encode(processor, [chat_text(processor, prompt)], images, return_tensors="pt")
    prompt_ids = enc["input_ids"][0]
    ids = torch.cat([prompt_ids, torch.tensor(answer_ids, dtype=prompt_ids.dtype)])[None]
    inputs = {**enc, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    rows = (len(prompt_ids) - 1, len(prompt_ids) - 1 + len(answer_ids))  # predict the answer
    columns = (prompt_ids == model.config.image_token_id).nonzero().flatten()
    per_image = len(columns) // len(idx)  # images' tokens lie in prompt order
    spans = [(j * per_image, (j + 1) * per_image) for j in range(len(idx))]
    layers = list(range(model.config.text_config.num_hidden_layers))
    weights = capture_layers_attention(model, inputs, layers, rows)  # per layer (1, R, T)
    k = target_position(prompt)
    return [sequence_ratio(w[0].mean(0)[columns].numpy(), spans, k) for w in weights]


def evaluate(
    model: Any, processor: Any, records: list[Record], sets: dict[str, list[Example]]
) -> dict[str, Any]:
    """The report's measures (BaseModelReport fields): accuracy per cell; per sequence
    cell the share of wrong answers that are a distractor's; on AUC_CELL, per decoder
    layer the ROC AUC of the target's attention share, right vs wrong answers."""
    tok = processor.tokenizer
    accuracy: dict[str, float] = {}
    wrong_is_distractor: dict[str, float | None] = {}
    auc: list[float | None] = []
    for cell, examples in sets.items():
        answers = generate_answers(model, processor, records, examples)
        texts = [tok.decode(a, skip_special_tokens=True).strip() for a in answers]
        right = [t == gold for t, (_, gold, _) in zip(texts, examples, strict=True)]
        accuracy[cell] = round(sum(right) / len(right), 4)
        if cell == "single":
            continue
        # Distractors answer differently from the target, so a wrong answer that some
        # image in the prompt answers is a distractor's.
        traced = [
            t in {records[i][2] for i in idx}
            for t, r, (_, _, idx) in zip(texts, right, examples, strict=True)
            if not r
        ]
        wrong_is_distractor[cell] = round(sum(traced) / len(traced), 4) if traced else None
        if cell != AUC_CELL:
            continue
        shares: dict[bool, list[list[float]]] = {True: [], False: []}
        for ex, ids, r in zip(examples, answers, right, strict=True):
            if model.config.image_token_id not in ids:  # an image token would want pixels
                shares[r].append(target_shares(model, processor, records, ex, ids))
        for layer in range(model.config.text_config.num_hidden_layers):
            a = roc_auc([s[layer] for s in shares[True]], [s[layer] for s in shares[False]])
            auc.append(None if a is None else round(a, 4))
    measured = [(a, layer) for layer, a in enumerate(auc) if a is not None]
    # the first of equal AUCs: the shallowest layer
    best_auc, best_layer = max(measured, key=lambda m: m[0]) if measured else (None, None)
    return dict(
        accuracy=accuracy,
        wrong_is_distractor=wrong_is_distractor,
        attention_auc=auc,
        best_layer=best_layer,
        best_auc=best_auc,
    )


def _say(progress: bool, msg: str) -> None:
    if progress:  # stderr: stdout is the CLI's answer
        print(f"base model: {msg}", file=sys.stderr, flush=True)


def train_base_model(
    out_dir: Path | str, log_every: int = 100, progress: bool = True, **params: Any
) -> BaseModelReport:
    """Build, train, evaluate and save the base model into `out_dir`; `params` are
    BaseParams fields (defaults: the recipe). See the module doc. On one CPU thread:
    the order of float sums, so the weights and the measured figures, depend on the
    thread count, and this model is too small to gain from more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(Path(out_dir), log_every, progress, BaseParams(**params))
    finally:
        torch.set_num_threads(threads)


def _train(out_dir: Path, log_every: int, progress: bool, p: BaseParams) -> BaseModelReport:
    t0, cpu0 = time.perf_counter(), time.process_time()
    out_dir.mkdir(parents=True, exist_ok=True)
    # Stale marker first: an interrupted run must not pass for a finished one.
    (out_dir / REPORT_NAME).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="mia-dpo-base-") as tmp:
        # Data
        init = build_tiny_model(
            Path(tmp) / "init",
            seed=p.seed,
            image_size=p.image_px,
            patch_size=p.patch_size,
            text_layers=p.text_layers,
            vision_layers=p.vision_layers,
            vision_hidden=p.vision_hidden,
        )
        train_json = write_synthetic(Path(tmp) / "train", p.n_train, p.seed, p.image_px)
        records = read_records(train_json)
        eval_json = write_synthetic(
            Path(tmp) / "eval", p.eval_images, p.seed + EVAL_SEED_OFFSET, p.image_px
        )
        eval_records = read_records(eval_json)
        processor = AutoProcessor.from_pretrained(init)
        # Supervising attention needs the weights themselves, which only eager returns.
        kernel = "eager" if p.attention_supervision else "sdpa"
        model = LlavaForConditionalGeneration.from_pretrained(init, attn_implementation=kernel)
        pixels = [_pixels(processor, r[0]) for r in records]  # each image preprocessed once
        by_source = group_by_source(records)

        # Training
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=p.lr, betas=(0.9, 0.95), weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, p))
        rng = random.Random(f"mia-dpo-base:{p.seed}")
        # A few thousand distinct (prompt, answer) texts in all: encode each once.
        encode = functools.cache(functools.partial(encode_example, processor))
        pad_id = processor.tokenizer.pad_token_id
        losses: list[tuple[int, float]] = []
        window: list[float] = []
        shares: list[float] = []  # exp(-aux): the target's share on supervised steps
        t_train = time.perf_counter()
        for step in range(1, p.steps + 1):
            n, index_task = step_task(rng, step, p)
            # batch_size // n rows, so every step holds about batch_size images and costs
            # about the same: sequence steps would otherwise be 2-4x dearer.
            rows = max(1, p.batch_size // n)
            batch = [
                sample_example(rng, records, by_source, n, p.distinct, index_task)
                for _ in range(rows)
            ]
            encoded = [encode(prompt, answer) for prompt, answer, _ in batch]
            inputs = collate(encoded, [pixels[i] for _, _, idx in batch for i in idx], pad_id)
            supervise = bool(p.attention_supervision) and n > 1 and not index_task
            out = model(**inputs, output_attentions=supervise)
            loss = out.loss
            if supervise:
                targets = [target_position(prompt) for prompt, _, _ in batch]
                image_id = model.config.image_token_id
                aux = layers_share_loss(
                    out.attentions, inputs, image_id, n, targets, p.supervised_layers
                )
                loss = loss + p.attention_supervision * aux
                shares.append(float(torch.exp(-aux.detach())))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            window.append(loss.item())
            if step % log_every == 0 or step == p.steps:
                window_loss = round(sum(window) / len(window), 5)
                losses.append((step, window_loss))
                window = []
                lr_now, secs = sched.get_last_lr()[0], time.perf_counter() - t_train
                msg = f"step {step}/{p.steps} loss {window_loss:.4f} lr {lr_now:.2e} {secs:.0f}s"
                if shares:
                    msg += f" target share {sum(shares) / len(shares):.3f}"
                    shares = []
                _say(progress, msg)
        train_seconds = time.perf_counter() - t_train

        # Evaluation and saving
        sets = eval_sets(eval_records, p.eval_per_cell, p.seed)
        measured = evaluate(model, processor, eval_records, sets)
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
    report = BaseModelReport(
        params=p,
        recipe=RECIPE_VERSION,
        **measured,
        steps=p.steps,
        final_loss=losses[-1][1],
        losses=losses,
        train_seconds=round(train_seconds, 2),
        seconds=round(time.perf_counter() - t0, 2),
        cpu_seconds=round(time.process_time() - cpu0, 2),
        version=__version__,
    )
    _say(progress, f"accuracy {report.accuracy}, {report.seconds:.0f}s -> {out_dir}")
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
    """`out_dir`, trained with `params` (BaseParams fields) unless it already is, by
    this recipe version (a model of an older recipe retrains)."""
    wanted = BaseParams(**params)
    report = read_report(out_dir)
    if report is None or report.recipe != RECIPE_VERSION or report.params != wanted:
        train_base_model(out_dir, **wanted.model_dump(), log_every=log_every, progress=progress)
    return Path(out_dir)


def _fmt(x: float | None, none: str) -> str:
    return f"n/a ({none})" if x is None else f"{x:.3f}"


def format_report(report: BaseModelReport) -> list[str]:
    """One line per measured fact, a WARNING line when the best attention AUC misses
    AUC_TARGET (the pipeline's attention selection would then hardly work)."""
    both = "needs right and wrong answers"
    n = AUC_CELL.removeprefix("seq")
    lines = [f"single-image accuracy: {report.accuracy['single']:.3f}"]
    lines += [
        f"{cell.removeprefix('seq')}-image sequence accuracy: {acc:.3f}"
        for cell, acc in report.accuracy.items()
        if cell != "single"
    ]
    share = _fmt(report.wrong_is_distractor.get(AUC_CELL), "no wrong answer")
    lines.append(f"wrong {n}-image answers that are a distractor's answer: {share}")
    lines += [
        f"attention AUC (target share, right vs wrong, {n} images), layer {layer}: "
        f"{_fmt(auc, both)}"
        for layer, auc in enumerate(report.attention_auc)
    ]
    best = _fmt(report.best_auc, both)
    lines.append(f"best attention layer: {report.best_layer} (AUC {best})")
    if report.best_auc is None or report.best_auc < AUC_TARGET:
        lines.append(
            f"WARNING: best attention AUC {best} is below {AUC_TARGET}: attention selection "
            "will hardly separate right from wrong answers with this model"
        )
    lines.append(f"training seconds: {report.train_seconds:.1f}")
    return lines
