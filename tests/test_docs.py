"""The docs stay true to the code and to themselves.

- docs/configuration.md is generated from the config models: after changing a field,
  run `python tools/config_reference.py --write`.
- Every relative link in README.md and docs/*.md points at a file that exists, and a
  `#fragment` at a heading of that file.
"""

from __future__ import annotations

import importlib.util
import re
import unicodedata
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
_CODE_SPAN = re.compile(r"(`+)[^`].*?\1", re.S)
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def _config_reference() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "config_reference", ROOT / "tools/config_reference.py"
    )
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _prose(text: str) -> str:
    """The text without fenced code blocks and code spans (no links live there)."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"[`*]|<[^>]+>", "", heading).strip().lower()
    text = "".join(ch for ch in text if ch in " -_" or unicodedata.category(ch)[0] in ("L", "N"))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in _HEADING.findall(_FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(path: Path) -> list[str]:
    links = _LINK.findall(_prose(path.read_text(encoding="utf-8")))
    return [t for t in links if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]


def test_configuration_page_matches_the_models() -> None:
    mod = _config_reference()
    page = (ROOT / "docs/configuration.md").read_text(encoding="utf-8")
    assert page == mod.render(), (
        "docs/configuration.md is stale: python tools/config_reference.py --write"
    )
    assert "`launcher.kubernetes.cleanup`" in page
    assert "secret_key" not in page.split("## Top level", 1)[1]  # credentials: env only


def test_config_reference_check_exits_1_when_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mod = _config_reference()
    stale = tmp_path / "configuration.md"
    stale.write_text(mod.render() + "\nedited by hand\n", encoding="utf-8")
    monkeypatch.setattr(mod, "PAGE", stale)
    monkeypatch.setattr(mod, "ROOT", tmp_path)
    monkeypatch.setattr("sys.argv", ["config_reference.py", "--check"])
    assert mod.main() == 1
    stale.write_text(mod.render(), encoding="utf-8")
    assert mod.main() == 0


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path) -> None:
    broken = []
    for link in relative_links(doc):
        target, _, fragment = link.partition("#")
        path = (doc.parent / target).resolve() if target else doc
        if not path.exists():
            broken.append(f"{link}: no such file")
        elif fragment and path.suffix == ".md" and fragment not in anchors(path):
            broken.append(f"{link}: no heading #{fragment} in {path.name}")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_docs_folder_is_complete() -> None:
    names = {p.name for p in (ROOT / "docs").glob("*.md")}
    expected = {
        "method.md", "architecture.md", "operations.md", "configuration.md",
        "benchmarks.md", "bad-input.md", "evidence.md",
    }  # fmt: skip
    assert expected <= names
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    unlinked = [n for n in sorted(names) if f"docs/{n}" not in readme]
    assert not unlinked, f"README.md does not link {unlinked}"


def test_method_sections_that_code_cites_exist() -> None:
    """Code comments cite `docs/method.md §N`: the numbered sections must stay put."""
    headings = _HEADING.findall((ROOT / "docs/method.md").read_text(encoding="utf-8"))
    numbered = [h.split(".", 1)[0] for h in headings if re.match(r"\d+\. ", h)]
    assert numbered == [str(n) for n in range(1, 8)]


def test_slug_follows_github() -> None:
    assert slug("3. Attention-aware selection") == "3-attention-aware-selection"
    assert (
        slug("The controller on Kubernetes (`launcher.kind: kubernetes`)")
        == "the-controller-on-kubernetes-launcherkind-kubernetes"
    )
    assert slug("The queue's reliability") == "the-queues-reliability"
    assert slug("## `pic_in_pic` & co.".lstrip("# ")) == "pic_in_pic--co"
