"""Print (or check) the README's configuration table from the pydantic models.

    python tools/config_reference.py            # print the table
    python tools/config_reference.py --write    # replace it in README.md

The table lists every field with its default and description; credentials are
left out (they come from the environment only).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "services"))

from mia_dpo.config import RunConfig

README = Path(__file__).resolve().parents[1] / "README.md"
HEADER = "| key | default | meaning |\n|---|---|---|\n"


def rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    out: list[str] = []
    for name, field in model.model_fields.items():
        if field.exclude:  # credentials: environment only
            continue
        ann: Any = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += rows(ann, f"{prefix}{name}.")
            continue
        default = field.get_default(call_default_factory=True)
        desc = (field.description or "").replace("|", "\\|")
        out.append(f"| `{prefix}{name}` | `{default!r}` | {desc} |")
    return out


def table() -> str:
    return HEADER + "\n".join(rows(RunConfig)) + "\n"


def replace_in(text: str) -> str:
    start = text.index(HEADER)
    end = text.index("\n\n", start)
    return text[:start] + table().rstrip("\n") + text[end:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="update README.md in place")
    args = ap.parse_args()
    if args.write:
        README.write_text(replace_in(README.read_text(encoding="utf-8")), encoding="utf-8")
    else:
        sys.stdout.write(table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
