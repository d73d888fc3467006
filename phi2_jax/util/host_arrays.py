"""Host-side array helpers: dtype names to numpy, and fast contiguous copies of transposed views.

numpy copies a transposed [10240, 2560] view element by element across rows,
missing the cache on every read; copying 256 x 256 tiles keeps both sides in
cache and runs several times faster, and two threads (numpy releases the GIL
while copying) use both cores of a small machine.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import numpy as np

TILE = 256


def numpy_dtype(name: str) -> np.dtype:
    """numpy dtype for a dtype name ('bfloat16' through ml_dtypes)."""
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)

_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="phi2_jax_copy")


def contiguous(array: np.ndarray, dtype) -> np.ndarray:
    """`np.ascontiguousarray(array, dtype)`, fast for transposed 2-D views."""
    dtype = np.dtype(dtype)
    if array.ndim != 2 or array.flags.c_contiguous or array.size < TILE * TILE:
        return np.ascontiguousarray(array, dtype=dtype)
    out = np.empty(array.shape, dtype)
    rows, cols = array.shape

    def copy_rows(start: int) -> None:
        for j in range(0, cols, TILE):
            out[start:start + TILE, j:j + TILE] = array[start:start + TILE, j:j + TILE]

    list(_pool.map(copy_rows, range(0, rows, TILE)))
    return out
