"""Where everything of a run lives in the store. One place, so the controller,
the workers and `mia-dpo status` can never disagree about a key."""

from __future__ import annotations

import re


def run_prefix(run_id: str) -> str:
    return f"runs/{run_id}/"


def config_key(run_id: str) -> str:
    return f"runs/{run_id}/config.json"


def stage_prefix(run_id: str, stage: str) -> str:
    return f"runs/{run_id}/{stage}/"


def shard_key(run_id: str, stage: str, shard: int, suffix: str = "jsonl") -> str:
    return f"runs/{run_id}/{stage}/shard-{shard:05d}.{suffix}"


def marker_key(run_id: str, stage: str, shard: int) -> str:
    """Written last, holding the shard's stats: its presence means the shard is done."""
    return shard_key(run_id, stage, shard, "done")


def dropped_key(run_id: str, stage: str, shard: int) -> str:
    """One JSON line per dropped sample: id, reason, detail."""
    return shard_key(run_id, stage, shard, "dropped.jsonl")


def stage_done_key(run_id: str, stage: str) -> str:
    return f"runs/{run_id}/{stage}/_SUCCESS"


def stage_stats_key(run_id: str, stage: str) -> str:
    return f"runs/{run_id}/{stage}/stats.json"


def dead_key(run_id: str, stage: str) -> str:
    """Dead letters copied at stage close, so status works after an in-process run."""
    return f"runs/{run_id}/{stage}/dead.json"


def plan_key(run_id: str) -> str:
    return f"runs/{run_id}/plan/plan.json"


def pools_key(run_id: str) -> str:
    return f"runs/{run_id}/plan/pools.json"


def holdout_key(run_id: str) -> str:
    """Source records held out for the evaluate stage (same row format as plan shards)."""
    return f"runs/{run_id}/plan/holdout.jsonl"


def holdout_pools_key(run_id: str) -> str:
    return f"runs/{run_id}/plan/holdout_pools.json"


_MARKER = re.compile(r"/shard-(\d{5,})\.done$")


def shard_of_marker(key: str) -> int | None:
    m = _MARKER.search(key)
    return int(m.group(1)) if m else None
