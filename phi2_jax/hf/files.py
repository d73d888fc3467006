"""Reading the weight files of a Hugging Face model folder, one tensor at a time.

Handles a single `model.safetensors`, shards listed by
`model.safetensors.index.json`, and (only when torch is installed, and only
through `torch.load(weights_only=True)`, never a full unpickle)
`pytorch_model.bin`. Every problem a downloaded folder can have is reported as
a `WeightsError` naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np

from phi2_jax.errors import WeightsError
from phi2_jax.util.host_arrays import numpy_dtype
from phi2_jax.hf.safetensors_io import SafetensorsFile

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"


class HFWeights:
    """Lazy view of the tensors in a Hugging Face folder: `names`, `shape(name)`, `dtype(name)`, `read(name)`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
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

    def _read_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise WeightsError(f"{index} is not a safetensors index ({error}); expected a JSON object with 'weight_map'.") from None
        for name, shard in weight_map.items():
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
        """The tensor as a numpy array in its stored dtype (bfloat16 via ml_dtypes)."""
        if name not in self._file_of:
            raise WeightsError(f"{self.folder} has no tensor '{name}'.")
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
