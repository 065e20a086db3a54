"""The demo's run config: the packaged `demo.yaml` (embedded default: local files,
in-process queue, worker threads, the tiny base model) with its paths in one folder."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from mia_dpo.config import RunConfig, load_config

RUN_ID = "demo"


def demo_config(folder: Path) -> RunConfig:
    """The packaged demo config with its paths under `folder` (kept as given, so a
    relative folder gives the same record URIs wherever the repository lives)."""
    with resources.as_file(resources.files("mia_dpo.demo") / "demo.yaml") as path:
        return load_config(
            path,
            overrides={
                "input.path": f"{folder}/source/data.json",
                "input.image_root": f"{folder}/source/images",
                "store.root": f"{folder}/store",
                "model.path": f"{folder}/base",
            },
        )
