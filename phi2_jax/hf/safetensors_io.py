"""Streaming safetensors: map one tensor at a time for reading, write one tensor at a time.

The format is an 8-byte little-endian header length, a JSON header
`{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`,
then the raw little-endian tensor bytes. Each read maps only that tensor's
byte range, and the mapping goes when the array does: a tensor costs no copy
out of the page cache (copying it into fresh memory doubled the converter's
kernel time), and only the tensors still in use count towards resident memory,
never the whole file. Every inconsistency a damaged file can have is reported
as a `WeightsError`.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

from phi2_jax.errors import WeightsError

DTYPES = {"F64": np.dtype("float64"), "F32": np.dtype("float32"), "F16": np.dtype("float16"),
          "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("int64"), "I32": np.dtype("int32"),
          "I16": np.dtype("int16"), "I8": np.dtype("int8"), "U8": np.dtype("uint8"), "BOOL": np.dtype("bool")}
CODES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object hook: a name given twice is an error (json.loads would keep the last one silently)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class SafetensorsFile:
    """Header of one .safetensors file, validated against the file size; tensors read on demand.

    Every entry must say exactly which bytes are its tensor: offsets are
    non-negative integers inside the data section, `end - begin` is the size its
    dtype and shape imply, and the entries tile the data section without
    overlaps, holes or trailing bytes (the reference reader's rules), so no
    tensor can be read out of header bytes or out of another tensor.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise WeightsError(f"{self.path} is {size} bytes, too short for a safetensors header; it is truncated.")
                (header_len,) = struct.unpack("<Q", prefix)
                if header_len > min(_MAX_HEADER, size - 8):
                    raise WeightsError(f"{self.path} declares a {header_len}-byte header in a {size}-byte file; "
                                       f"it is truncated or not a safetensors file.")
                header = json.loads(f.read(header_len).decode("utf-8"), object_pairs_hook=_no_duplicates)
        except OSError as error:
            raise WeightsError(f"{self.path} could not be read ({error.strerror}).") from None
        except _DuplicateKey as error:
            raise WeightsError(f"{self.path} gives the key '{error.args[0]}' twice in its header; it is corrupt.") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise WeightsError(f"{self.path} has a header that is not valid JSON; it is corrupt or not a safetensors file.") from None
        if not isinstance(header, dict):
            raise WeightsError(f"{self.path} has a header that is not a JSON object; it is corrupt.")
        self.metadata = header.pop("__metadata__", {}) or {}
        self.data_start = 8 + header_len
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        data_len = size - self.data_start
        for name, entry in header.items():
            self.entries[name] = self._entry(name, entry, data_len)
        self._check_tiling(data_len)

    def _entry(self, name: str, entry, data_len: int) -> tuple[np.dtype, tuple[int, ...], int, int]:
        if (not isinstance(entry, dict) or not isinstance(entry.get("shape"), list)
                or not isinstance(entry.get("data_offsets"), list) or len(entry["data_offsets"]) != 2):
            raise WeightsError(f"{self.path}: tensor '{name}' has a malformed header entry {entry}; expected "
                               f"{{\"dtype\", \"shape\", \"data_offsets\": [begin, end]}}.")
        code, shape, (begin, end) = entry.get("dtype"), entry["shape"], entry["data_offsets"]
        if code not in DTYPES:
            raise WeightsError(f"{self.path}: tensor '{name}' has dtype {code!r}, which this reader does not know; "
                               f"expected one of {', '.join(DTYPES)}.")
        if not all(_is_count(d) for d in shape):
            raise WeightsError(f"{self.path}: tensor '{name}' has shape {shape}; expected non-negative integers.")
        if not (_is_count(begin) and _is_count(end)) or begin > end:
            raise WeightsError(f"{self.path}: tensor '{name}' has data_offsets {[begin, end]}; expected non-negative "
                               f"integers [begin, end] with begin <= end; the header is corrupt.")
        dtype = DTYPES[code]
        if end - begin != int(np.prod(shape, dtype=object)) * dtype.itemsize:
            raise WeightsError(f"{self.path}: tensor '{name}' claims {end - begin} bytes for shape {list(shape)} "
                               f"of {code}; the header is corrupt.")
        if end > data_len:
            raise WeightsError(f"{self.path}: tensor '{name}' ends at byte {end} of a {data_len}-byte data section; "
                               f"the file is truncated.")
        return dtype, tuple(shape), begin, end

    def _check_tiling(self, data_len: int) -> None:
        """The entries, sorted by offset, cover the data section exactly: no overlap, no hole, nothing after."""
        covered, previous = 0, None
        for name, (_, _, begin, end) in sorted(self.entries.items(), key=lambda item: item[1][2:]):
            if begin < covered:
                raise WeightsError(f"{self.path}: tensor '{name}' (bytes {begin}-{end}) overlaps tensor '{previous}' "
                                   f"(which ends at byte {covered}); the header is corrupt.")
            if begin > covered:
                raise WeightsError(f"{self.path}: bytes {covered}-{begin} of the data section belong to no tensor "
                                   f"(before '{name}'); the header is corrupt.")
            covered, previous = end, name
        if covered != data_len:
            raise WeightsError(f"{self.path} has {data_len - covered} bytes after its last tensor; expected the data "
                               f"section to end at byte {covered}; the file is corrupt.")

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self.entries[name][0]

    def read(self, name: str) -> np.ndarray:
        """The tensor as a read-only array over a read-only mapping of its bytes."""
        dtype, shape, begin, end = self.entries[name]
        if end == begin:
            return np.zeros(shape, dtype)
        start = self.data_start + begin
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        try:
            with open(self.path, "rb") as f:
                mapped = mmap.mmap(f.fileno(), self.data_start + end - aligned, access=mmap.ACCESS_READ, offset=aligned)
        except (OSError, ValueError) as error:  # the file shrank after its header was checked
            raise WeightsError(f"{self.path}: tensor '{name}' could not be read ({error}); the file is truncated.") from None
        mapped.madvise(mmap.MADV_SEQUENTIAL)  # read-ahead for the cold-cache case
        return np.frombuffer(mapped, dtype, count=(end - begin) // dtype.itemsize, offset=start - aligned).reshape(shape)


def write_streaming(path: str | Path, specs: list[tuple[str, tuple[int, ...], np.dtype]],
                    tensors: Iterable[Iterable[np.ndarray]], metadata: dict[str, str] | None = None) -> int:
    """Writes a safetensors file whose header comes from `specs` and whose data arrives a row block at a time.

    `tensors` yields, for each spec in order, an iterable of row blocks (arrays
    whose concatenation along axis 0 is the tensor). Sizes and dtypes are checked
    against the spec. Returns the number of data bytes written.
    """
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape, dtype in specs:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": CODES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for (name, shape, dtype), blocks in zip(specs, tensors, strict=True):
            written = 0
            for block in blocks:
                assert block.dtype == np.dtype(dtype) and block.shape[1:] == tuple(shape[1:]), (name, block.shape)
                f.write(np.ascontiguousarray(block).reshape(-1).view(np.uint8).data)
                written += block.size
            assert written == int(np.prod(shape)), (name, written, shape)
    return offset
