"""Progress on stderr: a one-line bar (items, bytes, rate and ETA, redrawn at most a few times a second), and
the commands' INFO logs."""

from __future__ import annotations

import logging
import math
import sys
import time


def format_eta(seconds: float) -> str:
    """'4m05s' or '2h13m'; '?' for an unknown (infinite) time."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    def __init__(self, label: str, total_items: int, total_bytes: int = 0, stream=sys.stderr):
        self.label, self.total_items, self.total_bytes, self.stream = label, total_items, total_bytes, stream
        self.items = self.bytes = 0
        self.start = self._drawn = time.perf_counter()

    def advance(self, items: int = 1, nbytes: int = 0) -> None:
        self.items += items
        self.bytes += nbytes
        now = time.perf_counter()
        if now - self._drawn > 0.25 or self.items == self.total_items:
            self._drawn = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        line = f"\r{self.label}: {self.items}/{self.total_items}"
        if self.total_bytes:
            rate = self.bytes / elapsed
            eta = (self.total_bytes - self.bytes) / rate if rate else float("inf")
            line += (f"  {self.bytes / 1e9:.2f}/{self.total_bytes / 1e9:.2f} GB  {rate / 1e6:.0f} MB/s"
                     f"  eta {format_eta(eta)}")
        self.stream.write(line)
        self.stream.flush()

    def close(self) -> None:
        if self.items != self.total_items:
            self._draw(time.perf_counter())
        self.stream.write(f"  done in {time.perf_counter() - self.start:.1f}s\n")
        self.stream.flush()


def log_info_to_stderr(command_line: bool) -> None:
    """Shows this package's INFO logs (what a long step is doing) on stderr, other libraries' warnings only.

    A command line owns its process's logging, so its handler replaces the root
    logger's: importing orbax (absl logs at import) has already given the root a
    WARNING-level one, which would hide every INFO line. A caller from Python keeps
    its own configuration.
    """
    if not command_line:
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
