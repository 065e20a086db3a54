"""The fixtures give real servers: Redis and S3 (SeaweedFS), not mocks."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import redis
from minio import Minio
from minio.error import S3Error
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.servers import RedisServer, SeaweedS3, pid_alive

pytestmark = pytest.mark.integration


def _minio(b: dict[str, str], secret: str | None = None) -> Minio:
    return Minio(
        b["endpoint"],
        access_key=b["access_key"],
        secret_key=secret if secret is not None else b["secret_key"],
        secure=False,
    )


# ----------------------------------------------------------------------------- Redis


def test_redis_set_get(redis_url: str, redis_server: RedisServer) -> None:
    assert redis_url == f"redis://127.0.0.1:{redis_server.port}/0"
    r = redis.Redis.from_url(redis_url)
    assert r.set("greeting", "hello")
    assert r.get("greeting") == b"hello"
    assert r.incr("counter") == 1
    info = r.info("server")
    assert info["tcp_port"] == redis_server.port
    assert info["process_id"] == redis_server.pid
    r.close()


@pytest.mark.parametrize("run", [1, 2])
def test_redis_db_is_flushed_between_tests(redis_url: str, run: int) -> None:
    r = redis.Redis.from_url(redis_url)
    assert r.dbsize() == 0, "a previous test's keys leaked into this one"
    r.set("leftover", run)
    r.close()


def test_redis_restart_with_appendonly_keeps_data(tmp_path: Path) -> None:
    with RedisServer().start(tmp_path, appendonly=True, password="s3cret") as server:
        port, first_pid = server.port, server.pid
        assert server.url == f"redis://:s3cret@127.0.0.1:{port}/0"
        with pytest.raises(redis.AuthenticationError):
            # no retries: redis-py 8 retries AuthenticationError (a ConnectionError) ~3.5 s
            redis.Redis(host="127.0.0.1", port=port, retry=Retry(NoBackoff(), 0)).ping()
        r = server.client()
        r.set("durable", "yes")
        r.close()

        server.restart()
        assert server.port == port
        assert server.pid != first_pid
        assert not pid_alive(first_pid)
        r = server.client()
        assert r.get("durable") == b"yes"
        r.close()
        last_pid = server.pid
    assert server.pid is None
    assert not pid_alive(last_pid)


# -------------------------------------------------------------------------------- S3


def test_s3_put_get_list_stat(s3_bucket: dict[str, str]) -> None:
    c = _minio(s3_bucket)
    bucket = s3_bucket["bucket"]
    assert c.bucket_exists(bucket)
    assert list(c.list_objects(bucket, recursive=True)) == []

    body = b"\x89PNG fake image bytes" * 100
    c.put_object(
        bucket,
        "runs/r1/images/a.png",
        io.BytesIO(body),
        len(body),
        content_type="image/png",
        metadata={"x-amz-meta-sha256": "abc123"},
    )
    c.put_object(bucket, "runs/r1/manifest.json", io.BytesIO(b"{}"), 2)
    c.put_object(bucket, "runs/r2/manifest.json", io.BytesIO(b"[]"), 2)

    resp = c.get_object(bucket, "runs/r1/images/a.png")
    try:
        assert resp.read() == body
    finally:
        resp.close()
        resp.release_conn()

    names = sorted(o.object_name for o in c.list_objects(bucket, prefix="runs/r1/", recursive=True))
    assert names == ["runs/r1/images/a.png", "runs/r1/manifest.json"]
    top = sorted(o.object_name for o in c.list_objects(bucket, prefix="runs/"))
    assert top == ["runs/r1/", "runs/r2/"]

    st = c.stat_object(bucket, "runs/r1/images/a.png")
    assert st.size == len(body)
    assert st.content_type == "image/png"
    meta = {k.lower(): v for k, v in st.metadata.items()}
    assert meta.get("x-amz-meta-sha256") == "abc123"


def test_s3_missing_key_and_bad_credentials(s3_bucket: dict[str, str]) -> None:
    c = _minio(s3_bucket)
    with pytest.raises(S3Error) as err:
        c.stat_object(s3_bucket["bucket"], "does/not/exist")
    assert err.value.code in ("NoSuchKey", "ResponseHeadMethodError")
    with pytest.raises(S3Error) as err:
        c.get_object(s3_bucket["bucket"], "does/not/exist")
    assert err.value.code == "NoSuchKey"

    bad = _minio(s3_bucket, secret="wrong-secret")
    with pytest.raises(S3Error) as err:
        bad.put_object(s3_bucket["bucket"], "x", io.BytesIO(b"x"), 1)
    assert err.value.code in ("SignatureDoesNotMatch", "AccessDenied", "InvalidAccessKeyId")


def test_s3_buckets_are_fresh_per_test(s3_bucket: dict[str, str], s3_server: SeaweedS3) -> None:
    assert s3_bucket["endpoint"] == s3_server.endpoint
    assert s3_bucket["endpoint"].startswith("127.0.0.1:")
    assert list(_minio(s3_bucket).list_objects(s3_bucket["bucket"], recursive=True)) == []
    assert s3_server.pid is not None and pid_alive(s3_server.pid)
