"""The run config: paper defaults, strict validation, one-line errors, secrets from env only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from mia_dpo.config import SECRET_FIELDS, RunConfig, load_config
from mia_dpo.errors import UserError


def write(tmp_path: Path, data: Any, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def load_error(path: Path, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(UserError) as err:
        load_config(path, environ=environ or {})
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


def test_defaults_are_the_papers_constants() -> None:
    cfg = load_config(environ={})
    aug = cfg.augment
    assert aug.grid_tile_px == 448
    assert aug.grid_margin_px == 40
    assert aug.grid_label_font_px == 36
    assert aug.pip_scale == 0.7
    assert aug.sequence_counts == {2: 0.55, 3: 0.16, 4: 0.16, 5: 0.13}
    assert aug.grid_counts == {2: 0.53, 3: 0.16, 4: 0.16, 6: 0.08, 9: 0.08}
    assert aug.formats == {"sequence": 1.0, "grid": 1.0, "pic_in_pic": 1.0}
    assert set(aug.skip_bbox_for) == {"grid", "pic_in_pic"}
    assert cfg.queue.max_attempts == 3
    assert cfg.queue.backend == "memory"
    assert cfg.launcher.kind == "inline"
    assert cfg.store.backend == "local"
    assert cfg.stages == ["augment", "generate", "score", "select", "train", "evaluate"]
    assert cfg.seed == 0
    # docs/method.md §2-§4
    assert cfg.generate.max_new_tokens == 512 and cfg.generate.temperature == 0.0
    assert cfg.generate.num_samples == 1 and cfg.generate.noise is False
    assert (cfg.generate.noise_sigma_grid, cfg.generate.noise_sigma_pip) == (225.0, 49.0)
    assert cfg.generate.max_chosen_chars == 512
    assert cfg.score.layer is None  # num_layers // 2
    assert cfg.score.sequence_thresholds == {2: 0.8, 3: 0.7, 4: 0.6, 5: 0.6}
    assert cfg.score.grid_thresholds == {2: 0.7, 3: 0.6, 4: 0.5, 6: 0.4, 9: 0.3}
    assert cfg.score.pic_in_pic_threshold == 0.8 and cfg.score.min_ppl == 1.1
    assert cfg.score.pip_border_fraction == pytest.approx(1 / 6)
    assert cfg.select.iqr_multiplier == 1.5
    assert cfg.select.metrics == ["ppl", "length_ratio", "edit_distance"]
    assert cfg.model.allow_pickle is False and cfg.model.trust_remote_code is False
    # docs/method.md §5
    t = cfg.train
    assert (t.method, t.loss_type, t.beta, t.sft_weight) == ("dpo", "sigmoid", 0.1, 0.0)
    assert (t.lora_r, t.lora_alpha, t.lora_dropout) == (128, 256, 0.05)
    assert (t.learning_rate, t.lr_scheduler, t.warmup_ratio, t.weight_decay) == (
        5e-5, "linear", 0.1, 0.0,
    )  # fmt: skip
    assert (t.epochs, t.batch_size, t.gradient_accumulation_steps, t.max_length) == (
        1.0, 1, 8, 4096,
    )  # fmt: skip


def _fields(model: type[BaseModel], where: str = "") -> list[tuple[str, Any]]:
    out = []
    for name, info in model.model_fields.items():
        out.append((f"{where}{name}", info))
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.extend(_fields(ann, f"{where}{name}."))
    return out


def test_every_field_has_a_description() -> None:
    secrets = {f"{s}.{f}" for s, f in SECRET_FIELDS}
    fields = _fields(RunConfig)
    assert len(fields) > 40  # the walk reached into the sections
    missing = [n for n, info in fields if n not in secrets and not (info.description or "").strip()]
    assert missing == []


def test_yaml_loads(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {
            "seed": 7,
            "input": {"path": "s3://b/data.json", "shard_size": 5, "limit": 10},
            "augment": {"grid_counts": {2: 1, 4: 3}, "formats": {"grid": 1, "sequence": 0}},
            "queue": {"backend": "redis", "url": "redis://redis:6379/2"},
            "launcher": {"kind": "local", "workers": {"augment": 3}},
        },
    )
    cfg = load_config(path, environ={})
    assert cfg.seed == 7
    assert cfg.input.shard_size == 5 and cfg.input.limit == 10
    assert cfg.augment.grid_counts == {2: 1.0, 4: 3.0}
    assert cfg.augment.formats == {"grid": 1.0, "sequence": 0.0}
    assert cfg.launcher.workers_for("augment") == 3
    assert cfg.queue.url == "redis://redis:6379/2"
    assert load_config(write(tmp_path, "", "empty.yaml"), environ={}) == RunConfig()


def test_stored_json_round_trip_is_equal() -> None:
    cfg = RunConfig(seed=3, augment={"grid_counts": {9: 1.0}})
    again = RunConfig.model_validate(cfg.model_dump(mode="json"))
    assert again.stage_params() == cfg.stage_params()


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"augment": {"grid_tile": 448}}, "augment.grid_tile"),
        ({"queue": {"backend": "redis", "hosts": "x"}}, "queue.hosts"),
        ({"sead": 1}, "sead"),
    ],
)
def test_unknown_key(tmp_path: Path, data: dict, field: str) -> None:
    msg = load_error(write(tmp_path, data))
    assert f"{field}: unknown key" in msg
    assert msg.startswith(str(tmp_path / "run.yaml"))


@pytest.mark.parametrize(
    ("data", "names"),
    [
        ({"input": {"shard_size": 0}}, ["input.shard_size"]),
        ({"augment": {"pip_scale": 1.5}}, ["augment.pip_scale"]),
        ({"augment": {"grid_counts": {7: 1}}}, ["augment", "grid_counts", "7"]),
        ({"augment": {"sequence_counts": {1: 1}}}, ["augment", "sequence_counts"]),
        ({"augment": {"formats": {"grid": 0, "sequence": 0}}}, ["augment", "formats"]),
        ({"augment": {"formats": {"collage": 1}}}, ["augment.formats"]),
        ({"augment": {"pip_phrasings": ["no placeholder"]}}, ["pip_phrasings", "{question}"]),
        ({"queue": {"lease_seconds": 0}}, ["queue.lease_seconds"]),
        ({"launcher": {"workers": {"deploy": 2}}}, ["launcher", "workers", "deploy"]),
        ({"train": {"beta": 0}}, ["train.beta"]),
        ({"train": {"method": "ppo"}}, ["train.method"]),
        ({"input": {"holdout_fraction": 1.0}}, ["input.holdout_fraction"]),
        ({"seed": -1}, ["seed"]),
        ({"store": {"backend": "gcs"}}, ["store.backend"]),
        ({"input": "data.json"}, ["input"]),
    ],
)
def test_out_of_range_values_name_the_field(tmp_path: Path, data: dict, names: list[str]) -> None:
    msg = load_error(write(tmp_path, data))
    for name in names:
        assert name in msg


def test_several_problems_are_still_one_line(tmp_path: Path) -> None:
    msg = load_error(write(tmp_path, {"input": {"shard_size": 0}, "augment": {"x": 1}}))
    assert "input.shard_size" in msg and "augment.x: unknown key" in msg


def test_bad_files_name_the_file(tmp_path: Path) -> None:
    bad = write(tmp_path, "seed: [1, 2\naugment: {\n", "bad.yaml")
    assert load_error(bad).startswith(f"{bad}: not valid YAML")
    top_list = write(tmp_path, "- seed: 1\n", "list.yaml")
    msg = load_error(top_list)
    assert msg.startswith(str(top_list)) and "mapping" in msg
    missing = tmp_path / "nope.yaml"
    assert load_error(missing).startswith(f"{missing}: config file not found")
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert load_error(binary).startswith(str(binary))


def test_environment_wins_over_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {
            "queue": {"backend": "redis", "url": "redis://file-host:6379/0"},
            "store": {"backend": "s3", "endpoint": "file-host:9000", "bucket": "file-bucket"},
        },
    )
    env = {
        "MIA_DPO_REDIS_URL": "redis://env-host:6380/3",
        "MIA_DPO_S3_ENDPOINT": "env-host:8333",
        "MIA_DPO_S3_SECURE": "true",
        "MIA_DPO_S3_ACCESS_KEY": "AKIA-env",
        "MIA_DPO_S3_SECRET_KEY": "env-secret",
    }
    cfg = load_config(path, environ=env)
    assert cfg.queue.url == "redis://env-host:6380/3"
    assert cfg.queue.password is None
    assert cfg.store.endpoint == "env-host:8333"
    assert cfg.store.bucket == "file-bucket"  # not overridden: the file's value stays
    assert cfg.store.secure is True
    assert cfg.store.access_key is not None and cfg.store.secret_key is not None
    assert cfg.store.access_key.get_secret_value() == "AKIA-env"
    assert cfg.store.secret_key.get_secret_value() == "env-secret"
    # an empty variable does not override
    assert load_config(path, environ={"MIA_DPO_S3_ENDPOINT": ""}).store.endpoint == "file-host:9000"


def test_secrets_never_serialised(tmp_path: Path) -> None:
    env = {
        "MIA_DPO_REDIS_URL": "redis://:hunter2-pw@redis.svc:6379/1",
        "MIA_DPO_S3_ACCESS_KEY": "AKIA-visible-nowhere",
        "MIA_DPO_S3_SECRET_KEY": "s3-secret-value",
    }
    cfg = load_config(write(tmp_path, {"queue": {"backend": "redis"}}), environ=env)
    assert cfg.queue.url == "redis://redis.svc:6379/1"
    assert cfg.queue.password is not None
    assert cfg.queue.password.get_secret_value() == "hunter2-pw"
    outputs = [cfg.model_dump_json(), repr(cfg), str(cfg), str(cfg.model_dump()), repr(cfg.queue)]
    outputs.append(str(cfg.stage_params()))
    for text in outputs:
        for secret in ("hunter2-pw", "AKIA-visible-nowhere", "s3-secret-value"):
            assert secret not in text
    # a stored copy reloads without credentials
    stored = RunConfig.model_validate_json(cfg.model_dump_json())
    assert stored.queue.password is None and stored.store.access_key is None


@pytest.mark.parametrize(
    ("section", "field", "var"),
    [
        ("store", "access_key", "MIA_DPO_S3_ACCESS_KEY"),
        ("store", "secret_key", "MIA_DPO_S3_SECRET_KEY"),
        ("queue", "password", "MIA_DPO_REDIS_PASSWORD"),
    ],
)
def test_credentials_in_the_file_are_refused(
    tmp_path: Path, section: str, field: str, var: str
) -> None:
    msg = load_error(write(tmp_path, {section: {field: "leaked-credential"}}))
    assert f"{section}.{field}" in msg and var in msg
    assert "leaked-credential" not in msg


def test_password_in_file_url_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, {"queue": {"backend": "redis", "url": "redis://:pw-in-url@h:6379/0"}})
    msg = load_error(path)
    assert "queue" in msg and "url" in msg and "MIA_DPO_REDIS_PASSWORD" in msg
    assert "pw-in-url" not in msg


def test_local_launcher_needs_redis(tmp_path: Path) -> None:
    msg = load_error(write(tmp_path, {"launcher": {"kind": "local"}}))
    assert "launcher.kind" in msg and "redis" in msg
    ok = write(tmp_path, {"launcher": {"kind": "local"}, "queue": {"backend": "redis"}}, "ok.yaml")
    assert load_config(ok, environ={}).launcher.kind == "local"


def test_overrides_apply_before_the_environment() -> None:
    cfg = load_config(
        overrides={"input.shard_size": 9, "queue.backend": "redis", "queue.url": "redis://o:1/0"},
        environ={"MIA_DPO_REDIS_URL": "redis://env:2/0"},
    )
    assert cfg.input.shard_size == 9
    assert cfg.queue.url == "redis://env:2/0"


def test_stage_params_exclude_connections() -> None:
    a = RunConfig(seed=1)
    b = RunConfig(
        seed=1,
        store={"backend": "s3", "endpoint": "elsewhere:1"},
        queue={"backend": "redis", "lease_seconds": 5},
        launcher={"kind": "external", "default_workers": 8},
    )
    assert set(a.stage_params()) == {
        "seed", "input", "augment", "model", "generate", "calibrate", "score", "select", "train",
        "evaluate",
    }  # fmt: skip
    # calibrate.batch_size, like every batch size, changes no output
    assert RunConfig(calibrate={"batch_size": 64}).stage_params() == RunConfig().stage_params()
    assert RunConfig(calibrate={"quantile": 0.2}).stage_params() != RunConfig().stage_params()
    assert RunConfig(generate={"batch_size": 64}).stage_params() == RunConfig().stage_params()
    assert RunConfig(score={"layer": 3}).stage_params() != RunConfig().stage_params()
    assert a.stage_params() == b.stage_params()
    assert RunConfig(seed=2).stage_params() != a.stage_params()
    assert RunConfig(augment={"pip_scale": 0.5}).stage_params() != RunConfig().stage_params()


@pytest.mark.parametrize("name", ["b", "My-Bucket", "-edge", "a..b", "x" * 64, "under_score"])
def test_bad_bucket_names_are_one_line(tmp_path, name: str) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(f"store: {{backend: s3, bucket: '{name}'}}\n")
    with pytest.raises(UserError, match=r"store\.bucket: .* is not an S3 bucket name") as err:
        load_config(path, environ={})
    assert "\n" not in str(err.value)
