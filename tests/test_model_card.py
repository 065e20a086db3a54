"""The adapter's model card from hand-built records: every number comes from them,
the YAML header is what the hub reads, and missing records say so."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from mia_dpo.calibration import Calibration, CellCalibration
from mia_dpo.model_card import CardRecords, read_records, render_card, with_base_model, write_card
from mia_dpo.records import ShardStats
from mia_dpo.runtime.store import LocalStore

PATTERN = r"(?:.*\.)?language_model\.(?:.*\.)?layers\.\d+\.(?:mlp\.up_proj|self_attn\.q_proj)"


def metadata(**extra: Any) -> dict[str, Any]:
    meta = {
        "method": "dpo",
        "base_model": "/models/llava-7b",
        "base_model_hub_id": "llava-hf/llava-1.5-7b-hf",
        "license": "llama2",
        "pairs": {
            "count": 137,
            "per_format": {"sequence": 61, "grid": 43, "pic_in_pic": 33},
            "mean_ratio": 0.3125,
            "mean_ppl": 1.875,
            "read": 140,
            "dropped": {"image_missing": 3},
        },
        "stage_params": {
            "seed": 17,
            "select": {"strategy": "random_wrong", "metrics": ["ppl"], "iqr_multiplier": 2.5},
            "score": {"thresholds": "calibrated", "layer": "auto"},
            "train": {
                "method": "dpo",
                "beta": 0.25,
                "loss_type": "sigmoid",
                "sft_weight": 0.0,
                "lora_r": 64,
                "lora_alpha": 96,
                "lora_dropout": 0.07,
                "learning_rate": 3e-5,
                "lr_scheduler": "cosine",
                "epochs": 2.0,
                "batch_size": 3,
                "gradient_accumulation_steps": 5,
                "max_length": 2048,
            },
        },
        "versions": {"trl": "9.8.7", "peft": "6.5.4", "transformers": "3.2.1"},
        "lora_target_modules": ["a", "b"],
        "lora_target_pattern": PATTERN,
        "lora_target_count": 224,
        "world_size": 4,
        "steps": 91,
        "final_loss": 0.4321,
        "train_loss": 0.55,
    }
    return meta | extra


def calibration() -> Calibration:
    cell = CellCalibration(
        format="grid", n_images=3, n_right=21, n_wrong=13, auc_by_layer=[0.6, 0.7],
        auc=0.7312, threshold=0.4567, threshold_from="quantile",
    )  # fmt: skip
    return Calibration(
        layers=[11, 12], layer_from="best_auc", auc=0.6789, auc_by_layer=[0.6, 0.65],
        band_auc={"11-12": 0.6789}, best_layers=[11, 12], best_auc=0.6789, separates=True,
        auc_floor=0.6, quantile=0.5, n_answers=345, n_right=200, n_wrong=145, n_unknown=0,
        cells=[cell],
    )  # fmt: skip


REPORT_MD = """# Evaluation on the held-out benchmark

- items: 412 (sha256 abcdef012345)

