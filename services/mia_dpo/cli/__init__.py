"""The `mia-dpo` command line, and the composition root: the one place that wires
config, store, queue, launcher and the stage registry together. User mistakes end
in one line on stderr and exit 2; a failed run exits 1."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from mia_dpo import __version__
from mia_dpo.cli import export, pipeline, tools
from mia_dpo.controller import RunFailed
from mia_dpo.errors import TransientStoreError, UserError
from mia_dpo.runtime.launchers import LaunchError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mia-dpo", description="Multi-Image Augmented DPO pipeline.")
    p.add_argument("--version", action="version", version=f"mia-dpo {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    pipeline.add_parsers(sub)
    tools.add_parsers(sub)
    export.add_parsers(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.fn(args))
    except UserError as e:
        print(f"mia-dpo: error: {e}", file=sys.stderr)
        return 2
    except (RunFailed, LaunchError) as e:
        print(f"mia-dpo: run failed: {e}", file=sys.stderr)
        return 1
    except TransientStoreError as e:
        print(f"mia-dpo: store unreachable: {e}", file=sys.stderr)
        return 1
