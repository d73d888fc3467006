"""JSON Lines files read record by record, with the line number in every complaint."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from phi2_jax.errors import UserInputError


def jsonl_objects(path: Path, error: type[UserInputError] = UserInputError) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; invalid JSON or a non-object line raises `error`."""
    with open(path, encoding="utf-8") as lines:  # line by line: a training corpus may be larger than memory
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as decode_error:
                raise error(f"{path} line {n} is not valid JSON ({decode_error.msg} at column {decode_error.colno}).") from None
            if not isinstance(record, dict):
                raise error(f"{path} line {n} is a JSON {type(record).__name__}; expected an object.")
            yield n, record
