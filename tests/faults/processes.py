"""The processes a fault trial starts, found and signalled with psutil.

Only processes the harness started, or their descendants, are ever signalled, always by
PID with the process's identity checked: psutil pins a `Process` to its pid AND creation
time, so a recycled pid reads as gone and is never signalled. Never by name.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import psutil

_GONE = (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)


@dataclass(frozen=True)
class Proc:
    """A process we started (or a descendant of one), pinned by pid AND creation time so
    a recycled pid is never signalled."""

    pid: int
    role: str  # controller | worker
    stage: str | None = None
    # pid + creation time (psutil compares both); None: it had exited before we looked
    ps: psutil.Process | None = None

    @classmethod
    def of(cls, pid: int, role: str, stage: str | None = None) -> Proc | None:
        try:
            return cls(pid, role, stage, psutil.Process(pid))
        except psutil.NoSuchProcess:
            return None

    def alive(self) -> bool:
        if self.ps is None:
            return False
        try:
            # is_running() is False once the pid belongs to another process
            return self.ps.is_running() and self.ps.status() not in _GONE
        except psutil.NoSuchProcess:
            return False

    def signal(self, sig: int) -> bool:
        if self.ps is None or not self.alive():
            return False
        try:
            self.ps.send_signal(sig)  # checks the creation time again
        except psutil.NoSuchProcess:
            return False
        return True

    def descendants(self, role: str) -> list[Proc]:
        """Its children, theirs, ..., each pinned to its own creation time."""
        if self.ps is None or not self.alive():
            return []
        try:
            kids = self.ps.children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return [Proc(kid.pid, role, None, kid) for kid in kids]

    def cmdline(self) -> list[str]:
        if self.ps is None or not self.alive():
            return []
        try:
            return self.ps.cmdline()
        except psutil.Error:
            return []


def wait_gone(procs: list[Proc], timeout: float) -> list[Proc]:
    """Wait until none of procs is alive; return those still alive at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in procs if p.alive()]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)
