"""JSON Lines files read record by record, with the line number in every complaint."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from phi2_jax.errors import UserInputError


def jsonl_objects(path: Path, error: type[UserInputError] = UserInputError) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; invalid JSON or a non-object line raises `error`."""
    with open(path, "rb") as lines:  # line by line: a training corpus may be larger than memory
        for n, raw in enumerate(lines, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as decode_error:
                raise error(f"{path} line {n} is not UTF-8 text ({decode_error.reason} at byte "
                            f"{decode_error.start}); expected UTF-8 JSON.") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as decode_error:
                raise error(f"{path} line {n} is not valid JSON ({decode_error.msg} at column {decode_error.colno}).") from None
            if not isinstance(record, dict):
                raise error(f"{path} line {n} is a JSON {type(record).__name__}; expected an object.")
            yield n, record
