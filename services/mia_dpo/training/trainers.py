"""The TRL trainer of the train stage: LoRA targets, DPOConfig / SFTConfig from our
TrainConfig, and the few facts about the process (rank, device) it needs.

Method (docs/method.md §5): sigmoid DPO with beta 0.1 on log-probs summed over answer
tokens, reference = the same model with LoRA disabled (TRL does this itself for a
PEFT model when no ref_model is given), LoRA on every linear layer of the language
model's decoder layers and nowhere else. An optional SFT term on the chosen answer
is TRL's `loss_type=[..., "sft"]` with `loss_weights=[1, sft_weight]` (TRL 1.16 has
no `rpo_alpha`). The SFT baseline trains TRL's SFTTrainer on prompt -> chosen.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from torch import nn
from transformers import TrainerCallback

from mia_dpo.config import ModelConfig, TrainConfig
from mia_dpo.errors import UserError
from mia_dpo.models.attention import decoder_layers


def rank() -> int:
    """Global rank under torchrun / accelerate launch (both set RANK); 0 otherwise."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_model_config(cfg: ModelConfig) -> ModelConfig:
    """Each rank of a multi-GPU launch loads its model on its own GPU: 'auto' and
    'cuda' would put all eight copies on cuda:0."""
    local = os.environ.get("LOCAL_RANK")
    multi = world_size() > 1 and local is not None and torch.cuda.is_available()
    if multi and cfg.device in ("auto", "cuda"):
        return cfg.model_copy(update={"device": f"cuda:{int(local)}"})
    return cfg


def _language_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The language model's decoder-layer list and its name. The model's own
    get_decoder() first: `decoder_layers` looks for layers that all have self_attn, which
    Mllama's text layers (cross-attention ones interleaved) lack, so it falls through
    to the vision encoder's layers there."""
    layers: Any = None
    with contextlib.suppress(AttributeError, NotImplementedError, ValueError):
        layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        layers = decoder_layers(model)
    return next(name for name, module in model.named_modules() if module is layers), layers


def lora_target_modules(model: nn.Module) -> list[str]:
    """Full names of every nn.Linear inside the language model's decoder layers.

    Exact names, not suffixes like "q_proj": a CLIP vision tower has q_proj too, and
    the projector and lm_head are linear layers outside the decoder layers.
    """
    prefix, _ = _language_layers(model)
    targets = [
        name
        for name, module in model.named_modules()
        if name.startswith(prefix + ".") and isinstance(module, nn.Linear)
    ]
    if not targets:
        raise ValueError(f"{type(model).__name__}: no linear layers under {prefix}")
    return targets


def lora_target_pattern(model: nn.Module) -> str:
    """The same modules as `lora_target_modules`, as a regex PEFT full-matches against
    module names: the language model's component name, the decoder-layer list's name,
    a layer index, then the linear layers' names within a layer.

    Not full paths: transformers moves LLaVA's language model around between releases
    (`language_model.model.layers.N` in 4.x, `model.language_model.layers.N` in 5.x), and
    an adapter whose targets name one layout would not load onto the other. The vision
    tower's layers (q_proj too) sit under no language-model component, so they stay out.
    """
    prefix, layers = _language_layers(model)
    *path, container = prefix.split(".")
    # "model" is the wrapper every layout has somewhere; the rest names the language model.
    anchors = [part for part in path if part != "model"]
    leaves = sorted(
        {
            name.split(".", 1)[1]
            for name, module in layers.named_modules()
            if "." in name and isinstance(module, nn.Linear)
        }
    )
    if not leaves:
        raise ValueError(f"{type(model).__name__}: no linear layers under {prefix}")
    head = "".join(rf"(?:.*\.)?{re.escape(a)}\." for a in anchors)
    body = "|".join(re.escape(leaf) for leaf in leaves)
    return rf"{head}(?:.*\.)?{re.escape(container)}\.\d+\.(?:{body})"


