"""The whole run config: `RunConfig`, `load_config` and its one-line errors.

`load_config` reads the YAML file (or nothing: defaults), applies `--set`-style
dotted overrides, then the environment (connections.ENV_OVERRIDES), and validates;
every problem becomes one `UserError` line, `source: section.field: message`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from mia_dpo.config.base import Section
from mia_dpo.config.connections import (
    LauncherConfig,
    QueueConfig,
    StoreConfig,
    apply_env,
    reject_file_credentials,
)
from mia_dpo.config.method import (
    AugmentConfig,
    CalibrateConfig,
    InputConfig,
    ScoreConfig,
    SelectConfig,
)
from mia_dpo.config.model import (
    EvaluateConfig,
    GenerateConfig,
    ModelConfig,
    TrainConfig,
)
from mia_dpo.errors import UserError
from mia_dpo.records import DEFAULT_STAGES, STAGE_ORDER, StageName


class RunConfig(Section):
    """Everything one run needs. Stored (without credentials) under runs/{run_id}/."""

    run_id: str | None = Field(default=None, description="Run id (null: generated, or --run-id).")
    seed: int = Field(
        default=0, ge=0, description="Run seed; each sample is seeded from (seed, id)."
    )
    stages: list[StageName] = Field(
        default=list(DEFAULT_STAGES),
        description=(
            "Stages to run, in pipeline order. calibrate is added before score when "
            "score.layer is auto or score.thresholds calibrated."
        ),
    )
    input: InputConfig = Field(default_factory=InputConfig, description="Source data to augment.")
    store: StoreConfig = Field(
        default_factory=StoreConfig, description="Where runs keep shards, images and markers."
    )
    queue: QueueConfig = Field(
        default_factory=QueueConfig, description="Task queue of the workers."
    )
    launcher: LauncherConfig = Field(
        default_factory=LauncherConfig, description="How and how many workers are started."
    )
    augment: AugmentConfig = Field(
        default_factory=AugmentConfig, description="Multi-image augmentation (docs/method.md §1)."
    )
    model: ModelConfig = Field(
        default_factory=ModelConfig, description="The policy model that answers and is scored."
    )
    generate: GenerateConfig = Field(
        default_factory=GenerateConfig, description="Generation (docs/method.md §2)."
    )
    score: ScoreConfig = Field(
        default_factory=ScoreConfig, description="Attention-aware selection (docs/method.md §3)."
    )
    calibrate: CalibrateConfig = Field(
        default_factory=CalibrateConfig,
        description="Which layer's attention tells right from wrong answers (calibration.json).",
    )
    select: SelectConfig = Field(
        default_factory=SelectConfig,
        description="Post-selection over all pairs (docs/method.md §4).",
    )
    train: TrainConfig = Field(
        default_factory=TrainConfig, description="DPO with LoRA (docs/method.md §5)."
    )
    evaluate: EvaluateConfig = Field(
        default_factory=EvaluateConfig, description="Multi-image evaluation, before / after."
    )

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.queue.backend == "memory" and self.launcher.kind != "inline":
            raise ValueError(
                f"launcher.kind {self.launcher.kind!r} needs queue.backend 'redis' "
                "(an in-process queue is visible only to inline workers)"
            )
        if (
            self.score.needs_calibration
            and "score" in self.stages
            and "calibrate" not in self.stages
        ):
            # the score stage needs calibration.json; a run resumed from score onwards
            # finds it in the store (calibrate is then already done and skipped)
            self.stages.insert(self.stages.index("score"), "calibrate")
        if self.select.label_balance and self.train.sft_weight <= 0:
            raise ValueError(
                "select: label_balance adds rows that carry only the SFT term; "
                "set train.sft_weight > 0"
            )
        order = [s for s in STAGE_ORDER if s in self.stages]
        if order != list(self.stages):
            raise ValueError(f"stages: must follow pipeline order {list(STAGE_ORDER)}")
        return self

    def stage_params(self) -> dict[str, Any]:
        """The part of the config that decides outputs: a resumed run must not change it."""
        # Batch sizes and the device are how, not what: a run resumed on other
        # hardware may change them (greedy outputs do not depend on them). The hub id and
        # license only label the adapter's card, and tracking only watches training.
        return self.model_dump(
            mode="json",
            include={
                "seed",
                "input",
                "augment",
                "model",
                "generate",
                "score",
                "calibrate",
                "select",
                "train",
                "evaluate",
            },
            exclude={
                "generate": {"batch_size"},
                "score": {"batch_size"},
                "calibrate": {"batch_size"},
                "model": {"device", "hub_id", "license"},
                "train": {"report_to"},
                "evaluate": {"batch_size"},
            },
        )


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line: `source: field.path: message` for every problem."""
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        # A section-level check names its field first ("grid_counts: ..."): fold it
        # into the dotted path so every message reads `section.field: problem`.
        m = re.match(r"^([a-z_]+): (.*)$", msg, flags=re.S)
        if m and e["loc"]:
            loc, msg = f"{loc}.{m.group(1)}", m.group(2)
        problems.append(f"{loc}: {msg}")
    return f"{source}: " + "; ".join(problems)


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> RunConfig:
    """Read the YAML file (or defaults), apply overrides then the environment, validate."""
    environ = dict(os.environ if environ is None else environ)
    source = str(path) if path else "config"
    raw: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"{p}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{p}: not valid YAML: {first}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError(f"{p}: top level must be a mapping, got {type(loaded).__name__}")
        raw = loaded
        reject_file_credentials(raw, str(p))
    for dotted, value in (overrides or {}).items():
        target = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            target = target.setdefault(key, {})
        target[leaf] = value
    apply_env(raw, environ)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise UserError(format_validation_error(e, source)) from None
