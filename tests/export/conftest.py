from __future__ import annotations

from pathlib import Path

import pytest

from mia_dpo.config import RunConfig
from mia_dpo.runtime.store import LocalStore
from tests.export.runs import build_run


@pytest.fixture
def run_store(tmp_path: Path) -> tuple[LocalStore, RunConfig]:
    """A local store holding run `exp` with a finished select stage."""
    store = LocalStore(tmp_path / "store")
    return store, build_run(store, "exp")
