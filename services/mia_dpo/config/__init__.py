"""Run configuration: one YAML file, pydantic models, environment overrides.

- `method` and `model`: the sections that decide a run's outputs (input, augment,
  score, calibrate, select; model, generate, train, evaluate), with the paper's
  constants as defaults;
- `connections`: store, queue and launcher, and the environment variables that set
  them and carry the credentials;
- `run`: `RunConfig`, which holds them all, and `load_config`.

Import from here (`from mia_dpo.config import RunConfig`); the submodules are layout.
"""

from mia_dpo.config.base import Section
from mia_dpo.config.connections import (
    ENV_OVERRIDES,
    SECRET_FIELDS,
    KubernetesLauncherConfig,
    LauncherConfig,
    QueueConfig,
    StoreConfig,
)
from mia_dpo.config.method import (
    GRID_COUNTS,
    SEQUENCE_COUNTS,
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
from mia_dpo.config.run import RunConfig, format_validation_error, load_config

__all__ = [
    "ENV_OVERRIDES",
    "GRID_COUNTS",
    "SECRET_FIELDS",
    "SEQUENCE_COUNTS",
    "AugmentConfig",
    "CalibrateConfig",
    "EvaluateConfig",
    "GenerateConfig",
    "InputConfig",
    "KubernetesLauncherConfig",
    "LauncherConfig",
    "ModelConfig",
    "QueueConfig",
    "RunConfig",
    "ScoreConfig",
    "Section",
    "SelectConfig",
    "StoreConfig",
    "TrainConfig",
    "format_validation_error",
    "load_config",
]
