"""Plain TRL on an exported dataset: what a user's own script would do."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def dpo_steps(ds: Any, model_dir: Path, out: Path, steps: int = 2) -> list[float]:
    """`steps` LoRA DPO steps of TRL's DPOTrainer on `ds` as given; returns the logged
    losses after checking that the adapter moved."""
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import DPOConfig, DPOTrainer

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    args = DPOConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=2,
        learning_rate=5e-3, logging_steps=1, save_strategy="no", report_to=[], bf16=False,
        gradient_checkpointing=False, max_length=None,
    )  # fmt: skip
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=r".*language_model.*_proj")
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=ds, processing_class=processor, peft_config=lora
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == steps and len(losses) == steps
    assert all(math.isfinite(x) and x > 0 for x in losses)
    # LoRA's B matrices start at zero: any non-zero entry is a step taken on the rows.
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert lora_b and any(float(p.detach().abs().max()) > 0 for p in lora_b)
    return losses
