"""Shared fixtures: real Redis and real S3 (SeaweedFS) servers, started once per session.

Nothing here skips: if a server cannot start, every test that needs it errors with the
server's log tail, so CI can never pass silently without them.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

from tests.servers import RedisServer, SeaweedS3


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server for the whole session (``.url``, ``.port``, ``.pid``)."""
    server = RedisServer().start(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A real SeaweedFS S3 server for the whole session (``.endpoint``, keys, ``.pid``)."""
    server = SeaweedS3().start(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """URL of a clean Redis database: FLUSHALL before and after the test."""
    client = redis_server.client()
    try:
        client.flushall()
        yield redis_server.url
        client.flushall()
    finally:
        client.close()


@pytest.fixture
def s3_bucket(s3_server: SeaweedS3) -> Iterator[dict[str, str]]:
    """A fresh, uniquely named, empty bucket.

    Yields ``{"endpoint", "bucket", "access_key", "secret_key"}`` (endpoint is
    ``host:port``, plain HTTP). The bucket and its objects are removed afterwards.
    """
    bucket = f"test-{uuid.uuid4().hex[:20]}"
    client = s3_server.client()
    client.make_bucket(bucket)
    yield {
        "endpoint": s3_server.endpoint,
        "bucket": bucket,
        "access_key": s3_server.access_key,
        "secret_key": s3_server.secret_key,
    }
    with contextlib.suppress(Exception):
        for obj in client.list_objects(bucket, recursive=True):
            client.remove_object(bucket, obj.object_name)
        client.remove_bucket(bucket)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A save_pretrained directory of the tiny LLaVA (seed 0, default sizes), built
    once per session. Read-only: tests that alter a model directory copy it first."""
    from mia_dpo.demo.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llava") / "model", seed=0)
