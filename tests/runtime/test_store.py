"""One behaviour suite for the store, on a local directory and on a real S3 server."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import urllib3.exceptions

from mia_dpo.config import StoreConfig
from mia_dpo.errors import NotFound, TransientStoreError, UserError
from mia_dpo.runtime.store import BlobReader, LocalStore, S3Store, Store, check_key, retrying
from tests.servers import free_port

S3_PREFIX = "some/prefix"


def s3_config(s3: dict[str, str], **kw: object) -> StoreConfig:
    fields: dict[str, object] = {
        "backend": "s3",
        "endpoint": s3["endpoint"],
        "bucket": s3["bucket"],
        "prefix": S3_PREFIX,
        "access_key": s3["access_key"],
        "secret_key": s3["secret_key"],
    }
    return StoreConfig(**(fields | kw))


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return LocalStore(tmp_path / "root")
    return S3Store(s3_config(request.getfixturevalue("s3_bucket")))


def test_round_trips(store: Store) -> None:
    store.put_bytes("a/b.bin", b"\x00\xffraw")
    store.put_text("a/t.txt", "héllo\nworld")
    store.put_json("a/j.json", {"k": [1, 2.5, "ü"], "n": None})
    store.put_jsonl("a/rows.jsonl", ['{"i": 0}', '{"i": 1}'])
    assert store.get_bytes("a/b.bin") == b"\x00\xffraw"
    assert store.get_text("a/t.txt") == "héllo\nworld"
    assert store.get_json("a/j.json") == {"k": [1, 2.5, "ü"], "n": None}
    assert store.get_jsonl("a/rows.jsonl") == ['{"i": 0}', '{"i": 1}']
    assert [json.loads(r)["i"] for r in store.get_jsonl("a/rows.jsonl")] == [0, 1]


def test_missing_key_raises_not_found(store: Store) -> None:
    with pytest.raises(NotFound) as err:
        store.get_bytes("no/such/key.json")
    assert "no/such/key.json" in str(err.value)
    with pytest.raises(NotFound):
        store.get_json("nothing.json")


def test_exists_and_delete(store: Store) -> None:
    assert not store.exists("x/y.txt")
    store.put_text("x/y.txt", "1")
    assert store.exists("x/y.txt")
    assert not store.exists("x")  # a "directory" is not a key
    store.delete("x/y.txt")
    assert not store.exists("x/y.txt")
    with pytest.raises(NotFound):
        store.get_bytes("x/y.txt")
    store.delete("x/y.txt")  # deleting a missing key is not an error


def test_overwrite_replaces(store: Store) -> None:
    store.put_text("k.txt", "a much longer first version")
    store.put_text("k.txt", "v2")
    assert store.get_text("k.txt") == "v2"
    assert list(store.list("")) == ["k.txt"]


def test_list_sorted_recursive_and_scoped(store: Store) -> None:
    keys = ["runs/r1/b.txt", "runs/r1/a/z.txt", "runs/r1/a/a.txt", "runs/r10/x.txt", "top.txt"]
    for k in keys:
        store.put_text(k, k)
    assert list(store.list("runs/r1/")) == ["runs/r1/a/a.txt", "runs/r1/a/z.txt", "runs/r1/b.txt"]
    assert list(store.list("runs/r1/a/")) == ["runs/r1/a/a.txt", "runs/r1/a/z.txt"]
    assert list(store.list("")) == sorted(keys)
    assert list(store.list("runs/nothing/")) == []
    # every listed key reads back: they are relative to the store root, not the bucket
    for k in store.list("runs/"):
        assert store.get_text(k) == k


def test_list_prefix_may_end_mid_name(store: Store) -> None:
    # The controller polls "runs/r/augment/shard-" so a stage's images are never listed.
    keys = ["runs/r/augment/shard-00000.done", "runs/r/augment/shard-00001.jsonl",
            "runs/r/augment/images/shard-00000/a.jpg", "runs/r/augment/stats.json",
            "runs/r/augmentx/shard-00000.done"]  # fmt: skip
    for k in keys:
        store.put_bytes(k, b"x")
    assert list(store.list("runs/r/augment/shard-")) == keys[:2]
    assert list(store.list("runs/r/aug")) == sorted(keys)
    assert list(store.list("runs/r/augment/images/")) == [keys[2]]
    assert list(store.list("runs/none/")) == []


def test_uri_points_at_the_bytes(store: Store) -> None:
    store.put_bytes("img/p.png", b"png-bytes")
    uri = store.uri("img/p.png")
    if isinstance(store, LocalStore):
        assert Path(uri).is_absolute()
        assert Path(uri).read_bytes() == b"png-bytes"
        reader = BlobReader(StoreConfig())
    else:
        assert uri == f"s3://{store.bucket}/{S3_PREFIX}/img/p.png"
        reader = BlobReader(store.cfg)
    assert reader.read(uri) == b"png-bytes"
    with pytest.raises(NotFound):
        reader.read(uri + ".missing")


@pytest.mark.parametrize("bad", ["../x", "a/../../x", "/abs", "a//b", "a\\b", "", "./a", "a/"])
def test_check_key_refuses(bad: str, store: Store) -> None:
    with pytest.raises(ValueError, match="invalid store key"):
        check_key(bad)
    with pytest.raises(ValueError):
        store.put_text(bad, "nope")


def test_check_key_accepts_plain_keys() -> None:
    assert check_key("runs/r1/augment/shard-00000.jsonl") == "runs/r1/augment/shard-00000.jsonl"


def test_s3_keys_live_under_the_prefix(s3_bucket: dict[str, str]) -> None:
    store = S3Store(s3_config(s3_bucket))
    store.put_text("k.txt", "in prefix")
    other = S3Store(s3_config(s3_bucket, prefix=""))
    other.put_text("some/prefixed-sibling.txt", "outside")
    assert list(store.list("")) == ["k.txt"]
    assert sorted(other.list("")) == ["some/prefix/k.txt", "some/prefixed-sibling.txt"]
    assert other.get_text("some/prefix/k.txt") == "in prefix"


# --------------------------------------------------------------------------- local only


def test_local_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(tmp_path)
    store.put_text("d/k.txt", "old content")

    def broken_replace(src: str, dst: str) -> None:
        assert Path(src).read_bytes() == b"new"  # the temp file was fully written
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        store.put_text("d/k.txt", "new")
    monkeypatch.undo()
    assert store.get_text("d/k.txt") == "old content"
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["k.txt"]


def test_local_list_hides_temp_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_text("d/k.txt", "x")
    (tmp_path / "d" / ".k.txt.abc123.tmp").write_text("half a write")
    assert list(store.list("")) == ["d/k.txt"]
    assert list(store.list("d/")) == ["d/k.txt"]


def test_local_missing_key_that_is_a_directory(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_text("d/k.txt", "x")
    with pytest.raises(NotFound):
        store.get_bytes("d")


# --------------------------------------------------------------------------- S3 failures


def flaky(
    n: int, exc: Callable[[], Exception], value: str = "ok"
) -> tuple[Callable[[], str], list]:
    calls: list[int] = []

    def fn() -> str:
        calls.append(1)
        if len(calls) <= n:
            raise exc()
        return value

    return fn, calls


@pytest.mark.parametrize(
    "exc",
    [
        lambda: urllib3.exceptions.MaxRetryError(None, "/x", "refused"),  # type: ignore[arg-type]
        lambda: ConnectionError("reset"),
    ],
)
def test_retrying_recovers_from_transient_errors(exc: Callable[[], Exception]) -> None:
    fn, calls = flaky(2, exc)
    assert retrying(fn, "get k", budget_seconds=30.0) == "ok"
    assert len(calls) == 3


def test_retrying_raises_other_errors_at_once() -> None:
    fn, calls = flaky(5, lambda: ValueError("bad request"))
    with pytest.raises(ValueError, match="bad request"):
        retrying(fn, "get k", budget_seconds=30.0)
    assert len(calls) == 1


def test_retrying_gives_up_after_budget() -> None:
    fn, calls = flaky(10_000, lambda: ConnectionError("refused"))
    with pytest.raises(TransientStoreError, match="get k") as err:
        retrying(fn, "get k", budget_seconds=1.0)
    assert len(calls) >= 2  # it did retry before giving up
    assert isinstance(err.value.__cause__, ConnectionError)


def test_s3_unreachable_endpoint_raises_transient(s3_bucket: dict[str, str]) -> None:
    dead = f"127.0.0.1:{free_port()}"
    with pytest.raises(TransientStoreError, match="unreachable"):
        S3Store(s3_config(s3_bucket, endpoint=dead, retry_seconds=1.0))
    store = S3Store(s3_config(s3_bucket, endpoint=dead, retry_seconds=1.0, create_bucket=False))
    with pytest.raises(TransientStoreError):
        store.put_text("k.txt", "x")
    with pytest.raises(TransientStoreError):
        store.get_bytes("k.txt")


def test_s3_wrong_credentials_fail(s3_bucket: dict[str, str]) -> None:
    from minio.error import S3Error

    good = S3Store(s3_config(s3_bucket))
    good.put_text("k.txt", "secret data")
    cfg = s3_config(s3_bucket, secret_key="not-the-secret", create_bucket=False)
    bad = S3Store(cfg)
    with pytest.raises(S3Error):
        bad.get_bytes("k.txt")
    with pytest.raises(S3Error):
        bad.put_text("k.txt", "overwritten")
    with pytest.raises(S3Error):
        S3Store(s3_config(s3_bucket, access_key="nobody"))
    assert good.get_text("k.txt") == "secret data"


def test_s3_missing_credentials_is_a_user_error(s3_bucket: dict[str, str]) -> None:
    cfg = s3_config(s3_bucket, access_key=None, secret_key=None)
    with pytest.raises(UserError, match="MIA_DPO_S3_ACCESS_KEY"):
        S3Store(cfg)
    with pytest.raises(UserError, match="MIA_DPO_S3_ACCESS_KEY"):
        BlobReader(cfg).read(f"s3://{s3_bucket['bucket']}/k")
