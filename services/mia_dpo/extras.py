"""Optional dependency groups (pyproject extras): a missing one is a one-line error
naming what to install, never a ModuleNotFoundError traceback."""

from __future__ import annotations

import importlib.util

from mia_dpo.errors import UserError

# extra -> the importable packages it brings (the ones our code imports)
EXTRAS: dict[str, tuple[str, ...]] = {
    "model": ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "tokenizers"),
    "kubernetes": ("kubernetes",),
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or blocked install counts as missing
        return False


def missing(extra: str) -> list[str]:
    return [m for m in EXTRAS[extra] if not _installed(m)]


def require(extra: str, what: str) -> None:
    """Raise a UserError naming the extra when one of its packages is not installed."""
    gone = missing(extra)
    if gone:
        raise UserError(
            f"{what} needs the {extra!r} extra ({', '.join(gone)} not installed): "
            f"pip install 'mia-dpo[{extra}]'"
        )
