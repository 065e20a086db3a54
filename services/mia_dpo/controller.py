"""The controller: plans shards, then runs each stage to completion, in order.

For each stage: skip it if its _SUCCESS marker exists; otherwise open its queue,
enqueue the shards that have no marker, launch workers, wait until every shard
has a marker or is dead-lettered, close the stage, merge its stats, and write
_SUCCESS, unless more shards died than the failure budget allows. Rerunning a
run id therefore resumes it, and a finished run does no work at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydantic import BaseModel

from mia_dpo.config import RunConfig
from mia_dpo.data.source import parse_sample, read_index
from mia_dpo.errors import NotFound, SampleError, UserError
from mia_dpo.records import MODEL_STAGES, SINGLE_TASK_STAGES, STAGE_ORDER, ShardStats, Task
from mia_dpo.runtime import layout
from mia_dpo.runtime.context import StageResolver
from mia_dpo.runtime.launcher_factory import make_launcher
from mia_dpo.runtime.launchers import Launcher, LaunchError
from mia_dpo.runtime.progress import Progress
from mia_dpo.runtime.queue import Queue
from mia_dpo.runtime.store import BlobReader, Store

log = logging.getLogger("mia_dpo.controller")

# How often a waiting controller offers again the shards the queue should hold.
HEAL_SECONDS = 30.0


class RunFailed(Exception):
    """A stage ended with more dead-lettered shards than its failure budget."""


class Plan(BaseModel):
    input: str
    input_sha256: str
    n_records: int
    n_holdout: int = 0
    n_shards: int
    shard_size: int


@dataclass
class StageOutcome:
    stage: str
    skipped: bool
    stats: ShardStats
    dead_shards: list[int]


def done_shards(store: Store, run_id: str, stage: str) -> dict[int, str]:
    """shard -> marker key, from one listing of the stage's prefix."""
    found = {}
    # Only the shard files: a stage folder can also hold thousands of images.
    for key in store.list(layout.stage_prefix(run_id, stage) + "shard-"):
        shard = layout.shard_of_marker(key)
        if shard is not None:
            found[shard] = key
    return found


def store_run_config(store: Store, cfg: RunConfig, run_id: str) -> None:
    """Write the run's config once; a resumed run must not change what decides outputs."""
    key = layout.config_key(run_id)
    try:
        stored = RunConfig.model_validate(store.get_json(key))
    except NotFound:
        store.put_json(key, cfg.model_copy(update={"run_id": run_id}).model_dump(mode="json"))
        return
    if stored.stage_params() != cfg.stage_params():
        old, new = stored.stage_params(), cfg.stage_params()
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise UserError(
            f"run {run_id!r} already exists with different {', '.join(changed)} settings; "
            "use a new --run-id (or restore the original config) to resume"
        )


