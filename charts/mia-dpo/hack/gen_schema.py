"""Generate charts/mia-dpo/values.schema.json.

The schema is the hand-written base (hack/values.schema.base.json: the chart's own
sections) plus `properties.config`, derived from mia-dpo's pydantic RunConfig so that a
bad run config fails at `helm install` with the same rules the program applies. From the
RunConfig schema this script removes:

- credentials (queue.password, store.access_key, store.secret_key): only Secrets hold them;
- what the chart sets itself (run_id and stages from `run`, the Redis and S3 connection
  from `redis` / `s3`, the kubernetes launcher and its worker counts from the stage
  sections and `controller.cleanup`), and settings of other backends or launchers
  (store.root, launcher.max_restarts, launcher.default_workers).

`$ref`s are inlined and pydantic's titles dropped, so the result is a plain draft-07
schema that Helm's validator reads.

    .venv/bin/python charts/mia-dpo/hack/gen_schema.py          # write values.schema.json
    .venv/bin/python charts/mia-dpo/hack/gen_schema.py --check  # exit 1 if it is stale
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

CHART = Path(__file__).resolve().parents[1]
REPO = CHART.parents[1]
BASE = CHART / "hack" / "values.schema.base.json"
OUTPUT = CHART / "values.schema.json"

# Dotted paths inside RunConfig that the values must not carry.
REMOVED: tuple[str, ...] = (
    "run_id",
    "stages",
    "queue.backend",
    "queue.url",
    "queue.password",
    "store.backend",
    "store.root",
    "store.endpoint",
    "store.bucket",
    "store.secure",
    "store.access_key",
    "store.secret_key",
    "launcher.kind",
    "launcher.workers",
    "launcher.default_workers",
    "launcher.max_restarts",
    "launcher.kubernetes.namespace",
    "launcher.kubernetes.job_templates",
    "launcher.kubernetes.cleanup",
)

CONFIG_DESCRIPTION = (
    "The mia-dpo run configuration (RunConfig), without credentials and without what the "
    "chart sets itself (run_id, stages, the Redis and S3 connection, the launcher's kind, "
    "workers, job_templates and cleanup)."
)


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """Replace every {"$ref": "#/$defs/X"} by a copy of X, recursively; drop titles."""
    if isinstance(node, dict):
        if "$ref" in node:
            name = node["$ref"].removeprefix("#/$defs/")
            merged = {**defs[name], **{k: v for k, v in node.items() if k != "$ref"}}
            return _inline(copy.deepcopy(merged), defs)
        return {k: _inline(v, defs) for k, v in node.items() if k != "title"}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def _remove(schema: dict[str, Any], dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    node = schema
    for key in parents:
        node = node["properties"][key]
    if leaf not in node.get("properties", {}):
        raise SystemExit(f"gen_schema: RunConfig has no field {dotted} (update REMOVED)")
    del node["properties"][leaf]
    if leaf in node.get("required", []):
        node["required"].remove(leaf)


def config_schema() -> dict[str, Any]:
    """The `config` section's schema, from mia_dpo.config.RunConfig."""
    sys.path.insert(0, str(REPO / "services"))
    from mia_dpo.config import RunConfig

    raw = RunConfig.model_json_schema()
    defs = raw.pop("$defs", {})
    schema = _inline(raw, defs)
    for dotted in REMOVED:
        _remove(schema, dotted)
    schema.pop("description", None)
    return {"description": CONFIG_DESCRIPTION, **schema}


def build_schema() -> dict[str, Any]:
    base = json.loads(BASE.read_text(encoding="utf-8"))
    base.pop("description", None)
    base["properties"]["config"] = config_schema()
    return base


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = parser.parse_args(argv)
    text = render(build_schema())
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.is_file() else ""
        if current != text:
            print(f"{OUTPUT} is stale: run {Path(__file__).relative_to(REPO)}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
