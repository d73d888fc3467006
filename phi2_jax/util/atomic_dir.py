"""Output folders that appear whole or not at all.

A command writes into a hidden sibling of its destination and renames it into
place only when complete, so a failed run leaves nothing behind and never
damages an existing folder (which is only replaced when the user asks).

The hidden sibling is `.<name>.partial-<pid>@<host>`. A process killed outright
(SIGKILL, power loss) cannot clean up after itself, so the next command that
writes the same destination removes the partials of processes of this host
that are no longer running, and says so. A destination that is, contains or
lies inside one of the command's own sources is refused before anything is
touched (`refuse_overlap`), so `--overwrite` can never delete what is read.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from phi2_jax.errors import UserInputError


def refuse_overlap(destination: str | Path, sources: Iterable[str | Path | None]) -> None:
    """Refuses a `destination` that is one of `sources`, a folder above one, or inside one (symlinks resolved).

    Call it before touching anything: replacing the destination would delete
    the source, and writing inside a source changes what is being read.
    `None` entries of `sources` are skipped, so optional inputs can be passed as they are.
    """
    dest = Path(os.path.realpath(destination))
    for source in sources:
        if source is None:
            continue
        src = Path(os.path.realpath(source))
        if dest == src:
            where = "is"
        elif dest in src.parents:
            where = "holds"
        elif src in dest.parents:
            where = "is inside"
        else:
            continue
        raise UserInputError(f"the destination {destination} {where} {source}, which this command reads; "
                             f"choose a destination outside it (--overwrite would delete what is being read).")


def _tag() -> str:
    return f"{os.getpid()}@{socket.gethostname()}"


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this host still runs (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def reclaim_stale(dest: Path, report: Callable[[str], None] | None = None) -> list[Path]:
    """Removes the hidden partial folders that dead processes of this host left beside `dest`; returns them.

    A `.old-` folder is the previous output set aside by `publish`; if its process
    died before the new output took its place (`dest` missing), it is moved back
    rather than removed, so the last good output is never lost.
    """
    report = report or (lambda line: print(line, file=sys.stderr))
    pattern = re.compile(rf"\.{re.escape(dest.name)}\.(partial|old)-(\d+)(?:@(.+))?")
    host, handled = socket.gethostname(), []
    if not dest.parent.is_dir():
        return handled
    for entry in sorted(dest.parent.iterdir()):
        match = pattern.fullmatch(entry.name)
        if not match or (match[3] is not None and match[3] != host) or process_alive(int(match[2])):
            continue
        if match[1] == "old" and not dest.exists():
            entry.rename(dest)
            report(f"restored {dest} from {entry.name}, set aside by process {match[2]}, which died before "
                   f"replacing it.")
        else:
            size = _folder_bytes(entry)
            shutil.rmtree(entry, ignore_errors=True)
            report(f"removed {entry.name} ({size / 1e6:.1f} MB), a partial output left beside {dest.name} by "
                   f"process {match[2]}, which is no longer running.")
        handled.append(entry)
    return handled


# Errors that say the destination cannot take the output (rather than that a source could not be read).
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def _write_error(dest: Path, error: OSError) -> UserInputError:
    reason = error.strerror or str(error)
    hint = {errno.ENOSPC: "free some space or choose another destination",
            errno.EDQUOT: "free some space or choose another destination",
            errno.EFBIG: "choose a destination that allows files this large",
            errno.EROFS: "choose a writable destination",
            errno.EACCES: "choose a destination you may write to",
            errno.EPERM: "choose a destination you may write to"}.get(error.errno, "choose another destination")
    return UserInputError(f"could not write {dest} ({reason}); {hint}. Nothing was changed there.")


def staging_dir(dest: Path, overwrite: bool) -> Path:
    """A fresh hidden sibling of `dest` to write into; refuses a non-empty `dest` unless `overwrite`."""
    try:
        reclaim_stale(dest)  # first: it may move a previous output back into place
    except OSError as error:
        raise _write_error(dest, error) from None
    if dest.exists() and not dest.is_dir():
        raise UserInputError(f"{dest} exists and is not a folder; expected a new or empty folder.")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise UserInputError(f"{dest} is not empty; choose a new folder or pass --overwrite to replace it.")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = dest.parent / f".{dest.name}.partial-{_tag()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    except OSError as error:
        raise _write_error(dest, error) from None
    return staging


def publish(staging: Path, dest: Path) -> None:
    """Moves the finished `staging` folder to `dest`; an existing `dest` is removed only after that succeeds."""
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{_tag()}"
        dest.rename(old)
    try:
        staging.rename(dest)
    except OSError:
        if old is not None:
            old.rename(dest)  # the previous output goes back where it was
        raise
    if old is not None:
        shutil.rmtree(old)


def write_atomically(dest: Path, overwrite: bool, write: Callable[[Path], None],
                     sources: Iterable[str | Path | None] = ()) -> None:
    """Runs `write(staging)` into a hidden sibling of `dest`, then publishes it; on any failure it leaves nothing.

    `sources`: what the command reads; a `dest` overlapping one is refused first (see `refuse_overlap`).
    A write that fails for lack of space or permission becomes one sentence (a `UserInputError`).
    `write` must have finished all its writes when it returns or raises (join its threads), or
    the cleanup could run before its last write lands.
    """
    refuse_overlap(dest, sources)
    staging = staging_dir(dest, overwrite)
    try:
        write(staging)
        publish(staging, dest)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        if error.errno in WRITE_ERRNOS:
            raise _write_error(dest, error) from None
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
