"""Fault injection against the whole pipeline (real redis-server, real S3 server, the
tiny model, `mia-dpo run` and its workers as separate processes): the faults, each
injected at a random moment of a trial:

- `sigkill`: in every stage, a random worker holding a task is killed with SIGKILL at
  a random moment inside its task (up to 0.9 x the clean run's longest task time);
- `controller`: the `mia-dpo run` process is killed with SIGKILL during a random stage
  and started again with the same command and run id;
- `redis`: redis-server is stopped (SIGKILL or SIGTERM, at random) during a random
  stage, kept down 0.5-6 s (often longer than a lease), and started again on its AOF;
- `s3`: the S3 server is stopped during a random stage, kept down >= 10 s, and started
  again on the same ports and data directory;
- `drain`: every worker of a random stage gets SIGTERM as a node drain sends it (half
  of them a second one soon after); each must exit 75 with its task finished or
  released; replacements are started afterwards.

`run_trial` runs all six stages under a new run id with the clean run's seeds while
it injects a schedule of these faults, then audits the run (audit.py).
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.faults.audit import Outcome, Reference, audit, stage_ends
from tests.faults.lab import EXIT_STOPPED, STAGES, Lab, TrialError
from tests.faults.trial import Trial

# ------------------------------------------------------------------------ the faults

Fault = Callable[..., None]  # (trial, rng, ref, stage=None)


def fault_none(trial: Trial, rng: random.Random, ref: Reference, stage: str | None = None) -> None:
    """The clean run."""


def fault_sigkill(
    trial: Trial, rng: random.Random, ref: Reference, stage: str | None = None
) -> None:
    """In every stage (or only `stage`): SIGKILL a random worker holding a task, at a
    random moment inside the task."""
    for st in [stage] if stage else STAGES:
        in_flight = trial.random_moment(st, rng, ref)
        if not in_flight:
            workers = trial.workers(st)
            if not workers:
                trial.events.append({"event": "missed", "fault": "sigkill", "stage": st})
                continue
            victim, lease = rng.choice(workers), None
        else:
            lease, victim = rng.choice(in_flight)
        killed = trial.kill(victim, signal.SIGKILL)
        # a task whose marker is there right after the kill had finished before it
        mid_task = lease is not None and not trial.marked(st, lease.shard)
        trial.events.append(
            {
                "event": "sigkill",
                "stage": st,
                "pid": victim.pid,
                "killed": killed,
                "task": lease.task_id if lease else None,
                "mid_task": mid_task,
                "t": trial.now(),
            }
        )


def fault_controller(
    trial: Trial, rng: random.Random, ref: Reference, stage: str | None = None
) -> None:
    """SIGKILL `mia-dpo run` during a random stage; start it again, same run id."""
    stage = stage or rng.choice(STAGES)
    in_flight = trial.random_moment(stage, rng, ref)
    with trial._lock:
        if trial.launcher == "local":
            trial._track_local()
        _, ctl = trial.controllers[-1]
        workers = [p for p in trial.procs.values() if p.alive()]
        for w in workers:  # its local launcher's temp config folder, left behind
            argv = w.cmdline()
            if "--config" in argv:
                trial.leftover_dirs.add(Path(argv[argv.index("--config") + 1]).parent)
        killed = trial.kill(ctl, signal.SIGKILL)
        trial.controller.wait(30)
    # The old controller's workers are orphans now: they go on with their stage until
    # the new controller closes it, then exit 0 by themselves (checked by settle()).
    trial.orphans += workers
    time.sleep(rng.uniform(0.2, 3.0))
    new = trial.start_controller()
    trial.events.append(
        {
            "event": "controller_sigkill",
            "stage": stage,
            "killed": killed,
            "mid_task": bool(in_flight),
            "orphaned_workers": len(workers),
            "new_pid": new.pid,
            "t": trial.now(),
        }
    )


def fault_redis(
    trial: Trial,
    rng: random.Random,
    ref: Reference,
    stage: str | None = None,
    hard: bool | None = None,
    down: float | None = None,
) -> None:
    """Take redis-server down during a random stage (SIGKILL or SIGTERM, at random),
    bring it back on its append-only file after 0.5-6 s (a lease is 3 s)."""
    stage = stage or rng.choice(STAGES)
    in_flight = trial.random_moment(stage, rng, ref)
    hard = rng.random() < 0.5 if hard is None else hard
    down = rng.uniform(0.5, 6.0) if down is None else down
    t0 = time.monotonic()
    trial.lab.redis.halt(hard=hard)
    time.sleep(down)
    trial.lab.redis.resume()
    trial.events.append(
        {
            "event": "redis_restart",
            "stage": stage,
            "hard": hard,
            "mid_task": bool(in_flight),
            "down_s": round(time.monotonic() - t0, 2),
            "t": trial.now(),
        }
    )


def fault_s3(
    trial: Trial,
    rng: random.Random,
    ref: Reference,
    stage: str | None = None,
    down: float = 10.0,
) -> None:
    """Stop the S3 server during a random stage; keep it down >= `down` seconds; start it
    again on the same ports and data."""
    stage = stage or rng.choice(STAGES)
    in_flight = trial.random_moment(stage, rng, ref)
    trial.lab.s3.halt()
    t_down = time.monotonic()
    time.sleep(down)
    trial.lab.s3.resume()
    trial.events.append(
        {
            "event": "s3_outage",
            "stage": stage,
            "mid_task": bool(in_flight),
            "down_s": round(time.monotonic() - t_down, 2),
            "t": trial.now(),
        }
    )


def fault_drain(trial: Trial, rng: random.Random, ref: Reference, stage: str | None = None) -> None:
    """SIGTERM every worker of a stage as a node drain does; to about half of those
    still running a task, a second SIGTERM 0.3-1.2 s later (sooner, both may reach the
    worker while its main thread is inside one long torch call, and Python runs the
    handler once). Each must exit 75 with its task finished (marker) or released
    (queued again, not leased); then replacements start."""
    if trial.launcher != "external":
        raise TrialError("the drain fault needs launcher external (the harness's workers)")
    stage = stage or rng.choice(STAGES)
    in_flight = trial.random_moment(stage, rng, ref)
    with trial._lock:
        trial.paused.add(stage)
        popens = {proc.pid: p for p, proc in trial.ext.get(stage, [])}
        victims = trial.workers(stage)
        held = {p.pid: lease for lease, p in in_flight if p in victims}
        for v in victims:
            trial.kill(v, signal.SIGTERM)
    time.sleep(rng.uniform(0.3, 1.2))
    twice = [
        v
        for v in victims
        if v.pid in held and rng.random() < 0.5 and not trial.marked(stage, held[v.pid].shard)
    ]
    for v in twice:
        v.signal(signal.SIGTERM)
    left = []
    for v in victims:  # our children: wait() says when they are really gone
        try:
            popens[v.pid].wait(900)
        except subprocess.TimeoutExpired:
            left.append(v)
    with trial._lock:
        trial._supervise_exits()
    rcs = {v.pid: popens[v.pid].returncode for v in victims}
    # A worker exits 0 only once its stage is closed with nothing queued or leased;
    # both stay so, so the stage must look drained now for any 0 below to be honest.
    drained = trial.stage_state(stage).get("closed") == "1" and (
        trial.r.xlen(trial.key(stage, "stream")) == 0
    )
    # where did each held task go?
    pending = {lease.task_id for lease in trial.leases(stage)}
    live = trial.r.hgetall(trial.key(stage, "live"))
    detail = []
    for v in victims:
        lease = held.get(v.pid)
        fate = None
        if lease is not None:
            if trial.marked(stage, lease.shard):
                fate = "finished"
            elif lease.task_id in live and lease.task_id not in pending:
                fate = "released"
            else:
                fate = "neither"
        detail.append(
            {
                "pid": v.pid,
                "twice": v in twice,
                "task": lease.task_id if lease else None,
                "fate": fate,
                "rc": rcs.get(v.pid),
            }
        )
    with trial._lock:
        trial.paused.discard(stage)
    fates = Counter(d["fate"] for d in detail if d["task"])
    trial.events.append(
        {
            "event": "drain",
            "stage": stage,
            "workers": len(victims),
            "twice": len(twice),
            "held": len(held),
            "finished": fates["finished"],
            "released": fates["released"],
            "exit_codes": sorted(Counter(d["rc"] for d in detail).items(), key=str),
            # killed by the signal's default action (see tests/faults/README.md): while
            # still starting, before the handlers are installed (it held no task), or by
            # the second signal while exiting after its task was finished
            "killed_starting": sum(d["rc"] == -signal.SIGTERM and not d["task"] for d in detail),
            "killed_exiting": sum(
                d["rc"] == -signal.SIGTERM and d["fate"] == "finished" for d in detail
            ),
            "victims": detail,
            "stage_drained": drained,
            "still_running": [p.pid for p in left],
            "t": trial.now(),
        }
    )


FAULTS: dict[str, tuple[Fault, str | None]] = {
    # name: (injector, the launcher it needs; None: either)
    "none": (fault_none, None),
    "sigkill": (fault_sigkill, None),
    "controller": (fault_controller, "local"),
    "redis": (fault_redis, None),
    "s3": (fault_s3, None),
    "drain": (fault_drain, "external"),
}

# A schedule: (fault, stage, options) steps, run in the pipeline order of their stages;
# stage None: a sigkill in every stage, any other fault in a random stage.
Step = tuple[str, str | None, dict[str, Any]]


def expand(schedule: list[Step], rng: random.Random) -> list[tuple[str, str, dict[str, Any]]]:
    steps: list[tuple[str, str, dict[str, Any]]] = []
    for fault, stage, opts in schedule:
        if stage is not None:
            steps.append((fault, stage, opts))
        elif fault == "sigkill":
            steps += [(fault, s, opts) for s in STAGES]
        elif fault != "none":
            steps.append((fault, rng.choice(STAGES), opts))
    return sorted(steps, key=lambda step: STAGES.index(step[1]))


def launcher_for(schedule: list[Step], default: str = "local") -> str:
    needs = {FAULTS[f][1] for f, _, _ in schedule} - {None}
    if len(needs) > 1:
        raise ValueError(f"faults {schedule} need different launchers {needs}")
    return needs.pop() if needs else default


# ------------------------------------------------------------------------ one trial


def run_trial(
    lab: Lab,
    ref: Reference,
    schedule: list[Step] | str,
    run_id: str,
    rng: random.Random,
    launcher: str | None = None,
    hang_guard: float = 1800.0,
) -> Outcome:
    """Run the whole pipeline under `run_id`, injecting the faults of `schedule` (or
    of one fault name: a sigkill in every stage, any other fault in a random stage);
    then audit the run against the clean one."""
    if isinstance(schedule, str):
        schedule = [(schedule, None, {})]
    launcher = launcher or launcher_for(schedule)
    steps = expand(schedule, rng)
    name = "+".join(dict.fromkeys(f for f, _, _ in schedule))
    out = Outcome(run_id=run_id, fault=name, launcher=launcher)
    trial = Trial(lab, run_id, launcher)
    t0 = time.monotonic()
    try:
        trial.start()
        for fault, stage, opts in steps:
            FAULTS[fault][0](trial, rng, ref, stage=stage, **opts)
        out.rc = trial.wait(hang_guard)
        trial.settle()
    except TrialError as e:
        out.error = str(e)
    finally:
        trial.cleanup()
        _remove_launcher_dirs(trial)
    out.seconds = round(time.monotonic() - t0, 1)
    out.events = trial.events
    out.worker_exits = {str(k): v for k, v in sorted(trial.exits.items())}
    out.redelivered = sorted(t for t, n in trial.deliveries.items() if n > 1)
    for ev in trial.events:
        if ev["event"] in ("worker_crash", "workers_left_running", "watcher_error"):
            out.problems.append(json.dumps(ev))
        if ev["event"] == "drain":
            for v in ev["victims"]:
                # A worker holding a task must finish or release it, then exit 75. Dying
                # of the signal is a known flaw of the exit code only (README.md) when it
                # held nothing (still starting) or had finished its task (exiting).
                excused = not v["task"] or (v["twice"] and v["fate"] == "finished")
                ok_rc = (EXIT_STOPPED, -signal.SIGTERM) if excused else (EXIT_STOPPED,)
                # An idle worker that saw the stage drained just before the signal
                # had already said so (0) and ignores signals while it exits.
                if not v["task"] and ev["stage_drained"]:
                    ok_rc = (*ok_rc, 0)
                if v["fate"] == "neither" or v["rc"] not in ok_rc:
                    out.problems.append(f"drain: {json.dumps(v)}")
            if ev["still_running"]:
                out.problems.append(f"drain: workers still running {ev['still_running']}")
    if out.error is None:
        audit(lab, ref, out)
        out.stage_end_s = stage_ends(lab, run_id, trial.wall0)
    return out


def _remove_launcher_dirs(trial: Trial) -> None:
    """A SIGKILLed controller cannot remove its local launcher's temp config folder
    (found on its workers' command lines when it was killed)."""
    for folder in trial.leftover_dirs:
        if folder.name.startswith("mia-dpo-launcher-"):
            shutil.rmtree(folder, ignore_errors=True)
