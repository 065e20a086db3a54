"""Counting lost and duplicated work of a fault trial, from the store and the Redis
streams only (never from logs):

- lost: a shard of any stage without its marker or outputs, a task left in a stream
  without a marker, a dead letter; a planned sample missing from a stage's outputs;
- duplicated: a sample id appearing more often than planned in a stage's outputs, a
  shard whose outputs differ from the clean run's (processed again with another
  result), a task still queued or leased although its shard has a marker;

and checks that both pairs files are byte-identical to the clean run's (the run id
inside composed-image URIs, `s3://bucket/runs/{id}/...`, is the one difference
allowed; those images are compared by ETag), that every stage wrote `_SUCCESS` with
no dead shards, and that training left an adapter and evaluation a report.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from mia_dpo.errors import NotFound
from mia_dpo.runtime import layout
from tests.faults.lab import NAMESPACE, REF_RUN, SHARDED, STAGES, Lab

# ----------------------------------------------------------------- the clean run


def _norm(data: bytes, run_id: str) -> bytes:
    """The run id appears in composed-image URIs (s3://bucket/runs/{id}/augment/...)."""
    return data.replace(f"/runs/{run_id}/".encode(), b"/runs/{RUN}/")


def _compared(rel: str) -> str | None:
    """Which of a run's objects must be identical to the clean run's: 'bytes', 'etag'
    (images) or None (stats with timings, markers, training outputs, ...)."""
    stage, _, name = rel.partition("/")
    if stage in ("augment", "evaluate") and name.startswith("images/"):
        return "etag"
    if stage == "plan" and name != "plan.json" and name != "stats.json":
        return "bytes"
    if stage in SHARDED and name.startswith("shard-") and name.endswith(".jsonl"):
        return "bytes"
    if stage == "select" and name.endswith(".jsonl"):
        return "bytes"
    if stage == "evaluate" and name == "items.jsonl":
        return "bytes"
    return None


def _objects(lab: Lab, run_id: str) -> dict[str, str]:
    """rel key (under runs/{id}/) -> ETag, from one listing."""
    prefix = layout.run_prefix(run_id)
    client = lab.store.client
    return {
        o.object_name[len(prefix) :]: (o.etag or "").strip('"')
        for o in client.list_objects(lab.bucket, prefix=prefix, recursive=True)
    }


@dataclass
class Reference:
    run_id: str
    files: dict[str, bytes]  # rel key -> normalised bytes
    etags: dict[str, str]  # rel key -> ETag (images)
    shards: dict[str, list[int]]
    seconds: dict[str, float]  # longest task per stage (from the markers' stats)

    @classmethod
    def capture(cls, lab: Lab, run_id: str = REF_RUN) -> Reference:
        objs = _objects(lab, run_id)
        files, etags = {}, {}
        for rel, etag in objs.items():
            kind = _compared(rel)
            if kind == "bytes":
                files[rel] = _norm(lab.store.get_bytes(layout.run_prefix(run_id) + rel), run_id)
            elif kind == "etag":
                etags[rel] = etag
        shards: dict[str, list[int]] = {}
        seconds: dict[str, float] = {}
        for stage in STAGES:
            done = sorted(
                int(rel.rsplit("shard-", 1)[1][:-5])
                for rel in objs
                if rel.startswith(f"{stage}/shard-") and rel.endswith(".done")
            )
            shards[stage] = done
            secs = [
                json.loads(lab.store.get_text(layout.marker_key(run_id, stage, i)))["seconds"]
                for i in done
            ]
            seconds[stage] = max(secs) if secs else 1.0
        return cls(run_id, files, etags, shards, seconds)


# ------------------------------------------------------------------- what a trial gave


@dataclass
class Outcome:
    run_id: str
    fault: str
    launcher: str
    rc: int | None = None
    completed: bool = False
    seconds: float = 0.0
    lost_tasks: list[str] = field(default_factory=list)
    lost_samples: list[str] = field(default_factory=list)
    dup_tasks: list[str] = field(default_factory=list)
    dup_samples: list[str] = field(default_factory=list)
    differing: list[str] = field(default_factory=list)  # objects unlike the clean run's
    pairs_identical: bool = False
    train_ok: bool = False
    evaluate_ok: bool = False
    requeued: dict[str, int] = field(default_factory=dict)  # XADDs beyond the first enqueue
    redelivered: list[str] = field(default_factory=list)  # tasks seen claimed twice or more
    problems: list[str] = field(default_factory=list)  # anything else that is wrong
    events: list[dict[str, Any]] = field(default_factory=list)
    worker_exits: dict[str, int] = field(default_factory=dict)
    stage_end_s: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return (
            self.completed
            and not self.lost_tasks
            and not self.lost_samples
            and not self.dup_tasks
            and not self.dup_samples
            and not self.differing
            and self.pairs_identical
            and self.train_ok
            and self.evaluate_ok
            and not self.problems
            and self.error is None
        )

    def summary(self) -> str:
        return json.dumps(asdict(self), indent=1, default=str)[:6000]


# ------------------------------------------------------------------------ the audit


def _rows(lab: Lab, key: str) -> list[dict[str, Any]]:
    try:
        return [json.loads(x) for x in lab.store.get_jsonl(key)]
    except NotFound:
        return []


def _multiset_diff(expected: list[str], got: list[str], what: str, out: Outcome) -> None:
    exp, have = Counter(expected), Counter(got)
    out.lost_samples += [f"{what}:{k}" for k, n in (exp - have).items() for _ in range(n)]
    out.dup_samples += [f"{what}:{k}" for k, n in (have - exp).items() for _ in range(n)]


def audit(lab: Lab, ref: Reference, out: Outcome) -> Outcome:
    """Count lost and duplicated work of out.run_id from the store and Redis."""
    run_id = out.run_id
    objs = _objects(lab, run_id)
    prefix = layout.run_prefix(run_id)

    # 1. every stage finished, with no dead shards
    for stage in STAGES:
        if f"{stage}/_SUCCESS" not in objs:
            out.problems.append(f"{stage}: no _SUCCESS")
        dead = _rows_json(lab, layout.dead_key(run_id, stage))
        for d in dead or []:
            out.lost_tasks.append(f"{d.get('task_id')} (dead letter)")
    out.completed = out.rc == 0 and all(f"{s}/_SUCCESS" in objs for s in STAGES)

    # 2. every shard of every stage has its marker and outputs
    for stage in STAGES:
        for i in ref.shards[stage]:
            name = f"{stage}/shard-{i:05d}"
            need = [".done"] + ([".jsonl", ".dropped.jsonl"] if stage != "evaluate" else [])
            if any(name + suffix not in objs for suffix in need):
                out.lost_tasks.append(f"{run_id}/{stage}/{i:05d}")
        extra = [
            rel for rel in objs if rel.startswith(f"{stage}/shard-") and rel.endswith(".done")
            and int(rel.rsplit("shard-", 1)[1][:-5]) not in ref.shards[stage]
        ]  # fmt: skip
        out.dup_tasks += [f"{stage}: unexpected {rel}" for rel in extra]

    # 3. outputs identical to the clean run's
    for rel, want in ref.files.items():
        if rel not in objs:
            continue  # counted as lost above (or a plan file: below)
        got = _norm(lab.store.get_bytes(prefix + rel), run_id)
        if got != want:
            out.differing.append(rel)
    for rel, etag in ref.etags.items():
        if objs.get(rel) != etag:
            out.differing.append(rel)
    missing_plan = [rel for rel in ref.files if rel.startswith("plan/") and rel not in objs]
    out.lost_tasks += [f"plan file {rel}" for rel in missing_plan]
    pairs = ("select/pairs.jsonl", "select/pairs.trl.jsonl")
    out.pairs_identical = all(rel in objs and rel not in out.differing for rel in pairs)
    # a shard with outputs unlike the clean run's was (re)done with another result
    for rel in out.differing:
        stage, _, name = rel.partition("/")
        if name.startswith("shard-"):
            out.dup_tasks.append(f"{run_id}/{stage}/{name[6:11]} (outputs differ)")

    # 4. sample ids through the stages: planned -> augment -> generate -> score -> pairs
    planned = [
        str(r["raw"]["id"])
        for i in ref.shards["augment"]
        for r in _rows(lab, layout.shard_key(run_id, "plan", i))
    ]
    aug_src, aug_ids, gen_ids, gen_expected, score_ids = [], [], [], [], []
    drops: dict[str, list[str]] = {s: [] for s in SHARDED}
    for stage in SHARDED:
        for i in ref.shards[stage]:
            drops[stage] += [str(d["id"]) for d in _rows(lab, layout.dropped_key(run_id, stage, i))]
    for i in ref.shards["augment"]:
        for r in _rows(lab, layout.shard_key(run_id, "augment", i)):
            aug_src.append(str(r["source_id"]))
            aug_ids.append(r["sample_id"])
    for i in ref.shards["generate"]:
        for r in _rows(lab, layout.shard_key(run_id, "generate", i)):
            gen_ids.append(r["sample"]["sample_id"])
            gen_expected += [f"{r['sample']['sample_id']}-r{k}" for k in range(len(r["responses"]))]
    for i in ref.shards["score"]:
        for r in _rows(lab, layout.shard_key(run_id, "score", i)):
            score_ids.append(f"{r['sample']['sample_id']}-r{r['response_index']}")
    _multiset_diff(planned, aug_src + drops["augment"], "augment", out)
    _multiset_diff(aug_ids, gen_ids + drops["generate"], "generate", out)
    _multiset_diff(gen_expected, score_ids, "score", out)
    pair_ids = [str(r["id"]) for r in _rows(lab, f"{prefix}select/pairs.jsonl")]
    out.dup_samples += [f"select:{k}" for k, n in Counter(pair_ids).items() for _ in range(n - 1)]

    # 5. training and evaluation finished and left their outputs
    meta = _rows_json(lab, f"{prefix}train/metadata.json")
    out.train_ok = (
        isinstance(meta, dict)
        and meta.get("steps", 0) > 0
        and "train/adapter/adapter_config.json" in objs
        and any(rel.startswith("train/adapter/adapter_model") for rel in objs)
    )
    report = _rows_json(lab, f"{prefix}evaluate/report.json")
    out.evaluate_ok = isinstance(report, dict) and set(report.get("models", {})) == {
        "base",
        "adapted",
    }

    # 6. the queue: every task acked, nothing queued or leased, no dead letters
    r = lab.redis_client()
    try:
        for stage in STAGES:
            k = f"{NAMESPACE}:{run_id}:{stage}:"
            for eid, fields in r.xrange(k + "stream"):
                shard = int(fields["id"].rsplit("/", 1)[1])
                if (f"{stage}/shard-{shard:05d}.done") in objs:
                    out.dup_tasks.append(f"{fields['id']} still in the stream (entry {eid})")
                else:
                    out.lost_tasks.append(f"{fields['id']} never finished (entry {eid})")
            for tid in r.hkeys(k + "dead"):
                out.lost_tasks.append(f"{tid} dead-lettered")
            if r.hlen(k + "live") or r.hlen(k + "attempts"):
                out.problems.append(
                    f"{stage}: live {r.hkeys(k + 'live')} attempts {r.hkeys(k + 'attempts')}"
                )
            if r.hget(k + "state", "closed") != "1":
                out.problems.append(f"{stage}: queue not closed")
            if r.exists(k + "stream"):
                added = int(r.xinfo_stream(k + "stream")["entries-added"])
                out.requeued[stage] = added - len(ref.shards[stage])
    finally:
        r.close()
    out.lost_tasks = sorted(set(out.lost_tasks))
    out.dup_tasks = sorted(set(out.dup_tasks))
    return out


def _rows_json(lab: Lab, key: str) -> Any:
    try:
        return lab.store.get_json(key)
    except NotFound:
        return None


def stage_ends(lab: Lab, run_id: str, wall0: float) -> dict[str, float]:
    """When each stage's _SUCCESS was written, in seconds from the trial's start."""
    ends = {}
    for stage in STAGES:
        marker = _rows_json(lab, layout.stage_done_key(run_id, stage))
        if isinstance(marker, dict) and "at" in marker:
            ends[stage] = round(marker["at"] - wall0, 1)
    return ends
