"""A real ``redis-server`` for the tests: a free loopback port, daemonized, stopped by
the PID from its pidfile."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path

from tests.servers.ports import free_port
from tests.servers.process import (
    LOG_TAIL_LINES,
    ServerStartError,
    kill_pid,
    log_tail,
    pid_alive,
)


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
            kill_pid(self.pid, term_timeout=5.0)
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
                f"--- last lines of {self.logfile} ---\n{log_tail(self.logfile)}"
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
                kill_pid(pid)
        self.pid = None
        raise ServerStartError(
            f"redis-server on port {self.port} not ready after {timeout:.0f}s "
            f"(pid {pid}, last error: {last!r})\n"
            f"--- last {LOG_TAIL_LINES} lines of {self.logfile} ---\n{log_tail(self.logfile)}"
        )
