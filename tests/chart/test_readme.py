"""charts/mia-dpo/README.md: generated from values.yaml's `# --` comments by
hack/gen_readme.py, complete, and never stale."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from tests.chart.chart import CHART

GEN = CHART / "hack" / "gen_readme.py"


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_readme", GEN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def test_committed_readme_is_generated(gen: ModuleType) -> None:
    committed = (CHART / "README.md").read_text(encoding="utf-8")
    assert committed == gen.render(), (
        "charts/mia-dpo/README.md is stale: run .venv/bin/python charts/mia-dpo/hack/gen_readme.py"
    )


def test_check_flags_a_stale_readme(gen: ModuleType, tmp_path: Path, monkeypatch) -> None:
    stale = tmp_path / "README.md"
    stale.write_text("old\n")
    monkeypatch.setattr(gen, "OUTPUT", stale)
    assert gen.main(["--check"]) == 1
    assert gen.main([]) == 0 and gen.main(["--check"]) == 0
    assert stale.read_text() == gen.render()


def test_every_top_level_value_and_operator_setting_has_a_row(gen: ModuleType) -> None:
    rows = {r.key: r for r in gen.rows()}
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    missing = [k for k in values if k not in rows and k != "config"]
    assert not missing, f"values without a `# --` comment: {missing}"
    for key in ("priorityClassName", "runtimeClassName", "jobLabels", "jobAnnotations",
                "podLabels", "podAnnotations", "imagePullSecrets", "hfToken.existingSecret",
                "hfToken.key", "modelCache.enabled", "modelCache.existingClaim",
                "modelCache.accessModes", "modelCache.readOnly", "networkPolicy.allowHub",
                "networkPolicy.hub.cidrs", "s3.minio.persistence.enabled",
                "controller.priorityClassName", "train.jobLabels", "generate.podAnnotations",
                "config.model.path", "redis.existingSecret"):  # fmt: skip
        assert key in rows, key
    assert rows["modelCache.accessModes"].default == '`["ReadWriteMany"]`'
    assert rows["s3.minio.persistence.enabled"].default == "`true`"
    assert rows["train.activeDeadlineSeconds"].type == "integer or null"  # from the schema
    assert "kueue.x-k8s.io/queue-name" in rows["jobLabels"].description
    readme = (CHART / "README.md").read_text()
    recipes = ("Kueue", "Priority and runtime", "Model cache", "Hub access",
               "Secrets under GitOps", "Uninstall and what stays", "demo-values.yaml")  # fmt: skip
    for recipe in recipes:
        assert recipe in readme, recipe


def test_comment_parsing(gen: ModuleType) -> None:
    text = """\
# A plain comment: not documentation.
plain: 1
# -- The section.
section:
  # -- First line
  # and its continuation.
  leaf: [a]
  undocumented: 2
  # -- Deeper.
  inner:
    # -- Deepest | with a pipe.
    x: null
after: 3
"""
    assert gen.documented(text) == [
        ("section", "The section."),
        ("section.leaf", "First line and its continuation."),
        ("section.inner", "Deeper."),
        ("section.inner.x", "Deepest | with a pipe."),
    ]
    assert gen.cell("a | b") == "a \\| b"
