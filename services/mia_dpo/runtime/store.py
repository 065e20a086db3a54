"""The store: one key/value interface over a local directory or an S3 bucket.

Stages read and write only through `Store`; they never import minio. Keys are
posix paths relative to the store root (`runs/{run_id}/{stage}/shard-00000.jsonl`).
Writes are atomic per key: locally a temp file renamed over the target, on S3 a
single PUT. `uri(key)` is what records carry: a local absolute path or an
`s3://bucket/key` URI that `BlobReader` resolves as given.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import random
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from mia_dpo.config import StoreConfig
from mia_dpo.errors import NotFound, TransientStoreError, UserError

T = TypeVar("T")


def check_key(key: str) -> str:
    """Keys come from our own code, but a queue message could try to smuggle one."""
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise ValueError(f"invalid store key {key!r}")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"invalid store key {key!r}")
    return key


class Store(ABC):
    @abstractmethod
    def put_bytes(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> None: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Raise NotFound when the key does not exist."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str) -> Iterator[str]:
        """Every key under prefix (recursive), in lexical order."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def uri(self, key: str) -> str:
        """Where a record should point to find this key."""

    def put_text(self, key: str, text: str) -> None:
        self.put_bytes(key, text.encode("utf-8"), "text/plain; charset=utf-8")

    def get_text(self, key: str) -> str:
        return self.get_bytes(key).decode("utf-8")

    def put_json(self, key: str, value: Any) -> None:
        data = json.dumps(value, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
        self.put_bytes(key, data.encode("utf-8"), "application/json")

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    def put_jsonl(self, key: str, rows: list[str]) -> None:
        """rows are already-serialised JSON objects, one per line."""
        self.put_bytes(key, "".join(r + "\n" for r in rows).encode("utf-8"), "application/x-ndjson")

    def get_jsonl(self, key: str) -> list[str]:
        return [line for line in self.get_text(key).splitlines() if line.strip()]


class LocalStore(Store):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put_bytes(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Temp file in the same directory so the rename is atomic: a reader sees the
        # old bytes or the new ones, never half a file, even if we are killed mid-write.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise NotFound(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> Iterator[str]:
        # Like S3, a prefix may end mid-name ("runs/r/augment/shard-"): walk from its
        # folder and prune sub-folders that cannot hold a match (e.g. images/).
        base = self.root / prefix.rpartition("/")[0]
        if not base.is_dir():
            return iter(())
        keys = []
        for dirpath, dirs, files in os.walk(base):
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            rel_dir = "" if rel_dir == "." else rel_dir + "/"
            dirs[:] = sorted(
                d
                for d in dirs
                if (rel_dir + d + "/").startswith(prefix) or prefix.startswith(rel_dir + d + "/")
            )
            for name in files:
                if name.startswith(".") and name.endswith(".tmp"):
                    continue  # an interrupted write, not a key
                key = rel_dir + name
                if key.startswith(prefix):
                    keys.append(key)
        return iter(sorted(keys))

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def uri(self, key: str) -> str:
        return str(self._path(key))


def _is_transient(exc: BaseException) -> bool:
    import urllib3.exceptions
    from minio.error import S3Error, ServerError

    if isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError, ServerError)):
        return True
    if isinstance(exc, S3Error):
        return exc.code in {"InternalError", "SlowDown", "ServiceUnavailable", "RequestTimeout"}
    return False


def retrying(fn: Callable[[], T], what: str, budget_seconds: float) -> T:
    """Call fn, retrying transient S3 failures with capped exponential backoff and
    jitter until the budget is spent; then raise TransientStoreError."""
    deadline = time.monotonic() + budget_seconds
    delay = 0.2
    while True:
        try:
            return fn()
        except Exception as e:
            if not _is_transient(e):
                raise
            if time.monotonic() + delay > deadline:
                raise TransientStoreError(
                    f"{what}: S3 unreachable for {budget_seconds:.0f}s: {e}"
                ) from e
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 5.0)


def _s3_get(client: Any, bucket: str, name: str) -> bytes:
    resp = client.get_object(bucket, name)
    try:
        return resp.read()
    finally:  # hand the connection back to the pool even on a short read
        resp.close()
        resp.release_conn()


def minio_client(cfg: StoreConfig) -> Any:
    try:
        import urllib3
        from minio import Minio
    except ImportError as e:  # pragma: no cover - the light image always has minio
        raise UserError("the s3 store needs the minio package: pip install minio") from e
    if cfg.access_key is None or cfg.secret_key is None:
        raise UserError(
            "store.backend is s3 but MIA_DPO_S3_ACCESS_KEY / MIA_DPO_S3_SECRET_KEY are not set"
        )
    # Few fast retries inside urllib3; the long outage budget lives in `retrying`.
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=5.0, read=120.0),
        retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
        maxsize=16,
    )
    return Minio(
        cfg.endpoint,
        access_key=cfg.access_key.get_secret_value(),
        secret_key=cfg.secret_key.get_secret_value(),
        secure=cfg.secure,
        region=cfg.region,
        http_client=http,
    )


