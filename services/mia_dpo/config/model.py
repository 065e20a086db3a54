"""Model sections: which weights answer, are scored and trained, and how (model,
generate, train, evaluate). Split from `method` for size only: these are method
sections too, pinned by `RunConfig.stage_params()` in the same way."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from mia_dpo.config.base import Section

# owner/name as the hub spells repository ids (no leading or doubled separators).
HUB_ID = re.compile(r"[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?/[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?")
REPORT_TO = ("none", "tensorboard", "wandb", "mlflow")


class ModelConfig(Section):
    path: str = Field(
        default="",
        description=(
            "Hugging Face image-text-to-text model: a local directory (save_pretrained layout) "
            "or a hub id such as llava-hf/llava-1.5-7b-hf (needs network unless cached)."
        ),
    )
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit).")
    hub_id: str | None = Field(
        default=None,
        description=(
            "The Hugging Face hub id of the base model (owner/name), for the model card and "
            "adapter_config.json; null: model.path when that looks like owner/name and is not "
            "an existing local path, else unknown (the card says the base is a local model)."
        ),
    )
    license: str | None = Field(
        default=None,
        description=(
            "License id of the base model (hub spelling, e.g. llama2, apache-2.0) for the "
            "adapter's card; null: other (the card says the base model's terms apply)."
        ),
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto", description="Weights dtype; auto: bfloat16 on CUDA, float32 on CPU."
    )
    device: str = Field(default="auto", description="auto (cuda if available), cpu, cuda, cuda:N.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        default="sdpa",
        description="Attention kernel; scoring captures its one layer with any of them.",
    )
    chat_template: Literal["auto", "checkpoint", "interleaved"] = Field(
        default="auto",
        description=(
            "checkpoint: the model's own chat template (refused if it moves images away from "
            "their Image{k} labels); interleaved: our LLaVA-1.5 style USER:/ASSISTANT: template "
            "that keeps text and images in prompt order; auto: checkpoint if it keeps the "
            "order, else interleaved."
        ),
    )
    pad_to_square: bool = Field(
        default=True,
        description=(
            "Pad each image to a square with the image processor's mean colour before its own "
            "resize and crop, as LLaVA-1.5 does (image_aspect_ratio 'pad'); without it a centre "
            "crop cuts off the outer tiles of a wide collage."
        ),
    )
    allow_pickle: bool = Field(
        default=False,
        description="Allow .bin/.pt (pickle) weights; off: safetensors only, pickle can run code.",
    )
    trust_remote_code: bool = Field(
        default=False, description="Run model code shipped with the checkpoint (off: refuse)."
    )

    @field_validator("hub_id")
    @classmethod
    def _hub_id(cls, value: str | None) -> str | None:
        if value is not None and not HUB_ID.fullmatch(value):
            raise ValueError(f"not a hub id of the form owner/name: {value!r}")
        return value

    def base_model_id(self) -> str | None:
        """The base model's hub id: hub_id, else a path that reads as owner/name and is
        no folder here (a pod-local copy of the weights has no public name)."""
        if self.hub_id:
            return self.hub_id
        if HUB_ID.fullmatch(self.path) and not Path(self.path).exists():
            return self.path
        return None


class GenerateConfig(Section):
    batch_size: int = Field(default=8, ge=1, description="Prompts per generate() call.")
    max_new_tokens: int = Field(
        default=512, ge=1, description="Longest response, in tokens (reference: 512)."
    )
    num_samples: int = Field(
        default=1, ge=1, description="Responses per prompt (reference: 1, greedy)."
    )
    temperature: float = Field(
        default=0.0, ge=0.0, description="0: greedy decoding (reference); > 0: sampling."
    )
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling when sampling.")
    max_chosen_chars: int = Field(
        default=512,
        ge=1,
        description="Samples whose ground truth is this long or longer are skipped.",
    )
    noise: bool = Field(
        default=False,
        description=(
            "Add Gaussian noise to the generation input (reference code, not the paper): "
            "grid: target tile only; pic-in-pic: whole image; sequence: none."
        ),
    )
    noise_sigma_grid: float = Field(
        default=225.0, ge=0, description="Noise std for grids (0-255 scale)."
    )
    noise_sigma_pip: float = Field(
        default=49.0, ge=0, description="Noise std for pic-in-pic (0-255)."
    )


class TrainConfig(Section):
    method: Literal["dpo", "sft"] = Field(
        default="dpo", description="dpo: MIA-DPO; sft: SFT on the chosen answers (a baseline)."
    )
    beta: float = Field(default=0.1, gt=0.0, description="DPO beta (docs/method.md §5).")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field(
        default="sigmoid", description="DPO loss (TRL loss_type); sigmoid is standard DPO."
    )
    sft_weight: float = Field(
        default=0.0, ge=0.0, description="Weight of an added SFT loss on chosen (0: none)."
    )
    lora_r: int = Field(default=128, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(default=256, ge=1, description="LoRA alpha.")
    lora_dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="LoRA dropout.")
    learning_rate: float = Field(default=5e-5, gt=0.0, description="Peak learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field(
        default="linear", description="Learning-rate schedule after warm-up."
    )
    warmup_ratio: float = Field(default=0.1, ge=0.0, lt=1.0, description="Warm-up fraction.")
    weight_decay: float = Field(default=0.0, ge=0.0, description="AdamW weight decay.")
    epochs: float = Field(default=1.0, gt=0.0, description="Passes over the pairs.")
    batch_size: int = Field(default=1, ge=1, description="Pairs per device per step.")
    gradient_accumulation_steps: int = Field(
        default=8, ge=1, description="Steps accumulated per optimizer step (reference: 8 x 8 GPUs)."
    )
    max_length: int = Field(
        default=4096, ge=16, description="Longest prompt + answer in tokens (never cut images)."
    )
    group_by_length: bool = Field(
        default=False,
        description=(
            "Batch pairs of similar token length together, the batches in random order: "
            "less padding when image counts differ (bench/train_batching.py); off: TRL's "
            "random batches."
        ),
    )
    bf16: Literal["auto", "on", "off"] = Field(
        default="auto", description="bf16 mixed precision; auto: on when CUDA supports it."
    )
    gradient_checkpointing: Literal["auto", "on", "off"] = Field(
        default="auto", description="Recompute activations to save memory; auto: on with CUDA."
    )
    save_steps: int = Field(
        default=50, ge=1, description="Checkpoint to the store every N optimizer steps."
    )
    logging_steps: int = Field(default=5, ge=1, description="Log the loss every N steps.")
    merge_adapter: bool = Field(
        default=False, description="Also save the base model with the adapter merged in."
    )
    report_to: list[str] = Field(
        default=["none"],
        description=(
            "Experiment tracking, passed to TRL (TrainingArguments.report_to): none, "
            "tensorboard (event files stored under runs/ID/train/tensorboard/), wandb or "
            "mlflow (configured by their own environment variables); one name or a list."
        ),
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to(cls, value: Any) -> Any:
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"must be one of {list(REPORT_TO)} or a list of them")
        bad = [n for n in names if n not in REPORT_TO]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a tracker (allowed: {list(REPORT_TO)})")
        if "none" in names and len(names) > 1:
            raise ValueError("'none' cannot be combined with a tracker")
        return names or ["none"]

    @property
    def trackers(self) -> list[str]:
        """The trackers to report to ([] for none)."""
        return [n for n in self.report_to if n != "none"]


class EvaluateConfig(Section):
    batch_size: int = Field(default=16, ge=1, description="Questions per generate() call.")
    max_new_tokens: int = Field(default=16, ge=1, description="Answers are short: tokens.")
    formats: list[Literal["sequence", "grid", "pic_in_pic"]] = Field(
        default=["sequence", "grid", "pic_in_pic"],
        description="Multi-image formats built from every held-out sample.",
    )
    single_image: bool = Field(
        default=True, description="Also ask each held-out question about its image alone."
    )
    compare_base: bool = Field(
        default=True, description="Evaluate the base model too, on identical inputs."
    )
