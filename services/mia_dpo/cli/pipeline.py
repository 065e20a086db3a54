"""Commands that run or inspect a pipeline run: run, worker, stage-task, status,
retry, augment."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from mia_dpo.cli.common import (
    add_json,
    add_run_id,
    connections,
    open_run,
    print_json,
    print_outcomes,
    require_model_for,
    run_checks,
    run_id_arg,
)
from mia_dpo.config import RunConfig, load_config
from mia_dpo.errors import TransientStoreError, UserError
from mia_dpo.records import FORMATS, STAGE_ORDER, ShardStats
from mia_dpo.runtime import layout
from mia_dpo.stages import get_stage

log = logging.getLogger("mia_dpo")

# A worker stopped by SIGTERM/SIGINT before its stage was drained (EX_TEMPFAIL): its
# task was finished or released, nothing failed; the chart's podFailurePolicy ignores it.
EXIT_STOPPED = 75


def print_summary(cfg: RunConfig, store: Any, queue: Any, run_id: str) -> None:
    """The table `mia-dpo status --run-id RUN_ID` prints, after everything else the run
    wrote: on Kubernetes the controller pod's log then ends with where the run stands."""
    from mia_dpo.status import format_status, run_status

    sys.stderr.flush()
    try:
        st = run_status(store, queue if cfg.queue.backend == "redis" else None, run_id)
    except (UserError, TransientStoreError) as e:  # nothing planned yet, or no store
        print(f"no status for run {run_id}: {e}", flush=True)
        return
    print(f"\n$ mia-dpo status --run-id {run_id}", flush=True)
    print(format_status(st), flush=True)