def is_held_out(cfg: RunConfig, sample_id: str) -> bool:
    """A stable coin per (seed, id): the same samples are held out whatever the order."""
    if cfg.input.holdout_fraction <= 0:
        return False
    digest = hashlib.sha256(f"{cfg.seed}\x00holdout\x00{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < cfg.input.holdout_fraction


def plan_run(store: Store, blobs: BlobReader, cfg: RunConfig, run_id: str) -> Plan:
    """Split the input index into shards and build the distractor pools (once per run)."""
    if not cfg.input.path:
        raise UserError("input.path: no input index given")
    try:
        data = blobs.read(cfg.input.path)
    except NotFound:
        raise UserError(f"input.path: {cfg.input.path}: file not found") from None
    digest = hashlib.sha256(data).hexdigest()
    try:
        existing = Plan.model_validate(store.get_json(layout.plan_key(run_id)))
    except NotFound:
        existing = None
    if existing is not None:
        if existing.input_sha256 != digest:
            raise UserError(
                f"input.path: {cfg.input.path} changed since run {run_id!r} was planned; "
                "use a new --run-id"
            )
        return existing

    records, problems = read_index(data, cfg.input.path)
    if cfg.input.limit is not None:
        records = records[: cfg.input.limit]
    stats = ShardStats(stage="plan", shard=0, total=len(records) + len(problems))
    for _line, reason, _detail in problems:
        stats.drop(reason)
    # Sample ids name output files: a repeated id is dropped, not allowed to overwrite.
    # Held-out samples (for evaluate) are split off here, so they never reach augment,
    # the pairs or training; each side gets its own distractor pools.
    first_line: dict[str, int] = {}
    rows, holdout = [], []
    pools: dict[str, list[str]] = {}
    holdout_pools: dict[str, list[str]] = {}
    seen: set[str] = set()
    for line, raw in records:
        row: dict[str, object] = {"line": line, "raw": raw}
        sid = raw.get("id") if isinstance(raw, dict) else None
        if isinstance(sid, (str, int)) and not isinstance(sid, bool) and str(sid):
            if str(sid) in first_line:
                row["duplicate_of"] = first_line[str(sid)]
            else:
                first_line[str(sid)] = line
        held = "duplicate_of" not in row and sid is not None and is_held_out(cfg, str(sid))
        (holdout if held else rows).append(json.dumps(row, ensure_ascii=False))
        # Distractor candidates per source subset: every distinct image of the samples
        # that parse. Whether an image decodes is found out when it is drawn.
        try:
            sample = parse_sample(raw, line)
        except SampleError:
            continue  # the augment stage drops it, with its reason
        if sample.image not in seen:
            seen.add(sample.image)
            (holdout_pools if held else pools).setdefault(sample.source, []).append(sample.image)
    stats.kept = len(rows)
    if holdout:
        stats.notes["held_out"] = len(holdout)
    size = cfg.input.shard_size
    n_shards = math.ceil(len(rows) / size)
    for i in range(n_shards):
        store.put_jsonl(layout.shard_key(run_id, "plan", i), rows[i * size : (i + 1) * size])
    store.put_jsonl(
        layout.problems_key(run_id),
        [json.dumps({"line": ln, "reason": r, "detail": d}) for ln, r, d in problems],
    )
    store.put_json(layout.pools_key(run_id), pools)
    store.put_jsonl(layout.holdout_key(run_id), holdout)
    store.put_json(layout.holdout_pools_key(run_id), holdout_pools)
    store.put_json(layout.stage_stats_key(run_id, "plan"), stats.model_dump())
    plan = Plan(
        input=cfg.input.path,
        input_sha256=digest,
        n_records=len(records),
        n_holdout=len(holdout),
        n_shards=n_shards,
        shard_size=size,
    )
    store.put_json(layout.plan_key(run_id), plan.model_dump())  # last: the plan's marker
    return plan


class Controller:
    def __init__(
        self,
        cfg: RunConfig,
        run_id: str,
        store: Store,
        queue: Queue,
        *,
        stages: StageResolver,
        launcher: Launcher | None = None,
        progress: bool = True,
        checks: Sequence[Callable[[RunConfig], None]] = (),
    ) -> None:
        """`stages` maps a stage name to its function (for workers this process runs);
        `checks` run before any work (the model self-check). The composition root (the
        CLI) hands both in, so the controller imports no stage and no model code."""
        self.cfg, self.run_id, self.store, self.queue = cfg, run_id, store, queue
        self.checks = checks
        self.launcher = launcher or make_launcher(cfg, store, queue, stages)
        self.show_progress = progress

    def run(self) -> list[StageOutcome]:
        # Plan first: a typo in input.path must not leave a config behind that
        # would then refuse the corrected rerun of the same run id.
        model_stages = [s for s in self.cfg.stages if s in MODEL_STAGES]
        if model_stages and not self.cfg.model.path:
            raise UserError(
                f"model.path: the {model_stages[0]} stage needs a model "
                "(a local directory, e.g. from `mia-dpo tiny-model`, or a hub id)"
            )
        if "evaluate" in self.cfg.stages and self.cfg.input.holdout_fraction <= 0:
            raise UserError(
                "input.holdout_fraction: the evaluate stage needs held-out source samples "
                "(e.g. 0.1); with 0 there is nothing to evaluate on"
            )
        self.launcher.preflight(list(self.cfg.stages))
        for check in self.checks:
            check(self.cfg)
        plan = plan_run(self.store, BlobReader(self.cfg.store), self.cfg, self.run_id)
        store_run_config(self.store, self.cfg, self.run_id)
        log.info("run %s: %d samples in %d shards", self.run_id, plan.n_records, plan.n_shards)
        outcomes: list[StageOutcome] = []
        try:
            for stage in self.cfg.stages:
                outcomes.append(self.run_stage(stage, self.stage_shards(stage, plan)))
        except (RunFailed, LaunchError, UserError):
            # The run is over: workers started by someone else (Compose) for the
            # stages it will not reach must not wait for them forever.
            for stage in self.cfg.stages[len(outcomes) :]:
                self.queue.close_stage(self.run_id, stage)
            raise
        return outcomes

    def stage_shards(self, stage: str, plan: Plan) -> list[int]:
        """The shards a stage works on: all of them for the first stage, then the
        ones its upstream stage finished (a dead-lettered shard stops there)."""
        if stage in SINGLE_TASK_STAGES:
            return [0]
        position = STAGE_ORDER.index(stage)
        if position == 0:
            return list(range(plan.n_shards))
        # the nearest sharded stage before it: calibrate (one task) passes no shards on
        upstream = next(s for s in reversed(STAGE_ORDER[:position]) if s not in SINGLE_TASK_STAGES)
        if not self.store.exists(layout.stage_done_key(self.run_id, upstream)):
            raise UserError(
                f"stages: {stage} needs the output of {upstream}, which run {self.run_id!r} "
                f"has not finished; add {upstream} to stages"
            )
        return sorted(done_shards(self.store, self.run_id, upstream))

    def run_stage(self, stage: str, shards: list[int]) -> StageOutcome:
        run_id, store, queue = self.run_id, self.store, self.queue
        if store.exists(layout.stage_done_key(run_id, stage)):
            # Closed in the queue too (it may have lost its state): workers waiting
            # for this stage exit instead of waiting for work that will not come.
            queue.close_stage(run_id, stage)
            stats = ShardStats.model_validate(store.get_json(layout.stage_stats_key(run_id, stage)))
            return StageOutcome(stage, True, stats, [])
        n_shards = len(shards)
        done = {i: k for i, k in done_shards(store, run_id, stage).items() if i in shards}
        todo = [i for i in shards if i not in done]
        queue.open_stage(run_id, stage)
        # A rerun is the user saying "try again": shards that died last time get
        # a fresh set of attempts.
        queue.requeue_dead(run_id, stage)
        tasks = [Task.make(run_id, stage, i) for i in todo]
        queue.enqueue(run_id, stage, [(t.task_id, t.model_dump_json()) for t in tasks])
        progress = Progress(stage, n_shards, len(done), enabled=self.show_progress)
        n_workers = min(self.cfg.launcher.workers_for(stage), max(len(todo), 1))
        if todo:
            self.launcher.start(run_id, stage, n_workers)
        merged = {i: ShardStats.model_validate_json(store.get_text(k)) for i, k in done.items()}
        poll, last = 0.2, (len(merged), 0)
        wanted = set(shards)
        heal_at = time.monotonic() + HEAL_SECONDS
        try:
            while True:
                for i, key in done_shards(store, run_id, stage).items():
                    if i not in merged and i in wanted:
                        merged[i] = ShardStats.model_validate_json(store.get_text(key))
                dead = {int(d.task_id.rsplit("/", 1)[1]) for d in queue.dead_letters(run_id, stage)}
                dead -= merged.keys()
                progress.update(len(merged), sum(s.total for s in merged.values()), len(dead))
                if len(merged) + len(dead) >= n_shards:
                    break
                self.launcher.check()
                if time.monotonic() >= heal_at:
                    self._heal(stage, sorted(wanted - merged.keys() - dead))
                    heal_at = time.monotonic() + HEAL_SECONDS
                # Each poll lists the store: back off while nothing changes.
                state = (len(merged), len(dead))
                poll = 0.2 if state != last else min(poll * 1.5, 2.0)
                last = state
                time.sleep(poll)
            # A worker that died after a shard's marker but before its ack leaves the
            # task leased, maybe with no worker left to reclaim it (a single-task stage
            # has one): the shard is done, so drop what the queue still holds for it.
            queue.discard(run_id, stage, [Task.make(run_id, stage, i).task_id for i in merged])
        finally:
            queue.close_stage(run_id, stage)
            self.launcher.stop()
            progress.close()
        return self._finish_stage(stage, n_shards, merged, sorted(dead))

    def _heal(self, stage: str, missing: list[int]) -> None:
        """The queue may have lost tasks (Redis restarted without its data, failed over
        to a replica that missed the last writes, or lost the last second of an
        `appendfsync everysec` file in a crash): offer again every shard that has
        neither a marker nor a dead letter. Enqueue skips tasks still queued, leased
        or dead, so normally this adds nothing; a shard done meanwhile is skipped by
        the worker that claims it."""
        if not missing:
            return
        self.queue.open_stage(self.run_id, stage)  # the consumer group may be gone too
        tasks = [Task.make(self.run_id, stage, i) for i in missing]
        added = self.queue.enqueue(
            self.run_id, stage, [(t.task_id, t.model_dump_json()) for t in tasks]
        )
        if added:
            log.warning(
                "stage %s: the queue had lost %d task(s); enqueued them again", stage, added
            )

    def _finish_stage(
        self, stage: str, n_shards: int, merged: dict[int, ShardStats], dead: list[int]
    ) -> StageOutcome:
        run_id, store = self.run_id, self.store
        total = ShardStats(stage=stage, shard=-1)
        for i in sorted(merged):
            total.merge(merged[i])
        store.put_json(layout.stage_stats_key(run_id, stage), total.model_dump())
        letters = self.queue.dead_letters(run_id, stage)
        store.put_json(layout.dead_key(run_id, stage), [d.model_dump() for d in letters])
        allowed = math.floor(self.cfg.launcher.failure_budget * n_shards)
        if len(dead) > allowed:
            first = letters[0].error.splitlines()[0] if letters else "unknown error"
            raise RunFailed(
                f"stage {stage}: {len(dead)} of {n_shards} shards dead-lettered "
                f"(failure budget allows {allowed}); first error: {first}. "
                f"See `mia-dpo status --run-id {run_id}`; fix and rerun the same --run-id "
                "to retry them."
            )
        store.put_json(
            layout.stage_done_key(run_id, stage), {"at": time.time(), "dead_shards": dead}
        )
        return StageOutcome(stage, False, total, dead)
