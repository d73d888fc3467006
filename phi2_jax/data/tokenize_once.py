"""One tokenizer per job: in a multi-process job, process 0 fills the token cache and the others wait for it.

Every process of a pod job would otherwise read and tokenize the whole corpus
(racing on the same cache files, and multiplying the work by the number of
hosts). Process 0 announces its work in a claim file beside the cache, touched
every few seconds while it works, and leaves a done file when the cache is
complete (or a failed file with its error, which they repeat and stop); the
other processes wait for the done file and then only read. A process that sees
neither a done file nor a live claim for `wait_s` seconds stops with a sentence:
the cache is not shared between hosts (or process 0 died), and the fix is a
shared $PHI2_JAX_CACHE or `python -m phi2_jax.pretokenize`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from phi2_jax.errors import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")

_POLL_S = 1.0  # how often a waiting process looks for the done file


def tokenize_once(folder: Path, job: str, process_index: int, process_count: int, build: Callable[[bool], T],
                  wait_s: float = 300.0) -> T:
    """Returns `build(may_tokenize)`: called with True on process 0 (or a lone process), which may tokenize
    into `folder`; with False on the others, once process 0 has finished, so that they only read."""
    if process_count <= 1:
        return build(True)
    folder.mkdir(parents=True, exist_ok=True)
    claim, done, failed = (folder / f"{job}.{state}" for state in ("claim", "done", "failed"))
    if process_index == 0:
        return _build_and_announce(claim, done, failed, process_count, build, max(0.1, min(10.0, wait_s / 10)))
    _wait_for(claim, done, failed, process_index, process_count, folder, wait_s)
    return build(False)


def _build_and_announce(claim: Path, done: Path, failed: Path, process_count: int, build: Callable[[bool], T],
                        beat_s: float) -> T:
    failed.unlink(missing_ok=True)
    claim.write_text(f"process 0 of {process_count} on {socket.gethostname()}, pid {os.getpid()}\n")
    stop = threading.Event()

    def heartbeat():  # the waiting processes take a claim that stops changing for a dead process 0
        while not stop.wait(beat_s):
            os.utime(claim)

    beating = threading.Thread(target=heartbeat, name="tokenize-once-heartbeat", daemon=True)
    beating.start()
    try:
        result = build(True)
        done.write_text(claim.read_text())
        return result
    except Exception as error:  # the others would wait for a claim that stops beating: tell them now
        failed.write_text(str(error) if isinstance(error, ConfigError) else f"{type(error).__name__}: {error}")
        raise
    finally:
        stop.set()
        beating.join()
        claim.unlink(missing_ok=True)


def _wait_for(claim: Path, done: Path, failed: Path, process_index: int, process_count: int, folder: Path,
              wait_s: float) -> None:
    seen, quiet_since, said = None, time.monotonic(), time.monotonic()
    stale_failure = _stamp(failed)  # an earlier job's: only a failed file written from now on counts
    while not done.exists():
        failure = _stamp(failed)
        if failure is not None and failure != stale_failure:
            raise ConfigError(f"process 0 could not tokenize the text sources, so process {process_index} of "
                              f"{process_count} stops too: {failed.read_text()}")
        stamp = _stamp(claim)
        now = time.monotonic()
        if stamp is not None and stamp != seen:  # process 0 is alive and working
            seen, quiet_since = stamp, now
        if now - quiet_since > wait_s:
            raise ConfigError(
                f"process {process_index} of {process_count} waited {wait_s:g}s for process 0 to tokenize the text "
                f"sources into {folder} and saw no sign of it, so that folder is not shared between the hosts (or the "
                f"sources differ between them, or process 0 failed: see its log); expected $PHI2_JAX_CACHE on a "
                f"folder every host shares, or token files made beforehand by python -m phi2_jax.pretokenize "
                f"(data.sources with format: tokens).")
        if now - said > 60:
            said = now
            log.info("process %d waits for process 0 to tokenize the text sources into %s", process_index, folder)
        time.sleep(_POLL_S)


def _stamp(path: Path) -> int | None:
    """`path`'s modification time in ns, or None if it does not exist."""
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None
