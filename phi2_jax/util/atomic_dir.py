"""Output folders that appear whole or not at all.

A command writes into a hidden sibling of its destination and renames it into
place only when complete, so a failed run leaves nothing behind and never
damages an existing folder (which is only replaced when the user asks).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from phi2_jax.errors import UserInputError


def staging_dir(dest: Path, overwrite: bool) -> Path:
    """A fresh hidden sibling of `dest` to write into; refuses a non-empty `dest` unless `overwrite`."""
    if dest.exists() and not dest.is_dir():
        raise UserInputError(f"{dest} exists and is not a folder; expected a new or empty folder.")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise UserInputError(f"{dest} is not empty; choose a new folder or pass --overwrite to replace it.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def publish(staging: Path, dest: Path) -> None:
    """Moves the finished `staging` folder to `dest`; an existing `dest` is removed only after that succeeds."""
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{os.getpid()}"
        dest.rename(old)
    staging.rename(dest)
    if old is not None:
        shutil.rmtree(old)


def write_atomically(dest: Path, overwrite: bool, write: Callable[[Path], None]) -> None:
    """Runs `write(staging)` into a hidden sibling of `dest`, then publishes it; on any failure it leaves nothing."""
    staging = staging_dir(dest, overwrite)
    try:
        write(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish(staging, dest)
