"""The adapter's model card (README.md): what a person or the hub needs to use and
judge the adapter, rendered from the run's records in the store.

Light on purpose (no torch): the train stage writes the card into `adapter/`, the
evaluate stage rewrites it once the evaluation table exists, and `mia-dpo export
--adapter` renders it afresh; all three share this module (stages never import each
other).

Sources, all optional but the train metadata:

    runs/R/train/metadata.json       recipe, pairs per format, versions, base model
    runs/R/select/stats.json         what post-selection kept and dropped
    runs/R/calibrate/calibration.json  layer, AUC and thresholds, when the run calibrated
    runs/R/evaluate/report.md        the before / after table, when evaluate has run
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from mia_dpo.calibration import Calibration, band_name
from mia_dpo.errors import NotFound
from mia_dpo.records import ShardStats
from mia_dpo.runtime import layout
from mia_dpo.runtime.store import Store

TAGS = ["dpo", "lora", "mia-dpo", "trl"]
CARD_NAME = "README.md"


class CardRecords(BaseModel):
    """Everything the card is rendered from."""

    model_config = ConfigDict(extra="forbid")
    run_id: str | None = Field(default=None, description="None: a standalone `mia-dpo train`.")
    metadata: dict[str, Any] = Field(description="The train stage's metadata.json.")
    select: ShardStats | None = Field(default=None, description="select/stats.json.")
    calibration: Calibration | None = Field(default=None, description="calibration.json.")
    evaluation: str | None = Field(default=None, description="evaluate/report.md.")


def read_records(
    store: Store, run_id: str | None, prefix: str, metadata: dict[str, Any] | None = None
) -> CardRecords:
    """The card's records of a run (or of a standalone train folder, `prefix` ""):
    `metadata` when given (the train stage, before it stores it), else metadata.json."""
    if metadata is None:
        metadata = store.get_json(layout.train_metadata_key(prefix))
    records = CardRecords(run_id=run_id, metadata=metadata)
    if run_id is None:
        return records
    with contextlib.suppress(NotFound):
        records.select = ShardStats.model_validate(
            store.get_json(layout.stage_stats_key(run_id, "select"))
        )
    with contextlib.suppress(NotFound):
        records.calibration = Calibration.model_validate_json(
            store.get_text(layout.calibration_key(run_id))
        )
    with contextlib.suppress(NotFound):
        records.evaluation = store.get_text(layout.evaluate_key(run_id, "report.md"))
    return records


def write_card(
    store: Store, run_id: str | None, prefix: str, metadata: dict[str, Any] | None = None
) -> str:
    """Render the card and put it at adapter/README.md; returns its text."""
    text = render_card(read_records(store, run_id, prefix, metadata))
    store.put_text(layout.adapter_prefix(prefix) + CARD_NAME, text)
    return text


def with_base_model(adapter_config: str, hub_id: str | None) -> str:
    """adapter_config.json naming the base by its hub id (PEFT wrote the path the model
    was loaded from, often a pod-local folder); unchanged when the id is not known."""
    if not hub_id:
        return adapter_config
    config = json.loads(adapter_config)
    config["base_model_name_or_path"] = hub_id
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


# --- rendering ----------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value) or "-"
    return str(value)


def _table(heads: list[str], rows: list[list[Any]]) -> list[str]:
    return [
        "| " + " | ".join(heads) + " |",
        "|" + "|".join("---" for _ in heads) + "|",
        # A regex's "|" would end the cell: escaped, it shows as itself.
        *("| " + " | ".join(_fmt(v).replace("|", "\\|") for v in row) + " |" for row in rows),
    ]


def _header(meta: dict[str, Any]) -> list[str]:
    hub_id = meta.get("base_model_hub_id")
    head: dict[str, Any] = {}
    if hub_id:
        head["base_model"] = hub_id
    head["library_name"] = "peft"
    head["license"] = meta.get("license") or "other"
    head["pipeline_tag"] = "image-text-to-text"
    head["tags"] = TAGS
    return ["---", yaml.safe_dump(head, sort_keys=False).rstrip(), "---", ""]


def _base(meta: dict[str, Any]) -> tuple[str, list[str]]:
    hub_id, path = meta.get("base_model_hub_id"), meta.get("base_model")
    if hub_id:
        return hub_id, [f"Base model: [`{hub_id}`](https://huggingface.co/{hub_id})."]
    return "BASE_MODEL", [
        f"Base model: a local model (`{path}`); its hub id is not known. Set `model.hub_id` "
        "in the run config to name it here and in adapter_config.json.",
    ]


def _usage(base: str) -> list[str]:
    return [
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        "",
        f'base = AutoModelForImageTextToText.from_pretrained("{base}")',
        'model = PeftModel.from_pretrained(base, "path/to/this/adapter")',
        'processor = AutoProcessor.from_pretrained("path/to/this/adapter")',
        "```",
        "",
    ]


def _data(meta: dict[str, Any]) -> list[str]:
    pairs = meta.get("pairs", {})
    per_format = pairs.get("per_format", {})
    lines = ["## Training data", ""]
    lines += _table(["format", "pairs"], [[f, n] for f, n in sorted(per_format.items())])
    lines += ["", f"{pairs.get('count', sum(per_format.values()))} pairs trained on"]
    if pairs.get("read") is not None:
        dropped = pairs.get("dropped") or {}
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(dropped.items())) or "none"
        lines[-1] += f" ({pairs['read']} read; dropped: {reasons})"
    lines[-1] += "."
    if pairs.get("mean_ratio") is not None:
        lines.append(
            f"Mean attention ratio of the rejected answers {_fmt(pairs['mean_ratio'])}, "
            f"mean perplexity {_fmt(pairs.get('mean_ppl'))}."
        )
    return [*lines, ""]


def _selection(
    params: dict[str, Any], select: ShardStats | None, cal: Calibration | None
) -> list[str]:
    sel, score = params.get("select", {}), params.get("score", {})
    lines = ["## Selection", ""]
    lines.append(
        f"- strategy: `{sel.get('strategy', 'attention')}`; attention thresholds: "
        f"`{score.get('thresholds', 'paper')}`; score layer: `{score.get('layer') or 'middle'}`"
    )
    if sel.get("metrics") is not None:
        lines.append(
            f"- post-selection: outliers of {_fmt(sel['metrics'])} outside "
            f"{_fmt(sel.get('iqr_multiplier'))} x IQR dropped"
        )
    if select is not None:
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(select.dropped.items())) or "none"
        lines.append(f"- select stage: {select.total} pairs in, {select.kept} kept ({reasons})")
    lines.append("")
    if cal is None:
        return [*lines, "No calibration: the run used fixed thresholds.", ""]
    band = band_name(cal.layers) if cal.layers else "-"
    verdict = "separates" if cal.separates else "near chance (below the floor)"
    lines += [
        "### Calibration",
        "",
        f"Layer (band) `{band}` ({cal.layer_from}), pooled AUC {_fmt(cal.auc)}; best AUC "
        f"{_fmt(cal.best_auc)}, floor {_fmt(cal.auc_floor)}: {verdict}. {cal.n_answers} "
        f"answers ({cal.n_right} right, {cal.n_wrong} wrong); thresholds at the "
        f"{_fmt(cal.quantile)} quantile of the right answers' ratios.",
        "",
    ]
    if cal.format_layers:  # calibrate.layer_per format
        lines[-1:-1] = [
            "Per format: "
            + "; ".join(
                f"{fmt} layer `{band_name(b)}` (AUC {_fmt(cal.format_auc.get(fmt))})"
                for fmt, b in cal.format_layers.items()
            )
            + ".",
            "",
        ]
    rows = [
        [c.format, c.n_images, c.n_right, c.n_wrong, c.auc, c.threshold, c.threshold_from]
        for c in cal.cells
    ]
    heads = ["format", "images", "right", "wrong", "AUC", "threshold", "from"]
    return [*lines, *_table(heads, rows), ""]


def _evaluation(report: str | None) -> list[str]:
    lines = ["## Evaluation", ""]
    if report is None:
        return [*lines, "Not evaluated: the run's evaluate stage has not run.", ""]
    # report.md opens with its own title; the card has its own heading levels.
    body = [line for line in report.splitlines() if not line.startswith("# ")]
    return [*lines, *body, ""]


def _recipe(meta: dict[str, Any]) -> list[str]:
    t = meta.get("stage_params", {}).get("train", {})
    method = meta.get("method", t.get("method"))
    targets = meta.get("lora_target_pattern") or meta.get("lora_target_modules")
    rows = [
        ["method", method],
        *([["beta", t.get("beta")], ["loss", t.get("loss_type")]] if method == "dpo" else []),
        ["SFT weight", t.get("sft_weight")],
        [
            "LoRA r / alpha / dropout",
            f"{t.get('lora_r')} / {t.get('lora_alpha')} / {_fmt(t.get('lora_dropout'))}",
        ],
        ["LoRA targets", f"`{targets}` ({meta.get('lora_target_count', '?')} modules)"],
        ["learning rate", f"{_fmt(t.get('learning_rate'))} ({t.get('lr_scheduler')})"],
        ["epochs", t.get("epochs")],
        [
            "batch",
            f"{t.get('batch_size')} per device x {t.get('gradient_accumulation_steps')} "
            f"accumulated x {meta.get('world_size', 1)} processes",
        ],
        ["max length", t.get("max_length")],
        ["steps", meta.get("steps")],
        ["final loss", meta.get("final_loss")],
        ["mean train loss", meta.get("train_loss")],
        ["seed", meta.get("stage_params", {}).get("seed")],
    ]
    return ["## Training recipe", "", *_table(["setting", "value"], rows), ""]


def render_card(records: CardRecords) -> str:
    meta = records.metadata
    params = meta.get("stage_params", {})
    base, base_lines = _base(meta)
    run = f"run `{records.run_id}`" if records.run_id else "a standalone `mia-dpo train`"
    method = "DPO" if meta.get("method", "dpo") == "dpo" else "SFT on the chosen answers"
    lines = [
        *_header(meta),
        f"# MIA-DPO LoRA adapter for {base if base != 'BASE_MODEL' else 'a local model'}",
        "",
        f"A LoRA adapter trained with {method} on multi-image preference pairs made by "
        f"mia-dpo ({run}): each pair's rejected answer is the model's own answer that looked "
        "at the wrong picture, its chosen answer the ground truth (MIA-DPO, arXiv 2410.17637).",
        "",
        *base_lines,
        "",
        *_usage(base),
        *_data(meta),
        *_selection(params, records.select, records.calibration),
        *_evaluation(records.evaluation),
        *_recipe(meta),
        "## Versions",
        "",
        *_table(["package", "version"], sorted(meta.get("versions", {}).items())),
        "",
        "## License",
        "",
        f"`{meta.get('license') or 'other'}`: the adapter is a derivative of the base model, "
        "whose license and terms of use apply to it as well.",
        "",
    ]
    return "\n".join(lines)
