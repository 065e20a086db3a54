"""The example configs in configs/ are valid run configs for a model type that runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from mia_dpo.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_example_configs() -> None:
    assert {p.name for p in CONFIGS} >= {
        "llava-1.5-7b.yaml", "llava-interleave-qwen-7b.yaml", "llava-onevision-qwen2-7b.yaml",
        "qwen2.5-vl-7b.yaml", "smolvlm-instruct.yaml", "gemma-3-4b-it.yaml", "internvl3-8b.yaml",
    }  # fmt: skip


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_loads(path: Path) -> None:
    cfg = load_config(path, environ={})
    assert cfg.model.path.split("/")[0] in {
        "llava-hf", "Qwen", "HuggingFaceTB", "google", "OpenGVLab"
    }  # fmt: skip
    assert cfg.model.dtype == "bfloat16" and cfg.input.path.endswith(".json")
    # the paper's global batch of 64 on one GPU
    assert cfg.train.batch_size * cfg.train.gradient_accumulation_steps == 64
    assert (cfg.train.lora_r, cfg.train.beta, cfg.train.learning_rate) == (128, 0.1, 5e-5)