class S3Store(Store):
    def __init__(self, cfg: StoreConfig, client: Any | None = None) -> None:
        self.cfg = cfg
        self.client = client or minio_client(cfg)
        self.bucket = cfg.bucket
        self.prefix = cfg.prefix.strip("/")
        if cfg.create_bucket:
            self._call(self._ensure_bucket, "create bucket")

    def _ensure_bucket(self) -> None:
        from minio.error import S3Error

        if not self.client.bucket_exists(self.bucket):
            try:
                self.client.make_bucket(self.bucket)
            except S3Error as e:  # another worker created it first
                if e.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def _call(self, fn: Callable[[], T], what: str) -> T:
        return retrying(fn, f"s3://{self.bucket}: {what}", self.cfg.retry_seconds)

    def _obj(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_bytes(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> None:
        name = self._obj(key)
        self._call(
            lambda: self.client.put_object(
                self.bucket, name, io.BytesIO(data), len(data), content_type=content_type
            ),
            f"put {name}",
        )

    def get_bytes(self, key: str) -> bytes:
        from minio.error import S3Error

        name = self._obj(key)
        try:
            return self._call(lambda: _s3_get(self.client, self.bucket, name), f"get {name}")
        except S3Error as e:
            if e.code in ("NoSuchKey", "NoSuchObject"):
                raise NotFound(key) from None
            raise

    def exists(self, key: str) -> bool:
        from minio.error import S3Error

        name = self._obj(key)
        try:
            self._call(lambda: self.client.stat_object(self.bucket, name), f"stat {name}")
            return True
        except S3Error as e:
            if e.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                return False
            raise

    def list(self, prefix: str) -> Iterator[str]:
        full = (f"{self.prefix}/" if self.prefix else "") + prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        objs = self._call(
            lambda: [
                o.object_name
                for o in self.client.list_objects(self.bucket, prefix=full, recursive=True)
            ],
            f"list {full}",
        )
        return iter(sorted(name[strip:] for name in objs))

    def delete(self, key: str) -> None:
        name = self._obj(key)
        self._call(lambda: self.client.remove_object(self.bucket, name), f"delete {name}")

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._obj(key)}"


class BlobReader:
    """Reads what a record or the config points at: a local path or s3://bucket/key.

    s3:// URIs are read with the store's S3 connection (same endpoint and
    credentials), whatever the bucket; local paths are read as given.
    """

    def __init__(self, cfg: StoreConfig, roots: Sequence[str] | None = None) -> None:
        """`roots`: when given, only URIs inside one of them may be read (a worker's
        reader: its run's prefix and the configured input), whatever a record says."""
        self.cfg = cfg
        self._client: Any | None = None
        self.roots = None if roots is None else [_normal(r) for r in roots if r]

    def _s3(self) -> Any:
        if self._client is None:
            self._client = minio_client(self.cfg)
        return self._client

    def allowed(self, uri: str) -> bool:
        if self.roots is None:
            return True
        target = _normal(uri)
        return any(target == r or target.startswith(r.rstrip("/") + "/") for r in self.roots)

    def read(self, uri: str) -> bytes:
        if not self.allowed(uri):
            raise OutsideScope(
                f"{uri}: outside this run's prefix and the configured input; not read"
            )
        if uri.startswith("s3://"):
            from minio.error import S3Error

            bucket, _, name = uri[5:].partition("/")
            if not bucket or not name:
                raise NotFound(f"{uri}: not an s3://bucket/key URI")
            client = self._s3()
            try:
                return retrying(
                    lambda: _s3_get(client, bucket, name), f"get {uri}", self.cfg.retry_seconds
                )
            except S3Error as e:
                if e.code in ("NoSuchKey", "NoSuchObject", "NoSuchBucket"):
                    raise NotFound(uri) from None
                raise
        try:
            return Path(uri).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(uri) from None


class OutsideScope(PermissionError):
    """A record pointed a worker at data it has no business reading."""


def _normal(uri: str) -> str:
    """Comparable form: s3 keys with `.`/`..` resolved, local paths fully resolved
    (symlinks included, so a link inside a root cannot lead out of it)."""
    if uri.startswith("s3://"):
        bucket, _, key = uri[5:].partition("/")
        return f"s3://{bucket}/" + posixpath.normpath("/" + key).lstrip("/")
    return os.path.realpath(uri)


def open_store(cfg: StoreConfig) -> Store:
    if cfg.backend == "s3":
        return S3Store(cfg)
    return LocalStore(cfg.root)
