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


def problems_key(run_id: str) -> str:
    """Index lines the plan could not read: line, reason, detail."""
    return f"runs/{run_id}/plan/problems.jsonl"


# --- stage outputs beyond shards ------------------------------------------------------


def augment_images_prefix(run_id: str, shard: int) -> str:
    """Composed images (grid collages, pic-in-pic) of one augment shard."""
    return f"runs/{run_id}/augment/images/shard-{shard:05d}"


def calibration_key(run_id: str, name: str = "calibration.json") -> str:
    """calibration.json (what the score stage reads) and auc_by_layer.png."""
    return stage_prefix(run_id, "calibrate") + name


def pairs_key(run_id: str) -> str:
    """The reference layout: id, image, prompt, chosen, rejected + the selecting metrics."""
    return stage_prefix(run_id, "select") + "pairs.jsonl"


def trl_pairs_key(run_id: str) -> str:
    """TRL DPOTrainer's vision layout; the train stage reads this one."""
    return stage_prefix(run_id, "select") + "pairs.trl.jsonl"


def evaluate_key(run_id: str, name: str) -> str:
    """items.jsonl, predictions.jsonl, report.json, report.md; `images` is the folder
    of the benchmark's composed images."""
    return stage_prefix(run_id, "evaluate") + name


# The train stage's outputs hang off a prefix: `runs/R/train/` in a run, "" in the
# folder of a standalone `mia-dpo train`, so both share these names.


def train_prefix(run_id: str) -> str:
    return stage_prefix(run_id, "train")


def adapter_prefix(prefix: str) -> str:
    """The LoRA adapter, PEFT's save_pretrained layout."""
    return f"{prefix}adapter/"


def merged_prefix(prefix: str) -> str:
    return f"{prefix}merged/"


def tensorboard_prefix(prefix: str) -> str:
    """TensorBoard event files of the training run (train.report_to tensorboard)."""
    return f"{prefix}tensorboard/"


def train_metadata_key(prefix: str) -> str:
    return f"{prefix}metadata.json"


def checkpoints_prefix(prefix: str) -> str:
    return f"{prefix}checkpoints/"


def checkpoint_prefix(prefix: str, step: int) -> str:
    return f"{checkpoints_prefix(prefix)}checkpoint-{step}/"


def latest_checkpoint_key(prefix: str) -> str:
    """The pointer to the last complete checkpoint, written after its files."""
    return f"{checkpoints_prefix(prefix)}latest.json"


_MARKER = re.compile(r"/shard-(\d{5,})\.done$")


def shard_of_marker(key: str) -> int | None:
    m = _MARKER.search(key)
    return int(m.group(1)) if m else None
