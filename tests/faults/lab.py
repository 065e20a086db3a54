"""What every fault trial shares: a Redis with append-only persistence and a password,
an S3 server that can be stopped and started again on the same ports and data, the
synthetic source data uploaded to the bucket (the run reads its index and images from
s3://, so an S3 outage hits every reader), and the tiny model.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import redis

from mia_dpo.config import StoreConfig
from mia_dpo.records import DEFAULT_STAGES, SINGLE_TASK_STAGES
from mia_dpo.runtime.store import S3Store
from tests.servers import RedisServer, SeaweedS3, find_weed, pid_alive, seaweed_server

# The default pipeline (calibrate runs only when asked for; its own tests cover it)
STAGES: tuple[str, ...] = tuple(DEFAULT_STAGES)
SHARDED = tuple(s for s in STAGES if s not in SINGLE_TASK_STAGES)
NAMESPACE = "mia-dpo"
REF_RUN = "ref"
EXIT_STOPPED = 75  # mia_dpo.cli.pipeline.EXIT_STOPPED


class TrialError(RuntimeError):
    """The trial itself could not go on (a hang guard expired, a server did not start)."""


# ----------------------------------------------------------------------- servers


class FaultRedis(RedisServer):
    """RedisServer that can be taken down (crash or clean stop) and brought back."""

    def halt(self, hard: bool) -> None:
        if hard and self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while pid_alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            self.pid = None
        else:
            self.stop()

    def resume(self, timeout: float = 30.0) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise TrialError("redis-server vanished from PATH")
        self._spawn(exe, timeout)


class FaultS3(SeaweedS3):
    """SeaweedS3 that can be stopped and started again on the SAME ports and data
    directory (tests/servers picks new ports at every start)."""

    def halt(self) -> None:
        self.stop()  # keeps self.ports and self.dir

    def resume(self, timeout: float = 90.0) -> None:
        assert self.dir is not None and self.ports
        ports = [self.ports[k] for k in ("master", "volume", "filer", "s3")]
        # _spawn_once draws its ports from free_seaweed_ports: hand it the old ones.
        with mock.patch.object(seaweed_server, "free_seaweed_ports", lambda n: list(ports)):
            self._spawn_once(find_weed(), self.dir / "s3.json", self.dir / "data", timeout)


# --------------------------------------------------------------------------- the lab


@dataclass
class LabSpec:
    n_samples: int = 40
    shard_size: int = 6
    data_seed: int = 11
    seed: int = 5
    workers: int = 2
    lease_seconds: float = 3.0
    max_attempts: int = 5
    train_epochs: float = 0.5


class Lab:
    """Servers, source data in the bucket and the model: shared by every trial."""

    bucket = "faults"

    def __init__(self, root: Path, model_dir: Path, spec: LabSpec | None = None) -> None:
        self.root = Path(root)
        self.model_dir = Path(model_dir)
        self.spec = spec or LabSpec()
        self.redis = FaultRedis()
        self.s3 = FaultS3()
        self._store: S3Store | None = None

    # -- lifecycle ------------------------------------------------------------------
    def start(self) -> Lab:
        from mia_dpo.demo.synthetic import write_synthetic

        self.root.mkdir(parents=True, exist_ok=True)
        self.redis.start(self.root / "redis", appendonly=True, password="pw" + secrets.token_hex(8))
        try:
            self.s3.start(self.root / "s3")
            src = self.root / "source"
            write_synthetic(src, self.spec.n_samples, seed=self.spec.data_seed)
            inputs = S3Store(self.store_config(prefix="inputs"))
            inputs.put_bytes("data.json", (src / "data.json").read_bytes())
            for path in sorted((src / "images").rglob("*.png")):
                rel = path.relative_to(src / "images").as_posix()
                inputs.put_bytes(f"images/{rel}", path.read_bytes())
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.s3.stop()
        with contextlib.suppress(Exception):
            self.redis.stop()

    def __enter__(self) -> Lab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- connections ------------------------------------------------------------------
    def store_config(self, prefix: str = "") -> StoreConfig:
        return StoreConfig(
            backend="s3", endpoint=self.s3.endpoint, bucket=self.bucket, prefix=prefix,
            access_key=self.s3.access_key, secret_key=self.s3.secret_key, retry_seconds=180,
        )  # fmt: skip

    @property
    def store(self) -> S3Store:
        if self._store is None:
            self._store = S3Store(self.store_config())
        return self._store

    def redis_client(self) -> redis.Redis:
        return redis.Redis.from_url(
            self.redis.url, decode_responses=True, socket_timeout=5, socket_connect_timeout=2
        )

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            MIA_DPO_REDIS_URL=self.redis.url,
            MIA_DPO_S3_ENDPOINT=self.s3.endpoint,
            MIA_DPO_S3_ACCESS_KEY=self.s3.access_key,
            MIA_DPO_S3_SECRET_KEY=self.s3.secret_key,
            HF_HUB_OFFLINE="1",
            # one intra-op thread per worker: 2 workers on 2 cores, in every run alike
            OMP_NUM_THREADS="1",
            TOKENIZERS_PARALLELISM="false",
            PYTHONWARNINGS="ignore",
        )
        return env

    def config(self, launcher: str) -> dict[str, Any]:
        s = self.spec
        return {
            "seed": s.seed,
            "stages": list(STAGES),
            "input": {
                "path": f"s3://{self.bucket}/inputs/data.json",
                "image_root": f"s3://{self.bucket}/inputs/images",
                "shard_size": s.shard_size,
                "holdout_fraction": 0.2,
            },
            "store": {"backend": "s3", "bucket": self.bucket},
            "queue": {
                "backend": "redis",
                "lease_seconds": s.lease_seconds,
                "max_attempts": s.max_attempts,
                "poll_seconds": 0.2,
            },
            "launcher": {"kind": launcher, "default_workers": s.workers, "max_restarts": 50},
            "model": {"path": str(self.model_dir)},
            # small collages: the tiny model sees 64 px anyway
            "augment": {"grid_tile_px": 64, "grid_margin_px": 16, "grid_label_font_px": 12},
            "generate": {"max_new_tokens": 6, "batch_size": 3},
            "score": {"batch_size": 3},
            "select": {"min_pairs_for_fences": 4},
            "train": {
                "lora_r": 4,
                "lora_alpha": 8,
                "batch_size": 4,
                "gradient_accumulation_steps": 1,
                "max_length": 1024,
                "learning_rate": 1.0e-3,
                "epochs": s.train_epochs,
                "save_steps": 2,
                "logging_steps": 1,
            },
            "evaluate": {"max_new_tokens": 4, "formats": ["sequence", "grid"]},
        }


@contextlib.contextmanager
def lab_session(root: Path, model_dir: Path, spec: LabSpec | None = None) -> Iterator[Lab]:
    lab = Lab(root, model_dir, spec)
    with lab:
        yield lab