def cmd_run(args: argparse.Namespace) -> int:
    from mia_dpo.controller import Controller, RunFailed
    from mia_dpo.runtime.launchers import LaunchError

    cfg = load_config(args.config)
    run_id = run_id_arg(args, cfg, generate=True)
    if cfg.launcher.kind == "inline":
        require_model_for(cfg.stages, f"the {cfg.launcher.kind} launcher running a model stage")
    store, queue = connections(cfg)
    controller = Controller(
        cfg, run_id, store, queue, stages=get_stage, progress=not (args.quiet or args.json),
        checks=run_checks(cfg),
    )  # fmt: skip
    where = store.uri(layout.run_prefix(run_id).rstrip("/"))
    print(f"run {run_id}: store {where}", file=sys.stderr)
    try:
        outcomes = controller.run()
    except KeyboardInterrupt:
        interrupt = getattr(controller.launcher, "interrupt", None)
        if interrupt:
            interrupt()
        print(f"interrupted; rerun with --run-id {run_id} to resume", file=sys.stderr)
        return 130
    except (RunFailed, LaunchError, UserError) as e:
        if not args.summary:
            raise
        # The error first (as `mia-dpo` prints it, same exit code), then the summary.
        code, what = (2, "error") if isinstance(e, UserError) else (1, "run failed")
        print(f"mia-dpo: {what}: {e}", file=sys.stderr, flush=True)
        print_summary(cfg, store, queue, run_id)
        return code
    plan = ShardStats.model_validate(store.get_json(layout.stage_stats_key(run_id, "plan")))
    if args.json:
        print_json({
            "run_id": run_id,
            "store": where,
            "plan": plan.model_dump(mode="json"),
            "stages": [
                {"stage": o.stage, "skipped": o.skipped, "dead_shards": o.dead_shards,
                 **o.stats.model_dump(mode="json")}
                for o in outcomes
            ],
        })  # fmt: skip
        return 0
    if plan.dropped:  # index lines that never became samples: count them here too
        dropped = ", ".join(f"{r} {n}" for r, n in sorted(plan.dropped.items()))
        print(f"plan: {plan.total} index records; dropped: {dropped}")
    print_outcomes(outcomes)
    if args.summary:
        print_summary(cfg, store, queue, run_id)
    return 0


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
        run_id = run_id_arg(args, cfg)
        if cfg.queue.backend != "redis":
            raise UserError("worker: queue.backend must be 'redis' for a separate worker process")
        require_model_for([args.stage], f"a {args.stage} worker")
        store, queue = connections(cfg)
        worker = Worker(cfg, run_id, args.stage, store, queue, stage_fn=get_stage(args.stage),
                        stop=stop)  # fmt: skip
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
    run_id = run_id_arg(args, cfg)
    require_model_for([args.stage], f"the {args.stage} stage")
    store = open_store(cfg.store)
    done = not run_task_directly(cfg, run_id, args.stage, args.shard, store, get_stage(args.stage))
    print(f"{args.stage} shard {args.shard}: {'already done' if done else 'done'}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from mia_dpo.status import format_status, run_status

    cfg, run_id, store, queue = open_run(args)
    st = run_status(store, queue if cfg.queue.backend == "redis" else None, run_id)
    print(st.model_dump_json(indent=1) if args.json else format_status(st))
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    from mia_dpo.retry import format_retry, retry_dead

    if not args.dead:
        raise UserError("retry: say what to retry: --dead (the dead-lettered tasks)")
    cfg, run_id, store, queue = open_run(args)
    plan = retry_dead(store, queue if cfg.queue.backend == "redis" else None, run_id, args.stage)
    print(
        plan.model_dump_json(indent=1) if args.json else format_retry(plan, args.config or "CONFIG")
    )
    return 0


def cmd_augment(args: argparse.Namespace) -> int:
    from mia_dpo.controller import Controller
    from mia_dpo.runtime.queue import MemoryQueue
    from mia_dpo.runtime.store import LocalStore

    out = Path(args.out)
    overrides: dict[str, Any] = {
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
    queue = MemoryQueue(cfg.queue)
    Controller(cfg, run_id, store, queue, stages=get_stage, progress=not args.quiet).run()
    rows = []
    for key in store.list(layout.stage_prefix(run_id, "augment")):
        if key.endswith(".jsonl") and not key.endswith(".dropped.jsonl"):
            rows.extend(store.get_jsonl(key))
    (out / "augmented.jsonl").write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    print(f"{len(rows)} augmented samples -> {out / 'augmented.jsonl'}")
    return 0


def add_parsers(sub: Any) -> None:
    r = sub.add_parser("run", help="run (or resume) the pipeline described by a config file")
    r.add_argument("config", nargs="?", help="run config YAML (default: the embedded default)")
    add_run_id(r)
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    r.add_argument(
        "--summary",
        action="store_true",
        help="end with the `mia-dpo status` table, whether the run succeeded or failed",
    )
    add_json(r)
    r.set_defaults(fn=cmd_run)

    w = sub.add_parser("worker", help="a stateless worker for one stage (Redis queue)")
    w.add_argument("--stage", required=True, choices=STAGE_ORDER)
    add_run_id(w)
    w.add_argument("--config", help="config YAML for connections (environment overrides it)")
    w.set_defaults(fn=cmd_worker)

    st = sub.add_parser(
        "stage-task",
        help="run one task of a stage without the queue (every rank of torchrun / accelerate)",
    )
    st.add_argument("--stage", required=True, choices=STAGE_ORDER)
    add_run_id(st)
    st.add_argument("--shard", type=int, default=0)
    st.add_argument("--config", help="config YAML for connections")
    st.set_defaults(fn=cmd_stage_task)

    s = sub.add_parser("status", help="shards done / pending / dead-lettered, drops by reason")
    add_run_id(s, legacy=True)
    s.add_argument("--config", help="config YAML for connections")
    add_json(s)
    s.set_defaults(fn=cmd_status)

    rt = sub.add_parser(
        "retry", help="requeue a run's dead-lettered tasks after a fix (then run it again)"
    )
    add_run_id(rt, legacy=True)
    rt.add_argument("--dead", action="store_true", help="requeue the dead-lettered tasks")
    rt.add_argument("--stage", action="append", choices=STAGE_ORDER, help="only these stages")
    rt.add_argument("--config", help="config YAML for connections")
    add_json(rt)
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
