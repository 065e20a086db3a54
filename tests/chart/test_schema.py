"""values.schema.json: generated from the hand-written base plus mia-dpo's RunConfig,
and strict enough that bad values fail at `helm install` with the field named."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from mia_dpo.config import RunConfig
from tests.chart.chart import CHART, template

GEN = CHART / "hack" / "gen_schema.py"


def _gen_schema() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_schema", GEN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_schema_is_generated() -> None:
    gen = _gen_schema()
    committed = (CHART / "values.schema.json").read_text(encoding="utf-8")
    assert committed == gen.render(gen.build_schema()), (
        "charts/mia-dpo/values.schema.json is stale: run "
        ".venv/bin/python charts/mia-dpo/hack/gen_schema.py"
    )


def test_config_schema_follows_runconfig() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    config = schema["properties"]["config"]
    assert "$ref" not in json.dumps(config)
    runconfig = RunConfig.model_json_schema()["properties"]
    assert set(config["properties"]) == set(runconfig) - {"run_id", "stages"}
    model = config["properties"]["model"]
    assert model["additionalProperties"] is False
    assert model["properties"]["dtype"]["enum"] == ["auto", "float32", "float16", "bfloat16"]
    # credentials and what the chart sets are not values
    assert set(config["properties"]["queue"]["properties"]).isdisjoint({"password", "url"})
    store = set(config["properties"]["store"]["properties"])
    assert store.isdisjoint({"access_key", "secret_key", "endpoint", "bucket", "backend"})
    launcher = config["properties"]["launcher"]["properties"]
    assert launcher.keys().isdisjoint({"kind", "workers"})
    assert launcher["kubernetes"]["properties"].keys().isdisjoint({"job_templates", "cleanup"})


def test_own_sections_are_closed() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    for name, prop in schema["properties"].items():
        if name in ("global", "podSecurityContext", "securityContext"):
            continue
        target = prop
        if "$ref" in prop:
            target = schema["definitions"][prop["$ref"].rsplit("/", 1)[1]]
        maps = ("podAnnotations", "podLabels", "jobAnnotations", "jobLabels")
        if target.get("type") == "object" and name not in maps:
            assert target.get("additionalProperties") is False, name


BAD_VALUES = [
    ("unknown top-level key", {"paralelism": 2}, "Additional property paralelism is not allowed"),
    ("negative parallelism", {"augment": {"parallelism": -1}}, "augment.parallelism"),
    ("zero parallelism", {"generate": {"parallelism": 0}}, "generate.parallelism"),
    ("unknown key in a stage", {"score": {"gpus": 2}}, "Additional property gpus"),
    ("unknown key in config.model", {"config": {"model": {"pth": "x"}}}, "config.model"),
    ("wrong enum in config", {"config": {"model": {"dtype": "float8"}}}, "config.model.dtype"),
    ("wrong enum in values", {"controller": {"cleanup": "sometimes"}}, "controller.cleanup"),
    ("wrong pull policy", {"image": {"pullPolicy": "Sometimes"}}, "image.pullPolicy"),
    ("unknown stage", {"run": {"stages": ["augment", "polish"]}}, "run.stages.1"),
    ("bad run id", {"run": {"id": "Run_1"}}, "run.id"),
    ("float where int", {"train": {"nodes": 1.5}}, "train.nodes"),
    ("config out of range", {"config": {"generate": {"top_p": 1.5}}}, "config.generate.top_p"),
    ("credential in config", {"config": {"queue": {"password": "x"}}}, "config.queue"),
    ("s3 key in config", {"config": {"store": {"secret_key": "x"}}}, "config.store"),
    ("chart-set field", {"config": {"store": {"endpoint": "x:1"}}}, "config.store"),
    ("chart-set launcher", {"config": {"launcher": {"kind": "local"}}}, "config.launcher"),
    ("external redis w/o host", {"redis": {"enabled": False}}, "redis.host"),
    ("external s3 w/o endpoint", {"s3": {"minio": {"enabled": False}}}, "s3.endpoint"),
    ("endpoint with scheme", {"s3": {"endpoint": "https://s3:443"}}, "s3.endpoint"),
    ("gpu on train", {"train": {"gpu": 1}}, "Additional property gpu"),
    ("bad quantity", {"scratch": {"sizeLimit": "lots"}}, "scratch.sizeLimit"),
]


@pytest.mark.parametrize(
    ("values", "message"), [b[1:] for b in BAD_VALUES], ids=[b[0] for b in BAD_VALUES]
)
def test_bad_values_are_refused(values: dict[str, object], message: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(values))
    proc = template(path)
    assert proc.returncode != 0, f"accepted: {values}"
    assert message in proc.stderr, proc.stderr


TEMPLATE_ERRORS = [
    (
        "external redis without credentials",
        {"redis": {"enabled": False, "host": "redis.example"}},
        "redis.existingSecret or redis.password",
    ),
    (
        "external s3 without credentials",
        {"s3": {"minio": {"enabled": False}, "endpoint": "s3.example:443"}},
        "s3.existingSecret or both s3.accessKey and s3.secretKey",
    ),
    ("data without a volume", {"data": {"enabled": True}}, "data.volume"),
]


@pytest.mark.parametrize(
    ("values", "message"), [t[1:] for t in TEMPLATE_ERRORS], ids=[t[0] for t in TEMPLATE_ERRORS]
)
def test_incomplete_values_fail_with_a_message(
    values: dict[str, object], message: str, tmp_path: Path
) -> None:
    path = tmp_path / "incomplete.yaml"
    path.write_text(yaml.safe_dump(values))
    proc = template(path)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


def test_good_config_values_pass(tmp_path: Path) -> None:
    path = tmp_path / "good.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "config": {
                    "seed": 3,
                    "input": {"limit": 100, "shard_size": 8},
                    "augment": {"formats": {"grid": 1.0}, "grid_counts": {2: 1.0}},
                    "score": {"layer": None, "min_ppl": 1.2},
                    "queue": {"lease_seconds": 30},
                    "launcher": {"failure_budget": 0.1, "kubernetes": {"poll_seconds": 1}},
                    "train": {"learning_rate": 1e-5},
                }
            }
        )
    )
    proc = template(path)
    assert proc.returncode == 0, proc.stderr