| cell | n | base | adapted | delta | 95 % interval |
|---|---|---|---|---|---|
| multi-image (all) | 300 | 0.410 | 0.457 | +0.047 | [+0.010, +0.080] |
"""


def front_matter(card: str) -> dict[str, Any]:
    m = re.match(r"---\n(.*?)\n---\n", card, flags=re.S)
    assert m
    return yaml.safe_load(m.group(1))


def test_card_holds_the_numbers_of_its_records() -> None:
    records = CardRecords(
        run_id="run-42",
        metadata=metadata(),
        select=ShardStats(stage="select", shard=0, total=151, kept=137, dropped={"ppl": 14}),
        calibration=calibration(),
        evaluation=REPORT_MD,
    )
    card = render_card(records)
    assert front_matter(card) == {
        "base_model": "llava-hf/llava-1.5-7b-hf",
        "library_name": "peft",
        "license": "llama2",
        "pipeline_tag": "image-text-to-text",
        "tags": ["dpo", "lora", "mia-dpo", "trl"],
    }
    for line in (
        "| grid | 43 |", "| pic_in_pic | 33 |", "| sequence | 61 |",
        "137 pairs trained on (140 read; dropped: image_missing 3).",
        "- strategy: `random_wrong`; attention thresholds: `calibrated`; score layer: `auto`",
        "- select stage: 151 pairs in, 137 kept (ppl 14)",
        "outliers of ppl outside 2.5 x IQR",
        "Layer (band) `11-12` (best_auc), pooled AUC 0.6789",
        "| grid | 3 | 21 | 13 | 0.7312 | 0.4567 | quantile |",
        "| multi-image (all) | 300 | 0.410 | 0.457 | +0.047 | [+0.010, +0.080] |",
        "- items: 412",
        "| beta | 0.25 |", "| LoRA r / alpha / dropout | 64 / 96 / 0.07 |",
        "| learning rate | 3e-05 (cosine) |", "| epochs | 2 |",
        "| batch | 3 per device x 5 accumulated x 4 processes |",
        "| steps | 91 |", "| final loss | 0.4321 |", "| seed | 17 |",
        "| trl | 9.8.7 |", "| peft | 6.5.4 |", "(224 modules)",
        "`llama2`: the adapter is a derivative of the base model",
        'from_pretrained("llava-hf/llava-1.5-7b-hf")', "run `run-42`",
    ):  # fmt: skip
        assert line in card, line
    # The regex's alternation is escaped, so the table row stays one row of two cells.
    row = next(x for x in card.splitlines() if x.startswith("| LoRA targets |"))
    assert row.count(" | ") == 1 and r"mlp\.up_proj\|self_attn" in row
    assert "Not evaluated" not in card and "No calibration" not in card
    assert "# Evaluation on the held-out benchmark" not in card  # its title, not the card's
    assert "Per format" not in card
    per_format = calibration().model_copy(
        update={"format_layers": {"sequence": [1], "grid": [11, 12]},
                "format_auc": {"sequence": 0.8812, "grid": None}}
    )  # fmt: skip
    card = render_card(records.model_copy(update={"calibration": per_format}))
    assert "Per format: sequence layer `1` (AUC 0.8812); grid layer `11-12` (AUC -)." in card


def test_missing_records_are_said_not_invented() -> None:
    card = render_card(
        CardRecords(metadata=metadata(base_model_hub_id=None, license=None, method="sft"))
    )
    head = front_matter(card)
    assert "base_model" not in head and head["license"] == "other"
    assert "a local model (`/models/llava-7b`)" in card and "model.hub_id" in card
    assert "Not evaluated: the run's evaluate stage has not run." in card
    assert "No calibration" in card and "select stage:" not in card
    assert "a standalone `mia-dpo train`" in card
    assert "| beta |" not in card  # an SFT recipe has no DPO beta


def test_write_card_reads_the_store_and_puts_readme(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_json("runs/r9/train/metadata.json", metadata(steps=5))
    text = write_card(store, "r9", "runs/r9/train/")
    assert store.get_text("runs/r9/train/adapter/README.md") == text
    assert "| steps | 5 |" in text and "Not evaluated" in text
    store.put_text("runs/r9/evaluate/report.md", REPORT_MD)
    store.put_json(
        "runs/r9/select/stats.json",
        ShardStats(stage="select", shard=0, total=9, kept=8).model_dump(),
    )
    store.put_text("runs/r9/calibrate/calibration.json", calibration().model_dump_json())
    records = read_records(store, "r9", "runs/r9/train/")
    assert records.select is not None and records.select.kept == 8
    assert records.calibration == calibration() and records.evaluation == REPORT_MD
    assert "| multi-image (all) | 300 |" in write_card(store, "r9", "runs/r9/train/")


@pytest.mark.parametrize("hub_id", ["owner/model", None])
def test_with_base_model_names_the_hub_id_when_known(hub_id: str | None) -> None:
    original = json.dumps({"base_model_name_or_path": "/pod/model", "r": 8})
    config = json.loads(with_base_model(original, hub_id))
    assert config == {"base_model_name_or_path": hub_id or "/pod/model", "r": 8}
