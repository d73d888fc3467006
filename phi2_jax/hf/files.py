"""Reading the weight files of a Hugging Face model folder, one tensor at a time.

Handles a single `model.safetensors`, shards listed by
`model.safetensors.index.json`, and (only when torch is installed, and only
through `torch.load(weights_only=True)`, never a full unpickle)
`pytorch_model.bin`. Every problem a downloaded folder can have is reported as
a `WeightsError` naming the file: an index whose shards lie outside the folder,
a tensor stored in a dtype a Phi model does not hold (int8, float64, ...), and,
as each tensor is read, NaN or infinite weights (unless the caller accepts them).
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import ml_dtypes
import numpy as np

from phi2_jax.errors import WeightsError
from phi2_jax.util.host_arrays import numpy_dtype
from phi2_jax.hf.safetensors_io import SafetensorsFile

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
# The dtypes a Phi model's weights are stored in; anything else (a quantised int8 file, float64) would be
# changed on the way in, so it is refused by name rather than cast.
WEIGHT_DTYPES = ("float32", "float16", "bfloat16")
_EXPONENT_MASKS = {np.dtype("float32"): (np.uint32, 0x7F800000), np.dtype("float16"): (np.uint16, 0x7C00),
                   np.dtype(ml_dtypes.bfloat16): (np.uint16, 0x7F80)}


def count_nonfinite(array: np.ndarray, block_bytes: int = 16 << 20) -> int:
    """How many NaN or infinite values a float32/float16/bfloat16 array holds, a block of rows at a time.

    A value is non-finite exactly when all its exponent bits are set; testing the
    bits works for bfloat16 too (numpy's isfinite has no fast path for it) and
    keeps the temporaries to one block.
    """
    uint, mask = _EXPONENT_MASKS[array.dtype]
    flat = array.reshape(-1) if array.flags.c_contiguous or array.flags.f_contiguous else np.ravel(array)
    bits = flat.view(uint)
    step = max(1, block_bytes // array.dtype.itemsize)
    return sum(int(np.count_nonzero((bits[i:i + step] & mask) == mask)) for i in range(0, bits.size, step))


class HFWeights:
    """Lazy view of the tensors in a Hugging Face folder: `names`, `shape(name)`, `dtype(name)`, `read(name)`.

    allow_nonfinite: hand back tensors holding NaN or infinity (each reported once) instead of refusing them.
    """

    def __init__(self, folder: str | Path, allow_nonfinite: bool = False):
        self.folder = Path(folder)
        self.allow_nonfinite = allow_nonfinite
        self.nonfinite: dict[str, int] = {}  # tensor -> count, for tensors read while allowed
        if not self.folder.is_dir():
            raise WeightsError(f"{self.folder} is not a folder; expected a Hugging Face model folder.")
        self._file_of: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        self._torch_state: dict | None = None
        index, single = self.folder / SAFETENSORS_INDEX, self.folder / SAFETENSORS
        if index.is_file():
            self._read_index(index)
        elif single.is_file():
            for name in self._open(single).keys():
                self._file_of[name] = single
        elif (self.folder / TORCH_BIN).is_file():
            self._read_torch_bin(self.folder / TORCH_BIN)
        else:
            raise WeightsError(
                f"{self.folder} holds no weights; expected {SAFETENSORS}, {SAFETENSORS_INDEX} with its shards, or {TORCH_BIN}.")
        self.format = "pytorch_model.bin" if self._torch_state is not None else "safetensors"
        self.files = sorted(set(self._file_of.values()))
        for name in self._file_of:
            if self.dtype(name) not in WEIGHT_DTYPES:
                raise WeightsError(f"{self._file_of[name]}: tensor '{name}' is stored as {self.dtype(name)}, which a Phi "
                                   f"model does not hold (it would be changed on the way in); expected "
                                   f"{', '.join(WEIGHT_DTYPES[:-1])} or {WEIGHT_DTYPES[-1]}.")

    def _read_index(self, index: Path) -> None:
        try:
            contents = json.loads(index.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as error:
            raise WeightsError(f"{index} is not UTF-8 text (byte {error.start}); expected a safetensors index "
                               f"in JSON.") from None
        except json.JSONDecodeError as error:
            raise WeightsError(f"{index} is not valid JSON ({error.msg} at line {error.lineno}); expected a "
                               f"safetensors index.") from None
        except OSError as error:
            raise WeightsError(f"{index} could not be read ({error.strerror}).") from None
        weight_map = contents.get("weight_map") if isinstance(contents, dict) else None
        if not isinstance(weight_map, dict):
            raise WeightsError(f"{index} has no 'weight_map' object (found {type(weight_map).__name__}); expected "
                               f"a JSON object with 'weight_map': {{tensor name: shard file name}}.")
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or not shard:
                raise WeightsError(f"{index} maps '{name}' to {shard!r}; expected the file name of a shard.")
            parts = PurePosixPath(shard.replace("\\", "/"))
            if parts.is_absolute() or Path(shard).is_absolute() or ".." in parts.parts:
                raise WeightsError(f"{index} names shard {shard!r} for '{name}', which lies outside {self.folder}; "
                                   f"expected a file name inside the model folder.")
            path = self.folder / shard
            if not path.is_file():
                raise WeightsError(f"{index} names shard {shard} for '{name}', but {path} does not exist.")
            self._file_of[name] = path
        # Check every shard actually holds what the index promises.
        for path in set(self._file_of.values()):
            held = set(self._open(path).keys())
            missing = [n for n, p in self._file_of.items() if p == path and n not in held]
            if missing:
                raise WeightsError(f"{index} says '{missing[0]}' is in {path.name}, but that shard does not hold it.")

    def _read_torch_bin(self, path: Path) -> None:
        try:
            import torch
        except ImportError:
            raise WeightsError(f"{path} is a pickle-based torch file and torch is not installed; "
                               f"expected {SAFETENSORS} (or install torch to read it safely).") from None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:  # torch raises many types for a bad file
            raise WeightsError(f"{path} could not be read as a weights-only torch file ({error}).") from None
        self._torch_state = state
        self._file_of = {name: path for name in state}

    def _open(self, path: Path) -> SafetensorsFile:
        if path not in self._handles:
            self._handles[path] = SafetensorsFile(path)
        return self._handles[path]

    @property
    def names(self) -> list[str]:
        return list(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        if self._torch_state is not None:
            return tuple(self._torch_state[name].shape)
        return self._open(self._file_of[name]).shape(name)

    def dtype(self, name: str) -> str:
        if self._torch_state is not None:
            return str(self._torch_state[name].dtype).removeprefix("torch.")
        return self._open(self._file_of[name]).dtype(name).name

    def read(self, name: str) -> np.ndarray:
        """The tensor as a numpy array in its stored dtype (bfloat16 via ml_dtypes), checked to be finite."""
        if name not in self._file_of:
            raise WeightsError(f"{self.folder} has no tensor '{name}'.")
        array = self._read(name)
        bad = count_nonfinite(array)
        if bad and not self.allow_nonfinite:
            raise WeightsError(f"{self._file_of[name]}: tensor '{name}' holds {bad:,} NaN or infinite value"
                               f"{'s' * (bad > 1)} of {array.size:,}; pass allow_nonfinite=True "
                               f"(--allow-nonfinite) to load it anyway.")
        if bad:
            self.nonfinite[name] = bad
        return array

    def _read(self, name: str) -> np.ndarray:
        if self._torch_state is not None:
            tensor = self._torch_state[name]
            if str(tensor.dtype) == "torch.bfloat16":
                import torch
                return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            return tensor.numpy()
        return self._open(self._file_of[name]).read(name)

    def total_bytes(self) -> int:
        """Bytes of all tensors as stored."""
        return sum(int(np.prod(self.shape(n))) * numpy_dtype(self.dtype(n)).itemsize for n in self.names)
