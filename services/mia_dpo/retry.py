"""`mia-dpo retry --run-id RUN_ID --dead`: give dead-lettered tasks another chance after a fix.

A stage that ended within its failure budget is marked done with its dead shards
left out, and so is everything downstream of it. Retrying therefore does three
things for each stage with dead letters: moves the tasks back to the queue with a
fresh attempt count (Redis; an in-process run re-enqueues them on its own), and
reopens that stage and every later stage of the run, removing their `_SUCCESS`
and the outputs of single-task stages (select, train, evaluate), which were built
without the missing shards. Shards that finished keep their markers: the next
`mia-dpo run` (or a new controller Job) processes only what is missing.
"""

from __future__ import annotations

import contextlib

from pydantic import BaseModel

from mia_dpo.errors import NotFound, UserError
from mia_dpo.records import SINGLE_TASK_STAGES, STAGE_ORDER
from mia_dpo.runtime import layout
from mia_dpo.runtime.queue import DeadLetter, Queue
from mia_dpo.runtime.store import Store


class RetryPlan(BaseModel):
    run_id: str
    requeued: dict[str, list[str]]  # stage -> task ids given a fresh start
    reopened: list[str]  # stages whose completion was withdrawn


def _stored_dead(store: Store, run_id: str, stage: str) -> list[DeadLetter]:
    with contextlib.suppress(NotFound):
        stored = store.get_json(layout.dead_key(run_id, stage))
        return [DeadLetter.model_validate(d) for d in stored]
    return []


def retry_dead(
    store: Store, queue: Queue | None, run_id: str, stages: list[str] | None = None
) -> RetryPlan:
    try:
        config = store.get_json(layout.config_key(run_id))
    except NotFound:
        raise UserError(f"run {run_id!r}: not found in the store") from None
    run_stages = [s for s in STAGE_ORDER if s in config.get("stages", [])]
    for s in stages or []:
        if s not in run_stages:
            raise UserError(f"--stage: {s!r} is not a stage of run {run_id!r} ({run_stages})")
    requeued: dict[str, list[str]] = {}
    for stage in stages or run_stages:
        letters = queue.dead_letters(run_id, stage) if queue is not None else []
        letters = letters or _stored_dead(store, run_id, stage)
        if not letters:
            continue
        if queue is not None:
            queue.requeue_dead(run_id, stage)
        store.put_json(layout.dead_key(run_id, stage), [])
        requeued[stage] = sorted(d.task_id for d in letters)
    if not requeued:
        return RetryPlan(run_id=run_id, requeued={}, reopened=[])
    first = min(run_stages.index(s) for s in requeued)
    reopened = []
    for stage in run_stages[first:]:
        was_done = store.exists(layout.stage_done_key(run_id, stage))
        store.delete(layout.stage_done_key(run_id, stage))
        if stage in SINGLE_TASK_STAGES and stage not in requeued:
            # built from an incomplete upstream: it must run again on everything
            store.delete(layout.marker_key(run_id, stage, 0))
        if was_done or stage in requeued:
            reopened.append(stage)
    return RetryPlan(run_id=run_id, requeued=requeued, reopened=reopened)


def format_retry(plan: RetryPlan, config_hint: str) -> str:
    if not plan.requeued:
        return f"run {plan.run_id}: no dead-lettered tasks; nothing to retry"
    lines = [
        f"{stage}: {len(ids)} dead task(s) requeued with fresh attempts: {', '.join(ids)}"
        for stage, ids in plan.requeued.items()
    ]
    lines.append(f"reopened: {', '.join(plan.reopened)}")
    lines.append(
        f"now run `mia-dpo run {config_hint} --run-id {plan.run_id}` (on Kubernetes: install "
        "the release again with the same run.id) to process them"
    )
    return "\n".join(lines)
