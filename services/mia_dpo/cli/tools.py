"""Commands around a run: the demo and its parts (synth, tiny-model, base-model),
standalone training, and the report and contact sheet of a run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mia_dpo.cli.common import add_run_id, open_run
from mia_dpo.config import load_config
from mia_dpo.config.run import format_validation_error
from mia_dpo.errors import UserError
from mia_dpo.extras import require


def cmd_synth(args: argparse.Namespace) -> int:
    from mia_dpo.demo.synthetic import write_synthetic

    path = write_synthetic(Path(args.out), args.n, seed=args.seed)
    print(f"{args.n} samples -> {path} (images under {Path(args.out) / 'images'})")
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    require("model", "tiny-model")
    from mia_dpo.demo.tiny import build_tiny_model

    path = build_tiny_model(Path(args.out), seed=args.seed)
    print(f"tiny LLaVA -> {path}")
    return 0


def cmd_base_model(args: argparse.Namespace) -> int:
    require("model", "base-model")
    from mia_dpo.demo.base_model import REPORT_NAME, ensure_base_model, format_report, read_report
    from mia_dpo.demo.base_recipe import BaseParams

    params: dict[str, Any] = {}
    for item in args.set or []:  # recipe fields beyond the named options, e.g. lr=0.001
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item}: expected FIELD=VALUE")
        params[key] = value
    params |= {"seed": args.seed} | ({"steps": args.steps} if args.steps else {})
    if args.attention_supervision is not None:
        params["attention_supervision"] = args.attention_supervision
    if args.supervised_layer:
        params["supervised_layers"] = tuple(args.supervised_layer)
    try:  # pydantic turns "0.001" into a float, or names the field it cannot
        checked = BaseParams(**params)
        params = {key: getattr(checked, key) for key in params}  # only the fields given
    except ValidationError as e:  # one line naming the option, before any training
        raise UserError(format_validation_error(e, "base-model")) from None
    path = ensure_base_model(Path(args.out), **params)
    report = read_report(path)
    if report is None:  # ensure_base_model has just written it: only a race gets here
        raise UserError(f"{path}: no readable {REPORT_NAME}")
    print(f"base model -> {path}")
    for line in format_report(report):  # trained now or cached: the same figures
        print(line)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    require("model", "train")
    from mia_dpo.stages.train import train_standalone

    if not Path(args.pairs).is_file():
        raise UserError(f"--pairs {args.pairs}: file not found")
    cfg = load_config(args.config, overrides={"model.path": args.model})
    out = train_standalone(Path(args.pairs), args.model, Path(args.out), cfg)
    print(f"adapter -> {out}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    require("model", "calibrate")
    from mia_dpo.calibration import Calibration, format_calibration
    from mia_dpo.runtime import layout
    from mia_dpo.runtime.worker import run_task_directly
    from mia_dpo.stages import get_stage

    cfg, run_id, store, _ = open_run(args)
    if not store.exists(layout.stage_done_key(run_id, "generate")):
        raise UserError(f"calibrate: run {run_id!r} has no finished generate stage to read")
    if args.force:  # measure again (a new slice size, a retrained model...)
        store.delete(layout.marker_key(run_id, "calibrate", 0))
    run_task_directly(cfg, run_id, "calibrate", 0, store, get_stage("calibrate"))
    cal = Calibration.model_validate_json(store.get_text(layout.calibration_key(run_id)))
    if args.json:
        print(cal.model_dump_json(indent=1))
    else:
        print(format_calibration(cal))
        print(f"-> {store.uri(layout.calibration_key(run_id))}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from mia_dpo.report_html import write_report
    from mia_dpo.runtime.store import BlobReader

    cfg, run_id, store, _ = open_run(args)
    path = write_report(store, BlobReader(cfg.store), run_id, Path(args.out))
    print(f"report -> {path}")
    return 0


def cmd_contact_sheet(args: argparse.Namespace) -> int:
    from mia_dpo.report import contact_sheet

    cfg, run_id, store, _ = open_run(args)
    path = contact_sheet(store, cfg, run_id, Path(args.out), per_format=args.per_format)
    print(f"contact sheet -> {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    require("model", "demo")
    from mia_dpo.cli.demo import run_demo

    return run_demo(Path(args.dir), n=args.n, seed=args.seed, quiet=args.quiet, out=sys.stdout)


def add_parsers(sub: Any) -> None:
    d = sub.add_parser(
        "demo", help="the whole pipeline on synthetic data and the tiny built-in model"
    )
    d.add_argument("--dir", default=".demo", help="folder for data, model, store and report")
    d.add_argument("--n", type=int, default=1200, help="synthetic source samples")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    d.set_defaults(fn=cmd_demo)

    y = sub.add_parser("synth", help="write synthetic LLaVA-format data (coloured shapes)")
    y.add_argument("--out", required=True)
    y.add_argument("--n", type=int, default=240)
    y.add_argument("--seed", type=int, default=0)
    y.set_defaults(fn=cmd_synth)

    t = sub.add_parser(
        "tiny-model", help="build a tiny LLaVA (random weights) for tests and the demo"
    )
    t.add_argument("--out", required=True, help="folder to save_pretrained into")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(fn=cmd_tiny_model)

    b = sub.add_parser(
        "base-model",
        help="train the tiny LLaVA on the synthetic questions (cached); print its accuracy "
        "and how well attention tells right from wrong answers",
    )
    b.add_argument("--out", required=True, help="folder to save_pretrained into")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps to stop at; the lr schedule keeps its length "
        "(default: the recipe's 6000)",
    )
    b.add_argument(
        "--attention-supervision",
        type=float,
        default=None,
        metavar="WEIGHT",
        help="weight of the auxiliary loss that puts the answer's attention on the target "
        "image at --supervised-layer (default 5; 0: off)",
    )
    b.add_argument(
        "--supervised-layer",
        type=int,
        action="append",
        metavar="LAYER",
        help="decoder layer the auxiliary loss acts on; repeat for several, averaged (default 1)",
    )
    b.add_argument(
        "--set",
        action="append",
        metavar="FIELD=VALUE",
        help="any other recipe field (BaseParams), repeatable: --set lr=0.001 "
        "--set schedule_steps=4000",
    )
    b.set_defaults(fn=cmd_base_model)

    tr = sub.add_parser("train", help="DPO (or SFT) with LoRA on a pairs file, outside a run")
    tr.add_argument("--pairs", required=True, help="pairs.trl.jsonl written by the select stage")
    tr.add_argument("--model", required=True, help="base model: local folder or hub id")
    tr.add_argument("--out", required=True, help="folder for the adapter and metadata.json")
    tr.add_argument("--config", help="config YAML whose train section to use")
    tr.set_defaults(fn=cmd_train)

    cb = sub.add_parser(
        "calibrate",
        help="which decoder layer's attention tells right from wrong answers: AUC per layer, "
        "thresholds (calibration.json)",
    )
    add_run_id(cb)
    cb.add_argument("--config", help="config YAML of the run")
    cb.add_argument("--force", action="store_true", help="measure again even if done")
    cb.add_argument("--json", action="store_true", help="calibration.json on stdout")
    cb.set_defaults(fn=cmd_calibrate)

    rp = sub.add_parser(
        "report", help="an HTML report of a run: pairs, drops, training, evaluation"
    )
    add_run_id(rp)
    rp.add_argument("--config", help="config YAML of the run")
    rp.add_argument("--out", required=True, help="HTML file to write")
    rp.set_defaults(fn=cmd_report)

    c = sub.add_parser("contact-sheet", help="a PNG showing augmented samples of each format")
    add_run_id(c)
    c.add_argument("--config", help="config YAML of the run")
    c.add_argument("--out", required=True, help="PNG file to write")
    c.add_argument("--per-format", type=int, default=3)
    c.set_defaults(fn=cmd_contact_sheet)
