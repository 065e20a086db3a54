"""The train stage (docs/method.md §5): DPO with LoRA on the selected pairs, or SFT on their
chosen answers as a baseline. One task per run (shard 0).

One GPU (a worker claims the run's single train task):

    mia-dpo worker --stage train --run-id R --config run.yaml

Several GPUs on one node (DDP; every rank runs the same task without the queue,
rank 0 alone writes to the store and the marker, every rank resumes from the same
stored checkpoint; the controller, with launcher.kind external, waits for the marker):

    torchrun --nproc_per_node 8 -m mia_dpo stage-task --stage train --run-id R \
        --config run.yaml
    accelerate launch --num_processes 8 -m mia_dpo stage-task --stage train --run-id R \
        --config run.yaml

CPU (the tiny test model; bf16 and gradient checkpointing stay off under 'auto'):

    mia-dpo worker --stage train --run-id R --config run.yaml   # with model.device: cpu

Outside a run, on a local pairs file (images as local paths):

    mia-dpo train --pairs pairs.trl.jsonl --model DIR --out DIR [--config run.yaml]

Reads runs/R/select/pairs.trl.jsonl and writes under runs/R/train/: adapter/ (LoRA
weights + processor + README.md, the model card; adapter_config.json names the base
by its hub id when known), merged/ (with train.merge_adapter), metadata.json (config,
pair statistics, versions, loss history), checkpoints/ (see training.checkpoints),
tensorboard/ (with train.report_to tensorboard) and shard-00000.jsonl (the loss
history, one log entry per line). The local working
folder is a temporary directory ($TMPDIR): the worker keeps no state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mia_dpo import __version__, model_card
from mia_dpo.config import RunConfig
from mia_dpo.data.images import ImageLoader
from mia_dpo.errors import NotFound, UserError
from mia_dpo.models.loading import load_model, pad_fill
from mia_dpo.records import ShardStats, Task
from mia_dpo.runtime import layout
from mia_dpo.runtime.context import DropLog, StageContext
from mia_dpo.runtime.store import BlobReader, LocalStore, Store
from mia_dpo.training import checkpoints as ckpt
from mia_dpo.training import data, trainers

log = logging.getLogger("mia_dpo.train")


@dataclass
class TrainResult:
    metadata: dict[str, Any]
    log_history: list[dict[str, Any]]
    drops: DropLog


def fingerprint(lines: list[str], cfg: RunConfig) -> str:
    """What a checkpoint was trained on: the pairs, the model, the train settings, the seed."""
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode() + b"\n")
    # report_to watches training and changes nothing trained: a resume may switch it.
    train = cfg.train.model_dump(mode="json", exclude={"report_to"})
    h.update(json.dumps([cfg.model.path, cfg.seed, train]).encode())
    return h.hexdigest()[:32]


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers
    import trl

    return {
        "mia_dpo": __version__,
        "trl": trl.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }


def train_pairs(
    lines: list[str],
    cfg: RunConfig,
    store: Store,
    prefix: str,
    blobs: BlobReader,
    stats: ShardStats,
    source: str,
    logger: logging.Logger = log,
    run_id: str | None = None,
) -> TrainResult:
    """Train on TRL pairs lines; write adapter/ (with its model card), merged/,
    metadata.json, checkpoints/ and tensorboard/ under `prefix` in `store` (rank 0 only).
    Shared by the stage and `train_standalone` (run_id None)."""
    tcfg = cfg.train
    if not lines:
        raise UserError(f"train: no pairs to train on; {source} is empty (did select keep any?)")
    trainers.check_trackers(tcfg)
    lm = load_model(trainers.rank_model_config(cfg.model))
    loader = data.PairImages(
        ImageLoader(blobs, cfg.input.max_image_pixels),
        pad_fill(lm) if cfg.model.pad_to_square else None,
    )
    drops = DropLog(stats)
    rows = data.read_pairs(lines, drops, loader)
    stats.kept = len(rows)
    if not rows:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(stats.dropped.items()))
        raise UserError(
            f"train: no pairs to train on; all {stats.total} pairs of {source} were dropped "
            f"({reasons})"
        )
    lengths = data.check_lengths(rows, lm, tcfg.max_length, loader)
    stats.notes["answers_truncated"] = lengths.truncated
    if stats.notes["answers_truncated"]:
        logger.warning(
            "train: %d pairs have an answer cut at train.max_length %d",
            stats.notes["answers_truncated"],
            tcfg.max_length,
        )
    dataset = data.build_dataset(rows, tcfg.method, loader)
    targets = trainers.lora_targets(lm.model, logger)
    key = fingerprint(lines, cfg)
    is_main = trainers.rank() == 0

    with tempfile.TemporaryDirectory(prefix="mia-dpo-train-") as tmp:
        work = Path(tmp)
        resume = ckpt.download_latest(store, prefix, work / "out", key, logger)
        run_name = f"mia-dpo-{run_id or 'train'}"
        args = trainers.training_args(
            tcfg, cfg.seed, work / "out", lm.device.type == "cpu", run_name
        )
        callbacks = [ckpt.StoreCheckpoints(store, prefix, key, logger), trainers.LogToStage(logger)]
        trainer = trainers.make_trainer(
            lm,
            dataset,
            args,
            trainers.lora_config(tcfg, targets.target_modules),
            callbacks,
            lengths.tokens if tcfg.group_by_length else None,
        )
        tensorboard = work / "tensorboard"
        has_tensorboard = trainers.tensorboard_dir(trainer, tensorboard / run_name)
        _agree_on_resume(resume.step if resume else 0)
        if resume is not None:
            logger.info("train: resuming from checkpoint-%d", resume.step)
        output = trainer.train(resume_from_checkpoint=str(resume.path) if resume else None)
        trainer.save_model(str(work / "adapter"))  # every rank: FSDP/DeepSpeed gather here
        history = list(trainer.state.log_history)
        losses = [h["loss"] for h in history if "loss" in h]
        metadata = {
            "method": tcfg.method,
            "base_model": cfg.model.path,
            "base_model_hub_id": cfg.model.base_model_id(),
            "license": cfg.model.license,
            "pairs_source": source,
            "stage_params": cfg.stage_params(),
            "pairs": data.pair_summary(rows)
            | {"read": stats.total, "dropped": dict(stats.dropped)},
            "versions": _versions(),
            "lora_target_modules": targets.matched,
            "lora_target_pattern": (
                targets.target_modules if isinstance(targets.target_modules, str) else None
            ),
            "lora_target_count": len(targets.matched),
            "report_to": tcfg.trackers,
            "world_size": trainers.world_size(),
            "steps": trainer.state.global_step,
            "max_steps": trainer.state.max_steps,
            "epochs": trainer.state.epoch,
            "resumed_from_step": resume.step if resume else None,
            "final_loss": losses[-1] if losses else None,
            "train_loss": output.training_loss,
            "log_history": history,
            "fingerprint": key,
            "outputs": {
                "adapter": layout.adapter_prefix(prefix),
                "merged": None,
                "tensorboard": layout.tensorboard_prefix(prefix) if has_tensorboard else None,
            },
        }
        if is_main:
            _share_ready(work / "adapter", store, run_id, prefix, metadata)
            ckpt.upload_dir(store, work / "adapter", layout.adapter_prefix(prefix))
            if has_tensorboard and tensorboard.is_dir():
                ckpt.upload_dir(store, tensorboard, layout.tensorboard_prefix(prefix))
            if tcfg.merge_adapter:
                merged = trainer.model.merge_and_unload()
                merged.save_pretrained(work / "merged")
                lm.processor.save_pretrained(work / "merged")
                ckpt.upload_dir(store, work / "merged", layout.merged_prefix(prefix))
                metadata["outputs"]["merged"] = layout.merged_prefix(prefix)
            store.put_json(layout.train_metadata_key(prefix), metadata)
    stats.notes["steps"] = int(metadata["steps"])
    stats.notes["epochs"] = math.ceil(metadata["epochs"] or 0)  # notes are counts: epochs begun
    stats.notes["resumed_from_step"] = int(resume.step if resume else 0)
    for fmt, n in metadata["pairs"]["per_format"].items():
        stats.notes[f"pairs_{fmt}"] = n
    logger.info(
        "train: %s on %d pairs, %d steps, final loss %s",
        tcfg.method,
        len(rows),
        metadata["steps"],
        metadata["final_loss"],
    )
    return TrainResult(metadata=metadata, log_history=history, drops=drops)


def _share_ready(
    adapter: Path, store: Store, run_id: str | None, prefix: str, metadata: dict[str, Any]
) -> None:
    """The adapter folder as it is shared: our model card in place of PEFT's template,
    and the base named by its hub id rather than the folder it was loaded from."""
    card = model_card.render_card(model_card.read_records(store, run_id, prefix, metadata))
    (adapter / model_card.CARD_NAME).write_text(card, encoding="utf-8")
    config = adapter / "adapter_config.json"
    text = config.read_text(encoding="utf-8")
    config.write_text(
        model_card.with_base_model(text, metadata["base_model_hub_id"]), encoding="utf-8"
    )


def _agree_on_resume(step: int) -> None:
    """Every rank read the same pointer before training: a rank that did not would
    train a different model and hang or corrupt DDP, so fail loudly instead."""
    if trainers.world_size() <= 1:
        return
    from accelerate.utils import broadcast_object_list

    (main_step,) = broadcast_object_list([step])
    if main_step != step:
        raise RuntimeError(f"train: rank resumes from step {step} but rank 0 from {main_step}")


def run_shard(task: Task, ctx: StageContext) -> ShardStats:
    if task.shard != 0:
        raise ValueError(f"train runs as one task over the whole run (shard 0), got {task.shard}")
    stats = ShardStats(stage="train", shard=task.shard)
    key = layout.trl_pairs_key(task.run_id)
    try:
        lines = ctx.store.get_jsonl(key)
    except NotFound:
        raise UserError(f"train: no pairs to train on; {key} does not exist") from None
    prefix = layout.train_prefix(task.run_id)
    result = train_pairs(
        lines,
        ctx.config,
        ctx.store,
        prefix,
        ctx.blobs,
        stats,
        ctx.store.uri(key),
        ctx.log,
        run_id=task.run_id,
    )
    if trainers.rank() == 0:
        rows = [json.dumps(h, sort_keys=True) for h in result.log_history]
        ctx.store.put_jsonl(layout.shard_key(task.run_id, "train", task.shard), rows)
        result.drops.write(ctx.store, task)
    return stats


def train_standalone(pairs: Path, model: str, out: Path, cfg: RunConfig) -> Path:
    """`mia-dpo train`: train on a local TRL pairs file; the adapter, metadata.json,
    dropped.jsonl and log_history.jsonl go to `out` (rerunning into the same `out`
    resumes). Relative image paths are read relative to the pairs file. Returns the
    adapter folder."""
    pairs = Path(pairs)
    if not pairs.is_file():
        raise UserError(f"train --pairs: {pairs} not found")
    lines = [line for line in pairs.read_text(encoding="utf-8").splitlines() if line.strip()]
    lines = [_absolute_images(line, pairs.parent) for line in lines]
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": model})})
    store = LocalStore(out)
    stats = ShardStats(stage="train", shard=0)
    result = train_pairs(lines, cfg, store, "", BlobReader(cfg.store), stats, str(pairs))
    history = [json.dumps(h, sort_keys=True) for h in result.log_history]
    store.put_jsonl("log_history.jsonl", history)
    store.put_jsonl("dropped.jsonl", result.drops.rows)
    return Path(out) / "adapter"


def _absolute_images(line: str, base: Path) -> str:
    try:
        row = json.loads(line)
        images = row["images"]
        fixed = [u if "://" in u or Path(u).is_absolute() else str(base / u) for u in images]
    except (json.JSONDecodeError, KeyError, TypeError):
        return line  # read_pairs drops it with the precise reason
    return json.dumps({**row, "images": fixed}, ensure_ascii=False)
