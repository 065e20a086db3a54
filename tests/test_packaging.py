"""Packaging says what the code needs: every imported package is declared, every
declaration is pinned in constraints.txt within its range, the venv that runs these
tests is exactly constraints.txt, and the demo config ships inside the package."""

from __future__ import annotations

import ast
import importlib.util
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
# import name -> distribution name, where they differ
DIST_OF = {"PIL": "pillow", "yaml": "pyyaml"}


def _load_tool(name: str):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def declared() -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in PYPROJECT["dependencies"]]
    for extra in ("model", "kubernetes"):
        reqs += [Requirement(r) for r in PYPROJECT["optional-dependencies"][extra]]
    return {canonicalize_name(r.name): r for r in reqs}


def third_party_imports() -> set[str]:
    """Top-level names of everything services/mia_dpo imports (also inside functions)."""
    found: set[str] = set()
    for path in (ROOT / "services" / "mia_dpo").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {n for n in found if n not in sys.stdlib_module_names and n != "mia_dpo"}


def test_every_imported_package_is_declared() -> None:
    names = declared()
    imported = third_party_imports()
    missing = sorted(n for n in imported if canonicalize_name(DIST_OF.get(n, n)) not in names)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    assert {"torch", "transformers", "trl", "peft", "datasets", "accelerate"} <= imported


def test_constraints_pin_every_declaration_within_its_range() -> None:
    pins = _load_tool("constraints").pinned()
    for name, req in declared().items():
        assert name in pins, f"{name} is declared but not pinned in constraints.txt"
        assert Version(pins[name]) in req.specifier, f"{name}=={pins[name]} outside {req}"


def test_this_venv_is_what_constraints_txt_pins() -> None:
    mod = _load_tool("constraints")
    have, pins = mod.installed(), mod.pinned()
    diff = {
        n: (have.get(n), pins.get(n)) for n in set(have) | set(pins) if have.get(n) != pins.get(n)
    }
    assert not diff, f"installed vs pinned: {diff} (make constraints after a green upgrade)"


def test_the_demo_config_ships_in_the_package(tmp_path: Path) -> None:
    from mia_dpo.demo.config import demo_config

    cfg = demo_config(tmp_path / "d")
    assert cfg.input.path == f"{tmp_path}/d/source/data.json"
    assert cfg.model.path == f"{tmp_path}/d/base" and cfg.store.root == f"{tmp_path}/d/store"
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "demo/*.yaml" in patterns["package-data"]["mia_dpo"]
