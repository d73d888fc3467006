"""Safetensors files written byte by byte (8-byte header length, JSON header, data), independently of our writer,
so that a test can build any file a hostile or broken tool might leave: wrong offsets, odd dtypes, holes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int8": "I8", "int64": "I64"}


def raw_file(path: Path, header: dict, data: bytes) -> Path:
    """Writes `header` (any JSON, not checked) and `data` as a safetensors file."""
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


def tensors_file(path: Path, tensors: dict[str, np.ndarray], edit=None) -> Path:
    """A well-formed file of `tensors` in order; `edit(header)` may change the header before it is written."""
    header, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, array in tensors.items():
        raw = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": CODES[str(array.dtype)], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    if edit is not None:
        edit(header)
    return raw_file(path, header, b"".join(chunks))


def read_header(path: Path) -> tuple[dict, bytes]:
    """(header, data bytes) of a safetensors file, parsed here without any library."""
    blob = path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + length]), blob[8 + length:]