@dataclass(frozen=True)
class LoraTargets:
    """What LoraConfig gets (the pattern, or the exact names when the pattern would match
    other modules on this model) and the module names it matches here."""

    target_modules: str | list[str]
    matched: list[str]


def lora_targets(model: nn.Module, log: logging.Logger | None = None) -> LoraTargets:
    exact = lora_target_modules(model)
    pattern = lora_target_pattern(model)
    matched = [name for name, _ in model.named_modules() if re.fullmatch(pattern, name)]
    if matched != exact:
        # A layout where the pattern reaches past the decoder layers (a vision encoder
        # under the same component name): exact names are right here, if less portable.
        if log is not None:
            log.warning("train: LoRA pattern %s matches other modules; using full names", pattern)
        return LoraTargets(target_modules=exact, matched=exact)
    return LoraTargets(target_modules=pattern, matched=matched)


def lora_config(tcfg: TrainConfig, targets: str | list[str]) -> LoraConfig:
    return LoraConfig(
        r=tcfg.lora_r,
        lora_alpha=tcfg.lora_alpha,
        lora_dropout=tcfg.lora_dropout,
        target_modules=targets,
        bias="none",
    )


def check_trackers(tcfg: TrainConfig) -> None:
    """A tracker whose package is missing fails at setup with the fix, not mid-run in a
    Trainer import error."""
    import importlib.util

    for name in tcfg.trackers:  # each tracker's package has the tracker's name
        if importlib.util.find_spec(name) is None:
            raise UserError(
                f"train.report_to: {name} is not installed here; pip install {name} "
                "(or set train.report_to: none)"
            )


def tensorboard_dir(trainer: Any, folder: Path) -> bool:
    """Point the Trainer's TensorBoard callback at `folder` (transformers 5 dropped
    TrainingArguments.logging_dir; without this the events land under output_dir/runs/
    with a time-and-host name). False when the trainer reports to no TensorBoard."""
    from transformers.integrations import TensorBoardCallback

    found = False
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback):
            callback.logging_dir = str(folder)
            found = True
    return found


def _switch(value: str) -> bool:
    return value == "on" or (value == "auto" and torch.cuda.is_available())


def training_args(
    tcfg: TrainConfig, seed: int, output_dir: Path, on_cpu: bool, run_name: str | None = None
) -> Any:
    """DPOConfig (method dpo) or SFTConfig (method sft) from the run's train section."""
    from trl import DPOConfig, SFTConfig

    bf16 = tcfg.bf16 == "on" or (
        tcfg.bf16 == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    )
    common: dict[str, Any] = {
        "output_dir": str(output_dir),
        # A model on the CPU: without this, ranks of a CPU torchrun never form a
        # process group and each trains alone.
        "use_cpu": on_cpu,
        "seed": seed,
        "learning_rate": tcfg.learning_rate,
        "lr_scheduler_type": tcfg.lr_scheduler,
        # transformers 5 folded warmup_ratio into warmup_steps: a float in [0, 1) is a ratio.
        "warmup_steps": tcfg.warmup_ratio if tcfg.warmup_ratio > 0 else 0,
        "weight_decay": tcfg.weight_decay,
        "num_train_epochs": tcfg.epochs,
        "per_device_train_batch_size": tcfg.batch_size,
        "gradient_accumulation_steps": tcfg.gradient_accumulation_steps,
        # Cut answers only: the stage checked that every prompt fits (data.check_lengths).
        "max_length": tcfg.max_length,
        "bf16": bf16,
        # The new name: TRL's default for the old one (True) would warn on every run.
        "activation_checkpointing": _switch(tcfg.gradient_checkpointing),
        "save_strategy": "steps",
        "save_steps": tcfg.save_steps,
        # The local folder is scratch: the store keeps the checkpoints.
        "save_total_limit": 1,
        "logging_steps": tcfg.logging_steps,
        "report_to": tcfg.trackers,
        "run_name": run_name,
        "disable_tqdm": True,  # worker logs get one line per logging step instead
        "dataloader_pin_memory": torch.cuda.is_available(),
    }
    if tcfg.method == "sft":
        # Loss on the completion (the chosen answer and its end-of-turn token) only.
        return SFTConfig(**common, completion_only_loss=True)
    loss_type, weights = [tcfg.loss_type], None
    if tcfg.sft_weight > 0:
        loss_type, weights = [tcfg.loss_type, "sft"], [1.0, tcfg.sft_weight]
    return DPOConfig(
        **common,
        beta=tcfg.beta,
        loss_type=loss_type,
        loss_weights=weights,
        # TRL's default (True) also zeroes LoRA's dropout, silently overriding
        # train.lora_dropout; at init the LoRA branch is zero anyway, so policy and
        # reference still agree exactly.
        disable_dropout=False,
    )


