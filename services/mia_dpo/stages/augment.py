"""The augment stage (docs/method.md §1): one multi-image prompt per source sample.

Reads the plan's shard of source records, augments each (mia_dpo.augmentation), and
writes the samples, the composed images and the drop log. Every draw is seeded by
(run seed, sample id), so any worker, any rerun, gives the same bytes.
"""

from __future__ import annotations

import json

from mia_dpo.augmentation.sampler import augment_sample, source_images
from mia_dpo.data.source import parse_sample
from mia_dpo.errors import SampleError
from mia_dpo.records import ShardStats, Task
from mia_dpo.runtime import layout
from mia_dpo.runtime.context import DropLog, StageContext


def run_shard(task: Task, ctx: StageContext) -> ShardStats:
    cfg = ctx.config
    pools_cache = f"pools:{task.run_id}"
    if pools_cache not in ctx.cache:
        ctx.cache[pools_cache] = ctx.store.get_json(layout.pools_key(task.run_id))
    pools: dict[str, list[str]] = ctx.cache[pools_cache]  # type: ignore[assignment]
    stats = ShardStats(stage="augment", shard=task.shard)
    drops = DropLog(stats)
    loader = source_images(ctx.blobs, cfg.input)
    prefix = layout.augment_images_prefix(task.run_id, task.shard)
    out: list[str] = []
    fallbacks = 0
    for row in ctx.store.get_jsonl(layout.shard_key(task.run_id, "plan", task.shard)):
        rec = json.loads(row)
        line, raw = rec["line"], rec["raw"]
        stats.total += 1
        raw_id = raw.get("id") if isinstance(raw, dict) else None
        # An id of the wrong type (1.5, true, a list) does not name the sample: its line does.
        usable = isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) and raw_id != ""
        label = str(raw_id) if usable else f"line-{line}"
        if rec.get("duplicate_of"):
            drops.drop(
                label, "duplicate_id", f"id {label!r} already used on line {rec['duplicate_of']}"
            )
            continue
        try:
            sample = parse_sample(raw, line)
            record, fell_back = augment_sample(sample, pools, loader, ctx.store, prefix, cfg)
        except SampleError as e:
            drops.drop(label, e.reason, e.detail)
            continue
        fallbacks += fell_back
        key = f"format_{record.format}"
        stats.notes[key] = stats.notes.get(key, 0) + 1
        out.append(record.model_dump_json())
        stats.kept += 1
    ctx.store.put_jsonl(layout.shard_key(task.run_id, "augment", task.shard), out)
    drops.write(ctx.store, task)
    if fallbacks:
        stats.notes["bbox_to_sequence"] = fallbacks
    return stats
