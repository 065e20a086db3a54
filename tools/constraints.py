"""constraints.txt: the exact versions CI tested, which every install uses.

    python tools/constraints.py --write   # pin what this venv has (after a green CI)
    python tools/constraints.py --check   # exit 1 if this venv differs from the pins

The Makefile and both Docker images install with `-c constraints.txt`; pyproject.toml
keeps ranges (the floors the code needs), this file keeps the tested point.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PATH = ROOT / "constraints.txt"
HEADER = """\
# What CI tested: every package of the dev venv (make .venv), pinned. The Makefile and
# both Docker images install with -c constraints.txt, so a fresh clone in a year gets
# these versions. Regenerate after an upgrade that passed CI: make constraints
# torch: one version for the CPU and the CUDA builds (== ignores the +cpu label).
"""
SELF = "mia-dpo"
# the venv's own tools, not dependencies: a Docker venv brings its own
TOOLS = {"pip", "setuptools", "wheel"}


def installed() -> dict[str, str]:
    """name -> version of this environment, local labels (+cpu) dropped."""
    out = {}
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name != SELF and name not in TOOLS:
            out[name] = Version(dist.version).public
    return dict(sorted(out.items()))


def pinned(path: Path = PATH) -> dict[str, str]:
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    have = installed()
    if args.write:
        body = "".join(f"{n}=={v}\n" for n, v in have.items())
        PATH.write_text(HEADER + body, encoding="utf-8")
        print(f"{len(have)} pins -> {PATH}")
        return 0
    pins = pinned()
    diff = sorted(
        f"{n}: installed {have.get(n, 'none')}, pinned {pins.get(n, 'none')}"
        for n in set(have) | set(pins)
        if have.get(n) != pins.get(n)
    )
    for line in diff:
        print(line)
    if args.check and diff:
        print(f"{len(diff)} packages differ from constraints.txt", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
