"""No credential ever leaves the environment: after a whole run with debug logging,
a dead-lettered shard, `status`, `retry` and the HTML report, neither the Redis
password nor the S3 keys appear in any log line, stored object (run config,
stats, dead letters, pairs, metadata, reports) or command output. Real
redis-server with a password, real SeaweedFS."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mia_dpo.demo.synthetic import write_synthetic
from tests.integration.test_pairs_pipeline import COMMON
from tests.servers import RedisServer

pytestmark = pytest.mark.integration

REDIS_PASSWORD = "redis-pw-Zq81"


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mia_dpo", "-v", *args], env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip


def spellings(secret: str) -> list[str]:
    """The secret as it could leak: raw, URL-quoted, base64, and its first 8 chars."""
    from urllib.parse import quote

    return [secret, quote(secret, safe=""), base64.b64encode(secret.encode()).decode(),
            secret[:8]]  # fmt: skip


def test_no_credential_in_logs_stats_reports_or_the_store(
    tmp_path: Path, tiny_model_dir: Path, s3_server, s3_bucket
) -> None:
    redis = RedisServer().start(tmp_path / "redis", password=REDIS_PASSWORD)
    try:
        src = tmp_path / "src"
        write_synthetic(src, 24, seed=2)
        doc = {**COMMON, "model": {"path": str(tiny_model_dir)},
               "input": {"path": str(src / "data.json"), "image_root": str(src / "images"),
                         "shard_size": 8, "holdout_fraction": 0.2},
               "store": {"backend": "s3", "bucket": s3_bucket["bucket"]},
               "queue": {"backend": "redis", "lease_seconds": 3, "max_attempts": 1},
               "launcher": {"kind": "local", "default_workers": 2}}  # fmt: skip
        cfg_path = tmp_path / "run.yaml"
        cfg_path.write_text(yaml.safe_dump(doc))
        env = dict(os.environ)
        # the password inside the URL, as people write it: it must be split out
        env.update(
            MIA_DPO_REDIS_URL=f"redis://:{REDIS_PASSWORD}@127.0.0.1:{redis.port}/0",
            MIA_DPO_S3_ENDPOINT=s3_bucket["endpoint"],
            MIA_DPO_S3_ACCESS_KEY=s3_bucket["access_key"],
            MIA_DPO_S3_SECRET_KEY=s3_bucket["secret_key"],
            HF_HUB_OFFLINE="1",
        )
        outputs = [run("run", str(cfg_path), "--run-id", "sec", env=env)]
        assert outputs[0].returncode == 0, outputs[0].stderr[-3000:]
        # a failing run too: its error and dead letter are stored and printed. The model
        # passes the run's self-check (config, processor) but has no weights, so the
        # generate workers fail on load and the task is dead-lettered.
        no_weights = tmp_path / "no-weights"
        shutil.copytree(tiny_model_dir, no_weights)
        for weights in no_weights.glob("*.safetensors"):
            weights.unlink()
        bad = {**doc, "model": {"path": str(no_weights)}, "stages": ["augment",
               "generate"]}  # fmt: skip
        bad_path = tmp_path / "bad.yaml"
        bad_path.write_text(yaml.safe_dump(bad))
        outputs.append(run("run", str(bad_path), "--run-id", "sec-bad", env=env))
        assert outputs[-1].returncode != 0
        for args in (
            ("status", "--run-id", "sec", "--config", str(cfg_path)),
            ("status", "--run-id", "sec-bad", "--config", str(bad_path), "--json"),
            ("retry", "--run-id", "sec-bad", "--dead", "--config", str(bad_path)),
            ("report", "--run-id", "sec", "--config", str(cfg_path), "--out",
             str(tmp_path / "report.html")),
        ):  # fmt: skip
            outputs.append(run(*args, env=env))
            assert outputs[-1].returncode == 0, (args, outputs[-1].stderr[-2000:])
        texts = {f"output of {o.args[3:6]}": o.stdout + o.stderr for o in outputs}
        texts["report.html"] = (tmp_path / "report.html").read_text(errors="replace")
        client = s3_server.client()
        for obj in client.list_objects(s3_bucket["bucket"], recursive=True):
            body = client.get_object(s3_bucket["bucket"], obj.object_name).read()
            texts[obj.object_name] = body.decode("latin-1")
        assert any(k.endswith("config.json") for k in texts)
        assert any("dead" in k for k in texts)
        assert "DEBUG" in texts[next(iter(texts))]  # debug logging was on
        for secret in (REDIS_PASSWORD, s3_bucket["secret_key"], s3_bucket["access_key"]):
            for form in spellings(secret):
                leaks = [name for name, text in texts.items() if form in text]
                assert not leaks, f"{form!r} found in {leaks}"
    finally:
        redis.stop()
