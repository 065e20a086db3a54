"""The stages, by name. A stage never imports another stage; shared model-input
helpers live in `stages.model_inputs`.

`get_stage` is the resolver the CLI hands to the runtime (workers, the inline
launcher): import paths, so a worker imports only its own stage (the augment worker
has no torch).
"""

from __future__ import annotations

import importlib

from mia_dpo.runtime.context import StageFn

_STAGES: dict[str, str] = {
    "augment": "mia_dpo.stages.augment:run_shard",
    "generate": "mia_dpo.stages.generate:run_shard",
    "calibrate": "mia_dpo.stages.calibrate:run_shard",
    "score": "mia_dpo.stages.score:run_shard",
    "select": "mia_dpo.stages.select:run_shard",
    "train": "mia_dpo.stages.train:run_shard",
    "evaluate": "mia_dpo.stages.evaluate:run_shard",
}


def get_stage(name: str) -> StageFn:
    try:
        module, attr = _STAGES[name].split(":")
    except KeyError:
        raise ValueError(f"unknown stage {name!r} (known: {', '.join(_STAGES)})") from None
    return getattr(importlib.import_module(module), attr)