def make_trainer(
    lm: Any,
    dataset: Any,
    args: Any,
    peft_config: LoraConfig,
    callbacks: list[TrainerCallback],
    lengths: list[int] | None = None,
) -> Any:
    """TRL's trainer for args' method; `lengths` (one per dataset row) batches rows of
    similar length together (train.group_by_length), None keeps TRL's random batches."""
    from transformers import PrinterCallback
    from trl import DPOTrainer, SFTTrainer

    sft = type(args).__name__ == "SFTConfig"
    cls = SFTTrainer if sft else DPOTrainer
    if lengths is not None:
        cls = _length_grouped(cls, lengths)
    trainer = cls(
        model=lm.model,
        args=args,
        train_dataset=dataset,
        processing_class=lm.processor,
        peft_config=peft_config,
        callbacks=callbacks,
        data_collator=family_collator(lm, args, sft),
    )
    trainer.remove_callback(PrinterCallback)  # LogToStage says it in one line
    return trainer


def _length_grouped(cls: type, lengths: list[int]) -> type:
    """`cls` with LengthGroupedBatches as its training sampler. The Trainer's only hook
    for a sampler is this method; its own group_by_length orders each stretch of an
    epoch longest first (see training/sampler.py)."""
    from mia_dpo.training.sampler import LengthGroupedBatches

    def _get_train_sampler(self: Any, train_dataset: Any = None) -> LengthGroupedBatches:
        n = len(train_dataset if train_dataset is not None else self.train_dataset)
        if n != len(lengths):
            raise ValueError(f"group_by_length: {len(lengths)} lengths for {n} rows")
        # the DataLoader's own batch size (auto_find_batch_size may have lowered it)
        batch = getattr(self, "_train_batch_size", self.args.train_batch_size)
        return LengthGroupedBatches(lengths, batch, self.args.seed)

    return type(f"LengthGrouped{cls.__name__}", (cls,), {"_get_train_sampler": _get_train_sampler})


def family_collator(lm: Any, args: Any, sft: bool) -> Any:
    """TRL's own vision collator (None: the trainer builds it), around the family's
    training processor when it has one of its own (PaliGemma's prefix-LM answers)."""
    family = getattr(lm, "family", None)
    processor = family.training_processor(lm.processor) if family is not None else lm.processor
    if processor is lm.processor:
        return None
    if sft:
        from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

        return DataCollatorForVisionLanguageModeling(
            processor=processor,
            max_length=args.max_length,
            completion_only_loss=args.completion_only_loss,
            pad_to_multiple_of=args.pad_to_multiple_of,
            dataset_text_field=args.dataset_text_field,
            assistant_only_loss=args.assistant_only_loss,
        )
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    return DataCollatorForVisionPreference(
        processor=processor, max_length=args.max_length, pad_to_multiple_of=args.pad_to_multiple_of
    )


class LogToStage(TrainerCallback):
    """One log line per logging step, in the worker's log."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        if state.is_world_process_zero and logs and "loss" in logs:
            self.log.info(
                "train step %d/%d: loss %.4f lr %.3g",
                state.global_step,
                state.max_steps,
                logs["loss"],
                logs.get("learning_rate", float("nan")),
            )
