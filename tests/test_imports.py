"""The package's dependencies point one way (docs/architecture.md, "Dependency rule").

Parses every module under services/mia_dpo (imports inside functions count too:
a lazy import is still a dependency) and fails on:
- an import a unit's layer does not allow (the table below, no exceptions list);
- a stage module importing another stage (only the shared `stages.model_inputs`);
- a stage reaching into the runtime beyond the stage contract (context, store, layout);
- any cycle, between units or between modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "services" / "mia_dpo"

CORE = {"mia_dpo", "errors", "records", "answers", "prompts", "extras", "config"}
# unit -> the units it may import (besides itself). cli is the composition root.
ALLOWED: dict[str, set[str]] = {
    "mia_dpo": set(),
    "errors": set(),
    "records": {"errors"},
    "answers": set(),
    "prompts": {"records"},
    "extras": {"errors"},
    "config": {"errors", "records"},
    # numpy-only leaves: the light image (select, status, report) reads them without torch
    "calibration": CORE,
    "calibration_plot": CORE | {"calibration"},  # Pillow, no torch: the same light image
    "paired": set(),
    "runtime": CORE,
    "data": CORE,
    "augmentation": CORE | {"data"},
    "models": CORE | {"data"},
    "training": CORE | {"data", "models", "runtime"},
    "evaluation": CORE | {"data", "models", "paired"},
    # the adapter's model card: light (no torch), shared by train, evaluate and export
    "model_card": CORE | {"runtime", "calibration"},
    "stages": CORE
    | {"data", "models", "augmentation", "training", "evaluation", "runtime", "calibration"}
    | {"model_card", "calibration_plot"},
    # run exports: pairs for other trainers, the adapter (export.adapter) ready to share
    "export": CORE | {"data", "models", "runtime", "model_card"},
    "demo": CORE | {"data", "models", "calibration"},
    "controller": CORE | {"data", "runtime"},
    "status": CORE | {"runtime", "controller", "calibration"},
    "retry": CORE | {"runtime"},
    "report": CORE | {"data", "runtime"},
    "report_html": CORE | {"data", "runtime", "calibration"},
    "cli": CORE
    | {"data", "models", "augmentation", "training", "evaluation", "runtime", "stages"}
    | {"demo", "controller", "status", "retry", "report", "report_html", "calibration"}
    | {"export", "model_card"},
    "__main__": {"cli"},
}
STAGE_CONTRACT = {"mia_dpo.runtime.context", "mia_dpo.runtime.store", "mia_dpo.runtime.layout"}
STAGE_SHARED = {"mia_dpo.stages", "mia_dpo.stages.model_inputs"}


def module_name(path: Path) -> str:
    parts = ["mia_dpo", *path.relative_to(PKG).with_suffix("").parts]
    return ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "mia_dpo"


def imports(module: str) -> set[str]:
    """The mia_dpo modules `module` imports, anywhere in its body."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names
            ]
        else:
            continue
        for name in names:
            while name and name not in MODULES:  # `import mia_dpo.x.y` -> the module file
                name = name.rpartition(".")[0]
            if name.startswith("mia_dpo") and name != module:
                found.add(name)
    return found


GRAPH = {m: imports(m) for m in MODULES}


def test_the_table_covers_every_unit() -> None:
    assert {unit(m) for m in MODULES} <= set(ALLOWED), "a new unit needs its row in ALLOWED"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_follow_the_layers(module: str) -> None:
    src = unit(module)
    bad = sorted(d for d in GRAPH[module] if unit(d) != src and unit(d) not in ALLOWED[src])
    assert not bad, f"{module} ({src}) may not import {bad}"
    if src == "stages":
        other_stages = sorted(
            d for d in GRAPH[module] if unit(d) == "stages" and d not in STAGE_SHARED
        )
        assert not other_stages, f"{module}: a stage never imports another stage: {other_stages}"
        runtime = sorted(d for d in GRAPH[module] if unit(d) == "runtime")
        assert set(runtime) <= STAGE_CONTRACT, f"{module}: beyond the stage contract: {runtime}"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                return [*stack[stack.index(d) :], d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_no_module_cycle() -> None:
    cycle = _cycle(GRAPH)
    assert cycle is None, " -> ".join(cycle or [])


def test_no_unit_cycle() -> None:
    units: dict[str, set[str]] = {}
    for m, deps in GRAPH.items():
        units.setdefault(unit(m), set()).update(unit(d) for d in deps if unit(d) != unit(m))
    cycle = _cycle(units)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_checker_sees_lazy_and_cyclic_imports() -> None:
    """The checker itself: a function-level import counts, and a cycle is found."""
    assert "mia_dpo.demo.base_model" in GRAPH["mia_dpo.cli.demo"]  # imported inside a function
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
