"""The README's configuration table is the pydantic models' own: regenerate it with
`python tools/config_reference.py --write` after changing config.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_config_table_matches_the_models() -> None:
    spec = importlib.util.spec_from_file_location(
        "config_reference", ROOT / "tools/config_reference.py"
    )
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert mod.table() in readme, (
        "README config table is stale: python tools/config_reference.py --write"
    )
    assert "`launcher.kubernetes.cleanup`" in mod.table()
