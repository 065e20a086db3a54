"""Fault injection, many trials: lost and duplicated tasks per fault kind.

    .venv/bin/python bench/faults.py [--trials 3] [--sigkill-trials 5]
        [--kinds sigkill controller redis s3 drain] [--n 40] [--shard-size 6] [--seed 0]

A real redis-server (append-only, password) and a real S3 server (SeaweedFS), both on
free loopback ports and stopped by PID; the tiny LLaVA; 2 workers per stage. One clean
run first, then for each fault kind `--trials` runs of all six stages (augment ->
generate -> score -> select -> train -> evaluate), each under a new run id with the
same seeds, with the fault injected at a random moment (tests/faults/faults.py says
how each fault is made, tests/faults/audit.py how lost and duplicated work is counted
from the store and the Redis streams). A `sigkill` trial kills a worker in EVERY
stage, so N sigkill trials are N kills per stage. Single-stage faults rotate over the
six stages by trial number.

Prints one row per fault kind: trials, completed runs, lost and duplicated tasks and
samples, runs whose pairs files are byte-identical to the clean run's, runs whose
training and evaluation finished, what was injected; writes every trial's details to
bench/results/faults.json. Exit status 1 when anything was lost or duplicated.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.faults, tests.servers
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.faults.audit import Outcome  # noqa: E402
from tests.faults.faults import FAULTS, run_trial  # noqa: E402
from tests.faults.lab import STAGES, Lab, LabSpec  # noqa: E402
from tests.faults.trial import run_reference  # noqa: E402

KINDS = ("sigkill", "controller", "redis", "s3", "drain")


def injected(kind: str, outs: list[Outcome]) -> str:
    events = [e for o in outs for e in o.events]
    if kind == "sigkill":
        kills = [e for e in events if e["event"] == "sigkill" and e["killed"]]
        mid = sum(e["mid_task"] for e in kills)
        missed = sum(e["event"] == "missed" for e in events)
        return f"{len(kills)} kills ({mid} mid-task){f', {missed} missed' if missed else ''}"
    if kind == "controller":
        ev = [e for e in events if e["event"] == "controller_sigkill"]
        orphans = sum(e["orphaned_workers"] for e in ev)
        return f"{len(ev)} kills, {orphans} orphaned workers"
    if kind in ("redis", "s3"):
        name = "redis_restart" if kind == "redis" else "s3_outage"
        ev = [e for e in events if e["event"] == name]
        if not ev:
            return "-"
        downs = [e["down_s"] for e in ev]
        hard = f", {sum(e['hard'] for e in ev)} SIGKILL" if kind == "redis" else ""
        return f"{len(ev)} outages {min(downs):.1f}-{max(downs):.1f} s{hard}"
    if kind == "drain":
        ev = [e for e in events if e["event"] == "drain"]
        workers = sum(e["workers"] for e in ev)
        held = sum(e["held"] for e in ev)
        fin = sum(e["finished"] for e in ev)
        rel = sum(e["released"] for e in ev)
        twice = sum(e["twice"] for e in ev)
        dead = sum(e["killed_starting"] + e["killed_exiting"] for e in ev)
        return (
            f"{workers} workers, {held} held a task ({twice} signalled twice): {fin} finished, "
            f"{rel} released" + (f"; {dead} died of SIGTERM with no task left" if dead else "")
        )
    return "-"


def table(ref: Outcome, results: dict[str, list[Outcome]]) -> str:
    head = ["fault", "trials", "completed", "lost t/s", "dup t/s", "pairs identical",
            "train+eval", "redelivered", "median s", "injected"]  # fmt: skip
    rows = [head]
    for kind, outs in [("none (clean)", [ref]), *results.items()]:
        rows.append([
            kind,
            str(len(outs)),
            str(sum(o.completed for o in outs)),
            f"{sum(len(o.lost_tasks) for o in outs)}/{sum(len(o.lost_samples) for o in outs)}",
            f"{sum(len(o.dup_tasks) for o in outs)}/{sum(len(o.dup_samples) for o in outs)}",
            f"{sum(o.pairs_identical for o in outs)}/{len(outs)}",
            f"{sum(o.train_ok and o.evaluate_ok for o in outs)}/{len(outs)}",
            str(sum(len(o.redelivered) for o in outs)),
            f"{statistics.median(o.seconds for o in outs):.0f}",
            "-" if kind.startswith("none") else injected(kind, outs),
        ])  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=3, help="trials per fault kind")
    ap.add_argument("--sigkill-trials", type=int, default=5, help="sigkill trials (each kills "
                    "one worker in every stage)")  # fmt: skip
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    ap.add_argument("--n", type=int, default=40, help="synthetic source samples")
    ap.add_argument("--shard-size", type=int, default=6)
    ap.add_argument("--workers", type=int, default=2, help="workers per stage")
    ap.add_argument("--seed", type=int, default=0, help="seed of the fault schedule")
    ap.add_argument("--model", type=Path, help="tiny model folder (built if missing)")
    ap.add_argument("--workdir", type=Path, help="keep servers' data and logs here")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "faults.json")
    args = ap.parse_args()

    from mia_dpo.demo.tiny import build_tiny_model

    tmp = tempfile.TemporaryDirectory(prefix="mia-faults-") if args.workdir is None else None
    root = args.workdir or Path(tmp.name)  # type: ignore[union-attr]
    model = args.model or root / "model"
    if not (model / "config.json").is_file():
        build_tiny_model(model, seed=0)
    spec = LabSpec(n_samples=args.n, shard_size=args.shard_size, workers=args.workers)
    rng = random.Random(args.seed)
    results: dict[str, list[Outcome]] = {}
    t0 = time.monotonic()
    with Lab(root / "lab", model, spec) as lab:
        ref, ref_out = run_reference(lab)
        print(f"clean run: {ref_out.seconds:.0f} s, shards {ref.shards}, "
              f"longest task s { {k: round(v, 2) for k, v in ref.seconds.items()} }",
              flush=True)  # fmt: skip
        for kind in args.kinds:
            n = args.sigkill_trials if kind == "sigkill" else args.trials
            for i in range(n):
                stage = None if kind == "sigkill" else STAGES[i % len(STAGES)]
                launcher = FAULTS[kind][1] or ("local", "external")[i % 2]
                out = run_trial(lab, ref, [(kind, stage, {})], f"{kind}-{i}",
                                random.Random(rng.random()), launcher=launcher)  # fmt: skip
                results.setdefault(kind, []).append(out)
                status = "ok" if out.ok else "FAILED"
                print(f"{out.run_id} ({out.launcher}, {stage or 'every stage'}): {status} "
                      f"in {out.seconds:.0f} s; lost {len(out.lost_tasks)}/"
                      f"{len(out.lost_samples)}, dup {len(out.dup_tasks)}/"
                      f"{len(out.dup_samples)}, redelivered {len(out.redelivered)}",
                      flush=True)  # fmt: skip
                if not out.ok:
                    print(out.summary(), flush=True)
    print()
    print(table(ref_out, results))
    total = time.monotonic() - t0
    print(f"\n{sum(len(v) for v in results.values())} fault trials + 1 clean run in "
          f"{total / 60:.1f} min on {os.cpu_count()} CPUs")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "spec": asdict(spec), "seed": args.seed, "machine": platform.platform(),
        "cpus": os.cpu_count(), "minutes": round(total / 60, 1),
        "clean": asdict(ref_out), "trials": {k: [asdict(o) for o in v] for k, v in results.items()},
    }, indent=1, default=str) + "\n")  # fmt: skip
    print(f"details -> {args.out}")
    if tmp is not None:
        tmp.cleanup()
    bad = [o for outs in results.values() for o in outs if not o.ok]
    return 1 if bad or not ref_out.ok else 0


if __name__ == "__main__":
    sys.exit(main())
