"""Streaming reads and writes of an Orbax parameter checkpoint, one slice at a time, with tensorstore.

Orbax's own save takes the whole tree in memory; the converter must not. An
Orbax PyTree checkpoint (OCDBT + zarr) is a key-value store holding one zarr
array per leaf, named by its path joined with '.', plus a `_METADATA` file that
describes the tree. `ParamWriter` writes exactly that, row block by row block,
and `ParamReader` reads any leaf of it (also checkpoints Orbax wrote itself).
Orbax restores what `ParamWriter` writes: the tests check this round trip.
"""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import tensorstore as ts

from phi2_jax.host_arrays import contiguous

_ZARR_DTYPES = {np.dtype("float32"): "<f4", np.dtype("float16"): "<f2", np.dtype(ml_dtypes.bfloat16): "bfloat16"}


def _kvstore(directory: Path, name: str) -> dict:
    return {"driver": "ocdbt", "base": f"file://{directory.absolute()}/", "path": name}


class ParamWriter:
    """Creates zarr arrays in an OCDBT store under `directory`; `close()` writes the tree metadata."""

    def __init__(self, directory: Path, chunk_bytes: int = 64 << 20):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.chunk_bytes = chunk_bytes
        # No fsync per chunk (it halves throughput). The converter publishes the folder by rename only
        # after every write completed, so a crash leaves a hidden partial folder, never a wrong checkpoint.
        self.context = ts.Context({"file_io_sync": False})
        self.leaves: list[tuple[str, ...]] = []
        self.pending: collections.deque = collections.deque()
        self.max_in_flight = 2

    def create(self, keys: tuple[str, ...], shape: tuple[int, ...], dtype) -> ts.TensorStore:
        dtype = np.dtype(dtype)
        row_bytes = int(np.prod(shape[1:])) * dtype.itemsize if len(shape) > 1 else dtype.itemsize
        rows = max(1, min(shape[0], self.chunk_bytes // max(row_bytes, 1))) if shape else 1
        spec = {"driver": "zarr", "kvstore": _kvstore(self.directory, ".".join(keys)),
                "metadata": {"shape": list(shape), "chunks": [rows, *shape[1:]], "dtype": _ZARR_DTYPES[dtype],
                             "compressor": None}}
        self.leaves.append(keys)
        return ts.open(spec, create=True, context=self.context).result()

    def write_rows(self, keys: tuple[str, ...], array: np.ndarray, dtype) -> None:
        """Writes `array` (any layout, any float dtype) as a new leaf, converting one row block at a time.

        Writes complete in the background while the caller prepares the next
        block or tensor; at most `max_in_flight` blocks are pending at once.
        """
        store = self.create(keys, array.shape, dtype)
        if array.ndim == 0:
            self._submit(store.write(np.asarray(array, dtype)))
            return
        rows = store.chunk_layout.read_chunk.shape[0]
        for start in range(0, array.shape[0], rows):
            stop = min(start + rows, array.shape[0])  # tensorstore refuses slices past the end
            self._submit(store[start:stop].write(contiguous(array[start:stop], dtype)))

    def _submit(self, future) -> None:
        self.pending.append(future)
        while len(self.pending) > self.max_in_flight:
            self.pending.popleft().result()

    def close(self) -> None:
        while self.pending:
            self.pending.popleft().result()
        tree = {str(keys): {"key_metadata": [{"key": k, "key_type": 2} for k in keys],
                            "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False}}
                for keys in self.leaves}
        metadata = {"tree_metadata": tree, "use_ocdbt": True, "use_zarr3": False,
                    "store_array_data_equal_to_fill_value": True, "custom_metadata": None}
        (self.directory / "_METADATA").write_text(json.dumps(metadata))
        now = time.time_ns()
        (self.directory / "_CHECKPOINT_METADATA").write_text(json.dumps(
            {"item_handlers": None, "metrics": {}, "performance_metrics": {}, "init_timestamp_nsecs": now,
             "commit_timestamp_nsecs": now, "custom_metadata": {}}))


class ParamReader:
    """Reads leaves of an Orbax PyTree checkpoint by key path, without loading the rest."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.context = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
        metadata = json.loads((self.directory / "_METADATA").read_text())
        self.driver = "zarr3" if metadata.get("use_zarr3") else "zarr"

    def read(self, keys: tuple[str, ...]) -> np.ndarray:
        spec = {"driver": self.driver, "kvstore": _kvstore(self.directory, ".".join(keys))}
        return ts.open(spec, open=True, context=self.context).result().read().result()
