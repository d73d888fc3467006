"""The one exception type for mistakes a user can make.

Every error a user can cause (a bad config value, a missing file, a corrupt
weights file) is raised as `UserInputError` with one sentence that names the
file, key or value at fault and what was expected. Command-line entry points
catch exactly this type, print the sentence and exit non-zero; anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
import errno
import sys
from collections.abc import Iterable


class UserInputError(ValueError):
    """A problem with something the user handed us, explained in one sentence."""


class ConfigError(UserInputError):
    """A model or run configuration that cannot be used."""


class WeightsError(UserInputError):
    """A weights file or folder that cannot be read as a Phi model."""


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """Returns " Did you mean 'x'?" for the closest candidate, or "" if none is close."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def exit_on_user_error(main):
    """Decorates a CLI `main`: a `UserInputError` becomes one line on stderr and exit code 2."""

    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserInputError as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None

    wrapped.__doc__ = main.__doc__
    wrapped.__name__ = main.__name__
    return wrapped


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def is_disk_full(error: BaseException) -> bool:
    """True if `error`, or one it was raised from, is a full disk (or quota, or file-size limit)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_FULL:
            return True
        text = str(error)  # tensorstore reports the OS error in its message only
        if any(s in text for s in ("No space left on device", "Disk quota exceeded", "File too large")):
            return True
        error = error.__cause__ or error.__context__
    return False
