"""One trainer per run folder: `run_dir/train.lock` names the host and pid that hold it.

Two trainers writing one folder would interleave metrics and race each other's
checkpoint saves and deletions. The lock file appears atomically with its
contents (written aside, then hard-linked into place, which fails if a lock is
there), so a reader never sees it half written. A lock left by a process that
died (SIGKILL, a crash, a lost node) on this host is detected by its pid and
taken over; one from another host cannot be checked from here and is reported.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from phi2_jax.errors import ConfigError
from phi2_jax.util.atomic_dir import process_alive

log = logging.getLogger(__name__)

LOCK_NAME = "train.lock"


class RunLock:
    """Held by one trainer (process 0 of a job) for as long as it trains in `run_dir`."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.held = False
        self._me = {"host": socket.gethostname(), "pid": os.getpid(),
                    "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}

    def holder(self) -> dict | None:
        """The lock file's contents, or None if there is none (or it cannot be read as ours)."""
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def acquire(self) -> None:
        """Takes the lock, or raises ConfigError naming the trainer that holds it."""
        aside = self.path.with_name(f".{LOCK_NAME}.{os.getpid()}")
        aside.write_text(json.dumps(self._me))
        try:
            for _ in range(3):
                try:
                    os.link(aside, self.path)
                    self.held = True
                    return
                except FileExistsError:
                    pass
                holder = self.holder()
                if holder is None:  # released between the two calls
                    continue
                if holder.get("host") == self._me["host"] and isinstance(holder.get("pid"), int) \
                        and not process_alive(holder["pid"]):
                    log.warning("%s: took over the lock of pid %d on %s (since %s), which is no longer running",
                                self.path.parent, holder["pid"], holder["host"], holder.get("since", "?"))
                    self.path.unlink(missing_ok=True)
                    continue
                who = (f"pid {holder['pid']} on host {holder['host']}, since {holder.get('since', '?')}"
                       if "pid" in holder and "host" in holder else "a lock file that cannot be read")
                raise ConfigError(f"{self.path.parent} is in use by another trainer ({who}); wait for it to end or "
                                  f"use another run_dir (if that trainer is gone, delete {self.path}).")
            raise ConfigError(f"could not take {self.path}: other trainers keep taking it.")
        finally:
            aside.unlink(missing_ok=True)

    def release(self) -> None:
        """Removes the lock if this process still holds it."""
        if self.held and self.holder() == self._me:
            self.path.unlink(missing_ok=True)
        self.held = False
