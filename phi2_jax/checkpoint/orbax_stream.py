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
import os
import re
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import tensorstore as ts

from phi2_jax.util.host_arrays import contiguous

_ZARR_DTYPES = {np.dtype("float32"): "<f4", np.dtype("float16"): "<f2", np.dtype(ml_dtypes.bfloat16): "bfloat16"}


def _result(future):
    """`future.result()`, with a tensorstore error that carries an OS error code raised as that `OSError`.

    tensorstore reports a full disk or a file-size limit as a ValueError whose text
    ends in `[os_error_code='28']`; as an OSError the caller can tell the user
    what happened to the destination in one sentence.
    """
    try:
        return future.result()
    except ValueError as error:
        code = re.search(r"os_error_code='?(\d+)", str(error))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1]))) from error


def _kvstore(directory: Path, name: str) -> dict:
    return {"driver": "ocdbt", "base": f"file://{directory.absolute()}/", "path": name}


class ParamWriter:
    """Creates zarr arrays in an OCDBT store under `directory`; `close()` writes the tree metadata.

    Use it as a context manager: leaving the block by an exception waits for the
    writes still in flight (`abort`), so that whoever removes the unfinished
    folder afterwards does not race tensorstore's background writes (which
    recreated files in a folder already removed).
    """

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

    def create(self, keys: tuple[str, ...], shape: tuple[int, ...], dtype, order: str = "C") -> ts.TensorStore:
        """A new zarr leaf; chunks are whole rows (order C) or whole columns (order F) of about `chunk_bytes`."""
        dtype = np.dtype(dtype)
        chunks = list(shape)
        if shape:
            axis = -1 if order == "F" else 0
            slab_bytes = int(np.prod(shape)) // max(shape[axis], 1) * dtype.itemsize
            chunks[axis] = max(1, min(shape[axis], self.chunk_bytes // max(slab_bytes, 1)))
        spec = {"driver": "zarr", "kvstore": _kvstore(self.directory, ".".join(keys)),
                "metadata": {"shape": list(shape), "chunks": chunks, "dtype": _ZARR_DTYPES[dtype],
                             "compressor": None, "order": order}}
        self.leaves.append(keys)
        return _result(ts.open(spec, create=True, context=self.context))

    def write(self, keys: tuple[str, ...], array: np.ndarray, dtype) -> None:
        """Writes `array` (any layout, any float dtype) as a new leaf, converting one chunk at a time.

        A transposed view of a row-major tensor (every Hugging Face kernel seen
        as ours) is stored in Fortran order: its chunks are then byte-for-byte
        runs of the source, so nothing is transposed on the way in, and
        `ParamReader` hands it back the same way. Writes complete in the
        background while the caller prepares the next chunk or tensor; at most
        `max_in_flight` chunks are pending at once.
        """
        fortran = array.ndim == 2 and array.flags.f_contiguous and not array.flags.c_contiguous
        store = self.create(keys, array.shape, dtype, "F" if fortran else "C")
        if array.ndim == 0:
            self._submit(store.write(np.asarray(array, dtype)))
            return
        axis = 1 if fortran else 0  # chunks run along columns (F) or rows (C)
        step = store.chunk_layout.write_chunk.shape[axis]
        for start in range(0, array.shape[axis], step):
            # tensorstore refuses slices past the end, so clip the last one
            index = (slice(None),) * axis + (slice(start, min(start + step, array.shape[axis])),)
            block = array[index]
            self._submit(store[index].write(block.astype(dtype, order="F", copy=False) if fortran
                                            else contiguous(block, dtype)))

    def _submit(self, future) -> None:
        self.pending.append(future)
        while len(self.pending) > self.max_in_flight:
            _result(self.pending.popleft())

    def abort(self) -> None:
        """Waits for every write in flight, ignoring their errors: after it, nothing more lands in `directory`."""
        while self.pending:
            try:
                self.pending.popleft().result()
            except Exception:  # the write is abandoned anyway; only its completion matters here
                pass

    def __enter__(self) -> "ParamWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            self.abort()

    def close(self) -> None:
        while self.pending:
            _result(self.pending.popleft())
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
        """The leaf as a numpy array in its stored memory order (a Fortran-order leaf comes back F-contiguous)."""
        spec = {"driver": self.driver, "kvstore": _kvstore(self.directory, ".".join(keys))}
        store = ts.open(spec, open=True, context=self.context).result()
        inner = list(store.chunk_layout.inner_order or range(store.rank))
        fortran = store.rank > 1 and inner == list(reversed(range(store.rank)))
        return store.read(order="F" if fortran else "C").result()
