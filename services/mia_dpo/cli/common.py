"""What every command shares: the run id convention, connections, JSON output."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from mia_dpo.config import RunConfig, load_config
from mia_dpo.errors import UserError
from mia_dpo.extras import missing, require
from mia_dpo.records import MODEL_STAGES, check_run_id
from mia_dpo.runtime.queue import Queue
from mia_dpo.runtime.store import Store


def add_run_id(p: argparse.ArgumentParser, required: bool = False, legacy: bool = False) -> None:
    """`--run-id RUN_ID`, the one spelling for every command. `legacy` also accepts the
    old positional form (`status RUN_ID`), with a deprecation line."""
    where = "" if required else " (default: MIA_DPO_RUN_ID, then the config's run_id)"
    p.add_argument("--run-id", dest="run_id", help=f"the run{where}")
    if legacy:
        p.add_argument("legacy_run_id", nargs="?", metavar="RUN_ID", help=argparse.SUPPRESS)
    p.set_defaults(run_id_required=required)


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def run_id_arg(args: argparse.Namespace, cfg: RunConfig, *, generate: bool = False) -> str:
    """--run-id, else MIA_DPO_RUN_ID, else the config's run_id; a time-stamped new one
    when `generate` (a fresh `mia-dpo run`)."""
    legacy = getattr(args, "legacy_run_id", None)
    if legacy:
        print(
            f"mia-dpo: warning: `{args.command} RUN_ID` is deprecated; "
            f"use `{args.command} --run-id {legacy}`",
            file=sys.stderr,
        )
        if args.run_id and args.run_id != legacy:
            raise UserError(f"two run ids: --run-id {args.run_id} and {legacy}")
    run_id = args.run_id or legacy or os.environ.get("MIA_DPO_RUN_ID") or cfg.run_id
    if not run_id:
        if not generate:
            raise UserError(f"{args.command}: --run-id is required (or MIA_DPO_RUN_ID)")
        run_id = time.strftime("run-%Y%m%d-%H%M%S")
    try:
        return check_run_id(run_id)
    except ValueError as e:
        raise UserError(f"--run-id: {e}") from None


def connections(cfg: RunConfig) -> tuple[Store, Queue]:
    from mia_dpo.runtime.queue_factory import open_queue
    from mia_dpo.runtime.store import open_store

    return open_store(cfg.store), open_queue(cfg.queue)


def open_run(args: argparse.Namespace) -> tuple[RunConfig, str, Store, Queue]:
    """Config, run id, store and queue of a command that looks at an existing run."""
    cfg = load_config(args.config)
    run_id = run_id_arg(args, cfg)
    store, queue = connections(cfg)
    return cfg, run_id, store, queue


def require_model_for(stages: list[str], what: str) -> None:
    """The model extra, when this process itself will run a model stage."""
    if any(s in MODEL_STAGES for s in stages):
        require("model", what)


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=1, sort_keys=False))


def run_checks(cfg: RunConfig) -> list[Callable[[RunConfig], None]]:
    """What a run checks before any work. The model self-check (config, processor and a
    two-image probe, no weights) runs where this process or its local workers will load
    the model; on Kubernetes or Compose the controller has no model packages and each
    model worker makes the same check on load, refusing without a retry."""
    local = cfg.launcher.kind in ("inline", "local")
    if local and any(s in MODEL_STAGES for s in cfg.stages) and not missing("model"):
        return [_check_model]
    return []


def _check_model(cfg: RunConfig) -> None:
    from mia_dpo.models.loading import check_model

    check_model(cfg.model)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{r} {n}" for r, n in sorted(counts.items())) or "none"


def print_outcomes(outcomes: list[Any], out: TextIO = sys.stdout) -> None:
    """One line per stage (kept, dropped by reason) and its notes (formats, pairs)."""
    for o in outcomes:
        note = " (already done)" if o.skipped else ""
        print(f"{o.stage}: kept {o.stats.kept} of {o.stats.total}{note}; "
              f"dropped: {_counts(o.stats.dropped)}", file=out)  # fmt: skip
        if o.stats.notes:
            print("  " + _counts(o.stats.notes), file=out)
