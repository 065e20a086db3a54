"""`mia-dpo export`: a finished run's pairs (`--format trl|llamafactory|hf`) or its
adapter (`--adapter`) as a local folder, optionally pushed to the Hugging Face hub."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mia_dpo.cli.common import add_run_id, run_id_arg
from mia_dpo.config import load_config
from mia_dpo.errors import UserError

FORMATS_HELP = "trl | llamafactory | hf"


def _check_args(args: argparse.Namespace) -> None:
    """Argument combinations, each refused in one line (argparse's own errors print
    the usage too)."""
    if args.adapter and args.format:
        raise UserError("export: --adapter and --format exclude each other; export one at a time")
    if not args.adapter and not args.format:
        raise UserError(f"export: say what to export: --format {FORMATS_HELP} (pairs) or --adapter")
    if args.merged and not args.adapter:
        raise UserError("export: --merged applies to --adapter only")
    if args.adapter and args.force:
        raise UserError("export: --force applies to pairs; --adapter needs a new or empty --out")
    if args.adapter and args.license:
        raise UserError("export: --license applies to pairs (the adapter's: model.license)")


def cmd_export(args: argparse.Namespace) -> int:
    from mia_dpo.export.common import need_package
    from mia_dpo.export.hub import check_repo, push_folder
    from mia_dpo.runtime.store import BlobReader, open_store

    _check_args(args)
    if args.format:
        from mia_dpo.export.pairs import check_format

        check_format(args.format)
        if args.format == "hf":
            need_package("datasets", "export --format hf")
    if args.push_to_hub:
        check_repo(args.push_to_hub)
        need_package("huggingface_hub", "--push-to-hub")
    cfg = load_config(args.config)
    run_id = run_id_arg(args, cfg)
    store = open_store(cfg.store)
    out = Path(args.out)
    if args.adapter:
        from mia_dpo.export.adapter import export_adapter

        folder = export_adapter(cfg, run_id, store, out, args.merged)
        print(f"adapter of run {run_id} -> {folder}")
        repo_type = "model"
    else:
        from mia_dpo.export.pairs import export_pairs

        m = export_pairs(
            BlobReader(cfg.store), store, run_id, out, args.format, force=args.force,
            license=args.license or "other",
        )  # fmt: skip
        per = ", ".join(f"{f} {n}" for f, n in m.per_format.items())
        print(f"{m.pairs} pairs ({per}), {m.images} images -> {out} ({args.format})")
        folder, repo_type = out, "dataset"
    if args.push_to_hub:  # after the folder is complete: a failed push loses nothing
        url = push_folder(folder, args.push_to_hub, repo_type)
        print(f"pushed -> {url}")
    return 0


def add_parsers(sub: Any) -> None:
    e = sub.add_parser(
        "export",
        help="a run's pairs (--format) or adapter (--adapter) as a folder, optionally pushed",
        description="Export a finished run: its preference pairs in a trainer's format, or "
        "its trained adapter with a model card. Details: docs/export.md.",
    )
    e.add_argument("--format", help=f"pairs format: {FORMATS_HELP}")
    e.add_argument("--adapter", action="store_true", help="export the trained adapter instead")
    e.add_argument("--merged", action="store_true", help="with --adapter: merged weights too")
    e.add_argument("--out", required=True, help="folder to write (new or empty)")
    add_run_id(e)
    e.add_argument("--config", help="config YAML of the run (connections)")
    e.add_argument("--force", action="store_true", help="replace an earlier export in --out")
    e.add_argument("--license", help="dataset card license of the pairs (default: other)")
    e.add_argument("--push-to-hub", metavar="REPO", help="then upload to this hub repo (HF_TOKEN)")
    e.set_defaults(fn=cmd_export)
