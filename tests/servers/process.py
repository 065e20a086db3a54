"""A test server's process: its start failure (with the log tail), and pid helpers that
stop it by the PID we started (never by process name)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

LOG_TAIL_LINES = 20


class ServerStartError(RuntimeError):
    """A test server could not be started (the message holds its log tail)."""


def log_tail(path: Path, n: int = LOG_TAIL_LINES) -> str:
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


def kill_pid(pid: int, term_timeout: float = 3.0) -> None:
    """SIGTERM ``pid``; SIGKILL it if still alive after ``term_timeout`` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if _wait_pid_gone(pid, term_timeout):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if not _wait_pid_gone(pid, 5.0):
        raise RuntimeError(f"process {pid} did not exit after SIGKILL")
