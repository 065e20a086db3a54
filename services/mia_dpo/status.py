"""`mia-dpo status --run-id RUN_ID`: where a run stands, read from the store and the queue."""

from __future__ import annotations

import contextlib

from pydantic import BaseModel

from mia_dpo.calibration import Calibration
from mia_dpo.controller import Plan, done_shards
from mia_dpo.errors import NotFound, UserError
from mia_dpo.records import SINGLE_TASK_STAGES, STAGE_ORDER, ShardStats
from mia_dpo.runtime import layout
from mia_dpo.runtime.queue import DeadLetter, Queue
from mia_dpo.runtime.store import Store


class StageStatus(BaseModel):
    stage: str
    state: str  # done | running | failed | pending
    shards_total: int
    shards_done: int
    queued: int
    leased: int
    dead: list[DeadLetter]
    stats: ShardStats


class RunStatus(BaseModel):
    run_id: str
    n_records: int
    plan_dropped: dict[str, int]
    stages: list[StageStatus]
    calibration: str | None = None  # the calibrate stage's one-line summary, once written


def run_status(store: Store, queue: Queue | None, run_id: str) -> RunStatus:
    try:
        plan = Plan.model_validate(store.get_json(layout.plan_key(run_id)))
        config = store.get_json(layout.config_key(run_id))
    except NotFound:
        raise UserError(f"run {run_id!r}: not found in the store (no plan yet)") from None
    plan_stats = ShardStats.model_validate(store.get_json(layout.stage_stats_key(run_id, "plan")))
    stages = []
    for stage in [s for s in STAGE_ORDER if s in config.get("stages", [])]:
        markers = done_shards(store, run_id, stage)
        stats = ShardStats(stage=stage, shard=-1)
        for key in markers.values():
            stats.merge(ShardStats.model_validate_json(store.get_text(key)))
        queued = leased = 0
        dead: list[DeadLetter] = []
        if queue is not None:
            c = queue.counts(run_id, stage)
            queued, leased = c.queued, c.leased
            dead = queue.dead_letters(run_id, stage)
        if not dead:
            # an in-process run leaves its dead letters in the store
            with contextlib.suppress(NotFound):
                dead = [
                    DeadLetter.model_validate(d)
                    for d in store.get_json(layout.dead_key(run_id, stage))
                ]
        if store.exists(layout.stage_done_key(run_id, stage)):
            state = "done"
        elif dead and not queued and not leased:
            state = "failed"
        elif markers or queued or leased:
            state = "running"
        else:
            state = "pending"
        stages.append(
            StageStatus(
                stage=stage,
                state=state,
                shards_total=1 if stage in SINGLE_TASK_STAGES else plan.n_shards,
                shards_done=len(markers),
                queued=queued,
                leased=leased,
                dead=dead,
                stats=stats,
            )
        )
    calibration = None
    with contextlib.suppress(NotFound):
        text = store.get_text(layout.calibration_key(run_id))
        calibration = Calibration.model_validate_json(text).summary()
    return RunStatus(
        run_id=run_id,
        n_records=plan.n_records,
        plan_dropped=plan_stats.dropped,
        stages=stages,
        calibration=calibration,
    )


def format_status(st: RunStatus) -> str:
    lines = [f"run {st.run_id}: {st.n_records} input records"]
    if st.plan_dropped:
        lines.append("  unreadable index lines: " + _reasons(st.plan_dropped))
    lines.append(
        f"{'stage':<10}{'state':<9}{'done':>11}{'queued':>8}{'leased':>8}{'dead':>6}"
        f"{'kept':>8}{'dropped':>9}"
    )
    for s in st.stages:
        dropped = sum(s.stats.dropped.values())
        lines.append(
            f"{s.stage:<10}{s.state:<9}{f'{s.shards_done}/{s.shards_total}':>11}{s.queued:>8}"
            f"{s.leased:>8}{len(s.dead):>6}{s.stats.kept:>8}{dropped:>9}"
        )
    if st.calibration:
        lines.append(f"calibration: {st.calibration}")
    for s in st.stages:
        if s.stats.notes:
            lines.append(f"{s.stage}: {_reasons(s.stats.notes)}")
        if s.stats.dropped:
            lines.append(f"{s.stage} dropped by reason: {_reasons(s.stats.dropped)}")
        for d in s.dead:
            first = d.error.splitlines()[0] if d.error else "?"
            lines.append(f"{s.stage} dead letter {d.task_id} after {d.attempts} attempts: {first}")
    return "\n".join(lines)


def _reasons(counts: dict[str, int]) -> str:
    return ", ".join(f"{r} {n}" for r, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
