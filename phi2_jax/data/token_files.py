"""Token files: the data pipeline's cache of tokenized documents, and token files a user brings.

Written raw (`TokenFile`, published whole or not at all) and read back
memory-mapped (`TokenArrays`), so training never loads a corpus into memory. A
raw file's dtype is its suffix: `.uint16` whenever the vocabulary fits in 16 bits
(Phi-2's 51,200 does, halving 1.4T tokens from 5.6 TB to 2.8 TB), else `.int32`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

import numpy as np

from phi2_jax.errors import ConfigError
from phi2_jax.data.sources import Document
from phi2_jax.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# The raw token file formats: suffix -> dtype. Anything else must be a .npy array, which records its own.
RAW_DTYPES = {".uint16": np.dtype(np.uint16), ".int32": np.dtype(np.int32)}


def token_suffix(vocab_size: int) -> str:
    """The raw format for ids below `vocab_size`: `.uint16` if they fit in 16 bits, else `.int32`."""
    return ".uint16" if vocab_size <= 1 << 16 else ".int32"


class TokenFile:
    """Writes documents' tokens, each followed by EOS, to the raw token file `path` (.uint16 or .int32, see
    `token_suffix`), published whole or not at all.

    Documents are tokenized 256 at a time and appended to a temporary sibling,
    which is renamed to `path` when the `with` block ends cleanly and deleted if
    it raises, so an interrupted run never leaves a truncated stream behind.
    """

    _BATCH = 256

    def __init__(self, path: Path, tokenizer: Tokenizer, label: str):
        self.path, self.tokenizer, self.label = path, tokenizer, label
        assert path.suffix in RAW_DTYPES, f"{path}: a raw token file is named for its dtype"
        self.dtype = RAW_DTYPES[path.suffix]
        # An id past the dtype's range would wrap silently: the vocabulary must fit.
        assert tokenizer.vocab_size - 1 <= np.iinfo(self.dtype).max, (path, tokenizer.vocab_size)
        self.pending: list[str] = []
        self.documents = self.tokens = 0

    def __enter__(self) -> TokenFile:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}-{np.random.randint(1 << 30)}")
        self.file = open(self.tmp, "wb")
        self.start = self.logged = time.perf_counter()
        return self

    def add(self, doc: Document) -> None:
        self.pending.append(doc.text)
        if len(self.pending) == self._BATCH:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        eos = [self.tokenizer.eos_id]
        ids = np.asarray([t for ids in self.tokenizer.encode_batch(self.pending) for t in ids + eos], np.int64)
        ids = ids.astype(self.dtype)  # in range: the vocabulary was checked against the dtype
        self.file.write(ids.tobytes())
        self.documents, self.tokens, self.pending = self.documents + len(self.pending), self.tokens + len(ids), []
        now = time.perf_counter()
        if now - self.logged > 10:  # a large corpus takes a while: say how far it got
            self.logged = now
            log.info("tokenizing %s: %d documents, %.1fM tokens, %.0fk tokens/s", self.label, self.documents,
                     self.tokens / 1e6, self.tokens / (now - self.start) / 1e3)

    def __exit__(self, kind, error, traceback) -> None:
        try:
            try:
                if kind is None:
                    self._flush()
            finally:
                self.file.close()
            if kind is None:
                os.replace(self.tmp, self.path)  # atomic: a concurrent process sees the whole stream or none
                log.info("tokenized %s: %d documents, %d tokens in %.1fs", self.label, self.documents, self.tokens,
                         time.perf_counter() - self.start)
        finally:
            self.tmp.unlink(missing_ok=True)


class TokenArrays:
    """Token files read as one 1-D stream, memory-mapped: slices page in on demand.

    Files are raw .uint16 / .int32 token files (the pipeline's cache, pretokenize's
    output) or .npy arrays of any integer dtype (tokenized elsewhere); slices keep
    the file's dtype (`PackedSequences` widens them to int32). A slice across a
    file boundary is joined. Pickled as its paths, so Grain's worker processes map the files again instead of
    receiving a copy of every token.
    """

    def __init__(self, paths: list[Path]):
        self.paths = [Path(p) for p in paths]
        self._map()

    def _map(self) -> None:
        self.arrays = [_map_file(p) for p in self.paths]
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: slice | int) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            position = index + len(self) if index < 0 else index
            if not 0 <= position < len(self):
                raise IndexError(f"token {index} of {len(self)}")
            return self[position:position + 1][0]
        start, stop, step = index.indices(len(self))
        assert step == 1, "token streams are read in contiguous windows"
        parts = []
        file = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:
            offset = start - self.starts[file]
            take = min(stop - start, len(self.arrays[file]) - offset)
            parts.append(np.asarray(self.arrays[file][offset:offset + take]))
            start, file = start + take, file + 1
        if not parts:
            return np.zeros(0, self.arrays[0].dtype if self.arrays else np.int32)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def __getstate__(self) -> dict:
        return {"paths": self.paths}

    def __setstate__(self, state: dict) -> None:
        self.paths = state["paths"]
        self._map()


def _map_file(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as error:
            raise ConfigError(f"{path} could not be read as a .npy array ({error}).") from None
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise ConfigError(f"{path} holds a {array.ndim}-d {array.dtype} array; expected a 1-d array of token ids.")
        return array
    dtype = RAW_DTYPES.get(path.suffix)
    if dtype is None:  # a raw file's dtype is its suffix: no guessing at a .bin's
        raise ConfigError(f"{path} is neither a .npy array nor a raw .uint16 or .int32 token file; expected one of "
                          f"those (save other token arrays with numpy.save).")
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise ConfigError(f"{path} holds {size} bytes, not a whole number of {dtype} token ids; expected a file "
                          f"written whole (by python -m phi2_jax.pretokenize or this pipeline).")
    if size == 0:  # np.memmap cannot map an empty file
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def check_token_ids(tokens: TokenArrays, vocab_size: int, sample: int = 1 << 20) -> None:
    """Refuses token files whose ids fall outside [0, vocab_size), checking each file's first and last `sample` ids.

    An out-of-range id would index past the embedding table, which XLA clamps
    without complaint; reading all of a large corpus to check every id would take
    as long as an epoch, so the ends of each file stand for the rest.
    """
    for path, array in zip(tokens.paths, tokens.arrays):
        for part in (array[:sample], array[-sample:]):
            if len(part) and (int(part.min()) < 0 or int(part.max()) >= vocab_size):
                bad = int(part.min()) if int(part.min()) < 0 else int(part.max())
                raise ConfigError(f"{path} holds token id {bad}, outside the model's vocabulary of {vocab_size}; "
                                  f"expected ids made by the configured tokenizer.")


def check_shards_complete(paths: list[Path]) -> None:
    """Refuses token files from some but not all shards of a sharded pretokenize (OUT_DIR/shard-IIIII/...).

    A glob over the shards of a run still in progress matches only those that
    are finished, and training on them would silently leave part of the corpus out.
    """
    for out_dir in sorted({p.parent.parent for p in paths if re.fullmatch(r"shard-\d{5}", p.parent.name)}):
        summaries = sorted(out_dir.glob("shard-[0-9][0-9][0-9][0-9][0-9]/tokens.json"))
        if not summaries:
            continue
        expected = json.loads(summaries[0].read_text()).get("num_shards", len(summaries))
        missing = [f"shard-{k:05d}" for k in range(expected)
                   if not (out_dir / f"shard-{k:05d}" / "tokens.json").is_file()]
        if missing:
            raise ConfigError(f"{out_dir} holds {expected - len(missing)} of the {expected} shards of a sharded "
                              f"pretokenize ({missing[0]} is missing); expected every shard finished before training "
                              f"(e.g. sbatch --dependency=afterok:<the array's job id>).")
