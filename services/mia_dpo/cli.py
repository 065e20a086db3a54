"""The `mia-dpo` command line. User mistakes end in one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from mia_dpo import __version__
from mia_dpo.config import RunConfig, load_config
from mia_dpo.errors import TransientStoreError, UserError
from mia_dpo.records import FORMATS, STAGE_ORDER, ShardStats, check_run_id
from mia_dpo.runtime.layout import stage_stats_key

log = logging.getLogger("mia_dpo")


def _run_id(arg: str | None, cfg: RunConfig) -> str:
    run_id = arg or os.environ.get("MIA_DPO_RUN_ID") or cfg.run_id
    if not run_id:
        run_id = time.strftime("run-%Y%m%d-%H%M%S")
    try:
        return check_run_id(run_id)
    except ValueError as e:
        raise UserError(f"--run-id: {e}") from None


def _connections(cfg: RunConfig):  # type: ignore[no-untyped-def]
    from mia_dpo.runtime.queue import open_queue
    from mia_dpo.runtime.store import open_store

    return open_store(cfg.store), open_queue(cfg.queue)


def _open_run(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """Config, run id, store and queue of a command that looks at an existing run."""
    cfg = load_config(args.config)
    run_id = _run_id(args.run_id, cfg)
    store, queue = _connections(cfg)
    return cfg, run_id, store, queue


def cmd_run(args: argparse.Namespace) -> int:
    from mia_dpo.controller import Controller

    cfg = load_config(args.config)
    run_id = _run_id(args.run_id, cfg)
    store, queue = _connections(cfg)
    controller = Controller(cfg, run_id, store, queue, progress=not args.quiet)
    print(f"run {run_id}: store {store.uri('runs/' + run_id)}", file=sys.stderr)
    try:
        outcomes = controller.run()
    except KeyboardInterrupt:
        interrupt = getattr(controller.launcher, "interrupt", None)
        if interrupt:
            interrupt()
        print(f"interrupted; rerun with --run-id {run_id} to resume", file=sys.stderr)
        return 130
    plan = ShardStats.model_validate(store.get_json(stage_stats_key(run_id, "plan")))
    if plan.dropped:  # index lines that never became samples: count them here too
        dropped = ", ".join(f"{r} {n}" for r, n in sorted(plan.dropped.items()))
        print(f"plan: {plan.total} index records; dropped: {dropped}")
    for o in outcomes:
        note = " (already done)" if o.skipped else ""
        dropped = ", ".join(f"{r} {n}" for r, n in sorted(o.stats.dropped.items())) or "none"
        print(f"{o.stage}: kept {o.stats.kept} of {o.stats.total}{note}; dropped: {dropped}")
        if o.stats.notes:
            print("  " + ", ".join(f"{k} {n}" for k, n in sorted(o.stats.notes.items())))
    return 0


# A worker stopped by SIGTERM/SIGINT before its stage was drained (EX_TEMPFAIL): its
# task was finished or released, nothing failed; the chart's podFailurePolicy ignores it.
EXIT_STOPPED = 75


def cmd_worker(args: argparse.Namespace) -> int:
    from mia_dpo.runtime.worker import GracefulExit, Worker, install_signal_handlers

    # Handlers before anything else, so that a SIGTERM while the worker is starting
    # (connecting, riding out an S3 or Redis outage) also ends in "stopped" (75), not
    # in death by the signal (143), which a Job counts as a failure. Until the loop
    # runs there is no task to finish: `stop` starts set, so one signal ends start-up.
    stop = threading.Event()
    stop.set()
    install_signal_handlers(stop)
    worker: Worker | None = None
    try:
        cfg = load_config(args.config)
        run_id = args.run_id or os.environ.get("MIA_DPO_RUN_ID") or cfg.run_id
        if not run_id:
            raise UserError("worker: --run-id (or MIA_DPO_RUN_ID) is required")
        run_id = _run_id(run_id, cfg)
        if cfg.queue.backend != "redis":
            raise UserError("worker: queue.backend must be 'redis' for a separate worker process")
        store, queue = _connections(cfg)
        worker = Worker(cfg, run_id, args.stage, store, queue, stop=stop)
        stop.clear()  # from now on the first signal lets the current task finish
        worker.run()
    except GracefulExit:
        log.warning("signal: %s", "current task released" if worker else "stopped while starting")
    finally:
        # Nothing left to finish or release: a further signal while the interpreter
        # shuts down would kill it by the default action and turn 75 (or 0) into 143.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if worker is not None:
        log.info("worker %s exiting after %d shards", worker.consumer, worker.processed)
    # 0 tells Kubernetes (work-queue Jobs) and Compose that the stage is drained;
    # a worker stopped by a signal must not say so, or the Job would count a
    # drained node's pod as the stage's success and start no replacement.
    return EXIT_STOPPED if stop.is_set() else 0


def cmd_stage_task(args: argparse.Namespace) -> int:
    from mia_dpo.runtime.store import open_store
    from mia_dpo.runtime.worker import run_task_directly

    cfg = load_config(args.config)
    run_id = _run_id(args.run_id, cfg)
    done = not run_task_directly(cfg, run_id, args.stage, args.shard, open_store(cfg.store))
    print(f"{args.stage} shard {args.shard}: {'already done' if done else 'done'}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from mia_dpo.status import format_status, run_status

    cfg, run_id, store, queue = _open_run(args)
    st = run_status(store, queue if cfg.queue.backend == "redis" else None, run_id)
    print(st.model_dump_json(indent=1) if args.json else format_status(st))
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    from mia_dpo.retry import format_retry, retry_dead

    if not args.dead:
        raise UserError("retry: say what to retry: --dead (the dead-lettered tasks)")
    cfg, run_id, store, queue = _open_run(args)
    plan = retry_dead(store, queue if cfg.queue.backend == "redis" else None, run_id, args.stage)
    print(format_retry(plan, args.config or "CONFIG"))
    return 0


def cmd_augment(args: argparse.Namespace) -> int:
    from mia_dpo.controller import Controller
    from mia_dpo.runtime import layout
    from mia_dpo.runtime.queue import MemoryQueue
    from mia_dpo.runtime.store import LocalStore

    out = Path(args.out)
    overrides: dict[str, object] = {
        "input.path": str(Path(args.input).resolve()),
        "input.image_root": args.image_root
        if args.image_root.startswith("s3://")
        else str(Path(args.image_root).resolve()),
        "store.backend": "local",
        "store.root": str(out),
        "queue.backend": "memory",
        "launcher.kind": "inline",
        "launcher.default_workers": args.workers,
        "stages": ["augment"],
    }
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.formats:
        overrides["augment.formats"] = {f: 1.0 for f in args.formats}
    cfg = load_config(args.config, overrides=overrides)
    store = LocalStore(out)
    run_id = "augment"
    Controller(cfg, run_id, store, MemoryQueue(cfg.queue), progress=not args.quiet).run()
    rows = []
    for key in store.list(layout.stage_prefix(run_id, "augment")):
        if key.endswith(".jsonl") and not key.endswith(".dropped.jsonl"):
            rows.extend(store.get_jsonl(key))
    (out / "augmented.jsonl").write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    print(f"{len(rows)} augmented samples -> {out / 'augmented.jsonl'}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from mia_dpo.data.synthetic import write_synthetic

    path = write_synthetic(Path(args.out), args.n, seed=args.seed)
    print(f"{args.n} samples -> {path} (images under {Path(args.out) / 'images'})")
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from mia_dpo.models.tiny import build_tiny_model

    path = build_tiny_model(Path(args.out), seed=args.seed)
    print(f"tiny LLaVA -> {path}")
    return 0


def cmd_base_model(args: argparse.Namespace) -> int:
    from mia_dpo.models.base import ensure_base_model

    params = {"seed": args.seed} | ({"steps": args.steps} if args.steps else {})
    path = ensure_base_model(Path(args.out), **params)
    print(f"base model -> {path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from mia_dpo.stages.train import train_standalone

    if not Path(args.pairs).is_file():
        raise UserError(f"--pairs {args.pairs}: file not found")
    cfg = load_config(args.config, overrides={"model.path": args.model})
    out = train_standalone(Path(args.pairs), args.model, Path(args.out), cfg)
    print(f"adapter -> {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from mia_dpo.report_html import write_report
    from mia_dpo.runtime.store import BlobReader

    cfg, run_id, store, _ = _open_run(args)
    path = write_report(store, BlobReader(cfg.store), run_id, Path(args.out))
    print(f"report -> {path}")
    return 0


def cmd_contact_sheet(args: argparse.Namespace) -> int:
    from mia_dpo.report import contact_sheet

    cfg, run_id, store, _ = _open_run(args)
    path = contact_sheet(store, cfg, run_id, Path(args.out), per_format=args.per_format)
    print(f"contact sheet -> {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mia-dpo", description="Multi-Image Augmented DPO pipeline.")
    p.add_argument("--version", action="version", version=f"mia-dpo {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run (or resume) the pipeline described by a config file")
    r.add_argument("config", nargs="?", help="run config YAML (default: the embedded default)")
    r.add_argument("--run-id", help="run id; rerunning the same id resumes it")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    r.set_defaults(fn=cmd_run)

    w = sub.add_parser("worker", help="a stateless worker for one stage (Redis queue)")
    w.add_argument("--stage", required=True, choices=STAGE_ORDER)
    w.add_argument("--run-id", help="run to work on (or MIA_DPO_RUN_ID)")
    w.add_argument("--config", help="config YAML for connections (environment overrides it)")
    w.set_defaults(fn=cmd_worker)

    st = sub.add_parser(
        "stage-task",
        help="run one task of a stage without the queue (every rank of torchrun / accelerate)",
    )
    st.add_argument("--stage", required=True, choices=STAGE_ORDER)
    st.add_argument("--run-id", required=True)
    st.add_argument("--shard", type=int, default=0)
    st.add_argument("--config", help="config YAML for connections")
    st.set_defaults(fn=cmd_stage_task)

    s = sub.add_parser("status", help="shards done / pending / dead-lettered, drops by reason")
    s.add_argument("run_id", metavar="RUN_ID")
    s.add_argument("--config", help="config YAML for connections")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(fn=cmd_status)

    rt = sub.add_parser(
        "retry", help="requeue a run's dead-lettered tasks after a fix (then run it again)"
    )
    rt.add_argument("run_id", metavar="RUN_ID")
    rt.add_argument("--dead", action="store_true", help="requeue the dead-lettered tasks")
    rt.add_argument("--stage", action="append", choices=STAGE_ORDER, help="only these stages")
    rt.add_argument("--config", help="config YAML for connections")
    rt.set_defaults(fn=cmd_retry)

    a = sub.add_parser("augment", help="only augment a LLaVA-format file into multi-image samples")
    a.add_argument("--input", required=True, help="LLaVA JSON/JSONL file")
    a.add_argument("--image-root", required=True, help="folder the image paths are relative to")
    a.add_argument("--out", required=True, help="output folder (augmented.jsonl + images)")
    a.add_argument("--seed", type=int, default=None)
    a.add_argument("--formats", nargs="+", choices=FORMATS, help="formats to use (equal weight)")
    a.add_argument("--workers", type=int, default=2, help="worker threads")
    a.add_argument("--config", help="config YAML for augment parameters")
    a.add_argument("-q", "--quiet", action="store_true")
    a.set_defaults(fn=cmd_augment)

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

    b = sub.add_parser("base-model", help="train the tiny LLaVA on single-image questions (cached)")
    b.add_argument("--out", required=True, help="folder to save_pretrained into")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--steps", type=int, default=None, help="optimizer steps (default: tuned)")
    b.set_defaults(fn=cmd_base_model)

    tr = sub.add_parser("train", help="DPO (or SFT) with LoRA on a pairs file, outside a run")
    tr.add_argument("--pairs", required=True, help="pairs.trl.jsonl written by the select stage")
    tr.add_argument("--model", required=True, help="base model: local folder or hub id")
    tr.add_argument("--out", required=True, help="folder for the adapter and metadata.json")
    tr.add_argument("--config", help="config YAML whose train section to use")
    tr.set_defaults(fn=cmd_train)

    rp = sub.add_parser(
        "report", help="an HTML report of a run: pairs, drops, training, evaluation"
    )
    rp.add_argument("--run-id", required=True)
    rp.add_argument("--config", help="config YAML of the run")
    rp.add_argument("--out", required=True, help="HTML file to write")
    rp.set_defaults(fn=cmd_report)

    c = sub.add_parser("contact-sheet", help="a PNG showing augmented samples of each format")
    c.add_argument("--run-id", required=True)
    c.add_argument("--config", help="config YAML of the run")
    c.add_argument("--out", required=True, help="PNG file to write")
    c.add_argument("--per-format", type=int, default=3)
    c.set_defaults(fn=cmd_contact_sheet)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from mia_dpo.controller import RunFailed
    from mia_dpo.runtime.launchers import LaunchError

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
