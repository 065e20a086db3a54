"""A one-line progress bar on stderr: shards done and samples per second.

On a terminal it redraws in place; in a log (a pod, CI) it prints a line when
something changed, at most every few seconds, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(
        self,
        stage: str,
        total: int,
        already: int,
        enabled: bool = True,
        stream: TextIO | None = None,
    ) -> None:
        self.stage, self.total, self.already = stage, total, already
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = time.monotonic()
        self.last_print = 0.0
        self.last_state: tuple[int, int, int] | None = None
        self.base_samples: int | None = None
        self.line = ""

    def render(self, done: int, samples: int, dead: int) -> str:
        if self.base_samples is None:
            self.base_samples = samples  # finished before this run: not our throughput
        elapsed = max(time.monotonic() - self.t0, 1e-6)
        rate = (samples - self.base_samples) / elapsed
        width = 24
        filled = int(width * done / self.total) if self.total else width
        bar = "#" * filled + "-" * (width - filled)
        dead_txt = f"  dead {dead}" if dead else ""
        return (
            f"{self.stage:<9} [{bar}] {done}/{self.total} shards  {samples} samples  "
            f"{rate:.1f} samples/s  {elapsed:.0f}s{dead_txt}"
        )

    def update(self, done: int, samples: int, dead: int) -> None:
        self.line = self.render(done, samples, dead)
        if not self.enabled:
            return
        now = time.monotonic()
        state = (done, samples, dead)
        if self.tty:
            if now - self.last_print >= 0.1 or state != self.last_state:
                self.stream.write("\r" + self.line)
                self.stream.flush()
                self.last_print = now
        elif state != self.last_state and (now - self.last_print >= 5 or done + dead >= self.total):
            self.stream.write(self.line + "\n")
            self.stream.flush()
            self.last_print = now
        self.last_state = state

    def close(self) -> None:
        if self.enabled and self.tty and self.line:
            self.stream.write("\n")
            self.stream.flush()
