"""Checks, straight in the S3 store, what a finished Compose run must have left there.

Run by docker/ci-e2e.sh inside the light image on the Compose network, with the
same environment as the mia-dpo services (MIA_DPO_S3_*, MIA_DPO_RUN_ID). It uses the
minio client only (not mia-dpo's store code), so it checks the objects themselves:

- every stage's _SUCCESS marker (augment .. evaluate);
- runs/RUN/select/pairs.trl.jsonl and pairs.jsonl: at least one DPO pair, each
  with a prompt, a chosen and a rejected answer and images that exist (composed
  images in the store, source images of a sequence under the input's image root);
- runs/RUN/train/adapter/: a LoRA adapter (adapter_config.json and a non-empty
  adapter_model.safetensors);
- runs/RUN/evaluate/report.json: the base and the adapted model each scored on
  the held-out multi-image questions.

Exits 1 with one line per problem.
"""

from __future__ import annotations

import json
import os
import sys

from minio import Minio
from minio.error import S3Error

STAGES = ["augment", "generate", "score", "select", "train", "evaluate"]

run = os.environ.get("MIA_DPO_RUN_ID", "demo")
bucket = os.environ.get("MIA_DPO_S3_BUCKET", "mia-dpo")
client = Minio(
    os.environ["MIA_DPO_S3_ENDPOINT"],
    access_key=os.environ["MIA_DPO_S3_ACCESS_KEY"],
    secret_key=os.environ["MIA_DPO_S3_SECRET_KEY"],
    secure=False,
)
problems: list[str] = []
prefix = f"runs/{run}/"


def get(key: str) -> bytes | None:
    try:
        resp = client.get_object(bucket, key)
    except S3Error as e:
        problems.append(f"{key}: {e.code}")
        return None
    try:
        return resp.read()
    finally:
        resp.close()
        resp.release_conn()


def size(key: str) -> int:
    try:
        return client.stat_object(bucket, key).size or 0
    except S3Error as e:
        problems.append(f"{key}: {e.code}")
        return -1


keys = [o.object_name for o in client.list_objects(bucket, prefix=prefix, recursive=True)]
print(f"s3://{bucket}/{prefix}: {len(keys)} objects")
for stage in STAGES:
    if f"{prefix}{stage}/_SUCCESS" not in keys:
        problems.append(f"{prefix}{stage}/_SUCCESS: missing (stage not finished)")

# --- pairs
pairs_raw = get(f"{prefix}select/pairs.trl.jsonl")
pairs = [json.loads(line) for line in (pairs_raw or b"").decode().splitlines() if line.strip()]
plain = get(f"{prefix}select/pairs.jsonl")
n_plain = len([line for line in (plain or b"").decode().splitlines() if line.strip()])
print(f"pairs: {len(pairs)} (pairs.trl.jsonl), {n_plain} (pairs.jsonl)")
if pairs_raw is not None and not pairs:
    problems.append(f"{prefix}select/pairs.trl.jsonl: no pairs")
if plain is not None and n_plain != len(pairs):
    problems.append(f"pairs.jsonl has {n_plain} pairs, pairs.trl.jsonl {len(pairs)}")
for p in pairs[:5]:
    if not (p.get("prompt") and p.get("chosen") and p.get("rejected") and p.get("images")):
        problems.append(f"pair {p.get('id')}: missing prompt, chosen, rejected or images")
        continue
    for uri in p["images"]:
        # composed images (grid, pic-in-pic) live in the store; a sequence names the
        # source images themselves (here: the demo baked into this image)
        head = f"s3://{bucket}/"
        if uri.startswith("s3://"):
            if not uri.startswith(head) or uri[len(head) :] not in keys:
                problems.append(f"pair {p['id']}: image {uri} not in the store")
        elif not os.path.isfile(uri):
            problems.append(f"pair {p['id']}: image {uri} not found")
by_format: dict[str, int] = {}
for p in pairs:
    by_format[p.get("format", "?")] = by_format.get(p.get("format", "?"), 0) + 1
print("pairs per format:", ", ".join(f"{k} {v}" for k, v in sorted(by_format.items())))

# --- adapter
adapter = f"{prefix}train/adapter/"
n_weights = size(adapter + "adapter_model.safetensors")
config = get(adapter + "adapter_config.json")
if n_weights == 0:
    problems.append(adapter + "adapter_model.safetensors: empty")
if config is not None:
    cfg = json.loads(config)
    print(f"adapter: {cfg.get('peft_type')} r={cfg.get('r')}, weights {n_weights} bytes")

# --- evaluation report
report_raw = get(f"{prefix}evaluate/report.json")
if report_raw is not None:
    report = json.loads(report_raw)
    models = report.get("models", {})
    if not {"base", "adapted"} <= set(models):
        problems.append(f"report.json: models {sorted(models)}, expected base and adapted")
    for name in sorted(models):
        multi = models[name].get("multi_image", {})
        print(f"evaluate {name}: multi-image accuracy {multi.get('accuracy')} (n {multi.get('n')})")
        if not multi.get("n"):
            problems.append(f"report.json: no multi-image items scored for {name}")

if problems:
    print("STORE CHECK FAILED:", file=sys.stderr)
    for line in problems:
        print("  " + line, file=sys.stderr)
    sys.exit(1)
print("store check: ok")
