"""Input pipeline: documents -> tokens -> packed sequences -> Grain batches with a checkpointable iterator.

    sources (stdlib | text | jsonl | parquet globs, each with a mixture weight)
      -> documents, split train / validation by a hash of each document's name
      -> tokenized once in a streaming pass, EOS after every document, cached
         on disk as an int32 token file that is memory-mapped, never loaded
      -> packed: the stream is cut into seq_len + 1 windows (concat-then-split);
         segment ids mark documents so attention never crosses them, and
         positions restart at every document
      -> Grain MapDataset: shuffled (seeded), mixed by weight, this process's
         shard, batched; the iterator's state goes into every checkpoint.

The default source is the running interpreter's standard library: real Python
code, like Phi-2's coding data, with no download.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import itertools
import json
import logging
import os
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grain
import numpy as np

from phi2_jax.errors import ConfigError
from phi2_jax.jsonl import jsonl_objects
from phi2_jax.tokenizer import Tokenizer, cache_dir

log = logging.getLogger(__name__)

_STDLIB_SKIP = {"site-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3", "turtledemo"}


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def stdlib_files() -> list[Path]:
    """Every .py file of the running interpreter's standard library (tests excluded), in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [p for p in sorted(root.rglob("*.py")) if not _STDLIB_SKIP & set(p.relative_to(root).parts)]


def stdlib_documents() -> Iterator[Document]:
    """The standard library's source files as documents, read lazily (the default training corpus)."""
    return read_source({"path": "stdlib"})


def _files(pattern: str) -> list[str]:
    if os.path.isdir(pattern):
        raise ConfigError(f"data source '{pattern}' is a folder; expected a file or a glob such as "
                          f"'{os.path.join(pattern, '**', '*.jsonl')}'.")
    files = [f for f in sorted(glob.glob(pattern, recursive=True)) if os.path.isfile(f)]
    if not files:
        raise ConfigError(f"data source '{pattern}' matches no files.")
    return files


_FORMATS = ("auto", "text", "jsonl", "parquet")


def _source_files(source: dict) -> list[str]:
    """The files a source reads, as glob spells them (documents are named after them), after checking its keys."""
    unknown = set(source) - {"path", "format", "weight", "field"}
    if unknown:
        raise ConfigError(f"data source {source} has unknown key '{sorted(unknown)[0]}'; expected path, format, weight, field.")
    fmt = source.get("format", "auto")
    if fmt not in _FORMATS:
        raise ConfigError(f"data source format '{fmt}' is unknown; expected {', '.join(_FORMATS)}.")
    if source.get("path", "") == "stdlib":
        return [str(p) for p in stdlib_files()]
    return _files(source.get("path", ""))


def read_source(source: dict) -> Iterator[Document]:
    """Documents of one source, {path, format: auto|text|jsonl|parquet, field: 'text'}, read lazily.

    One file, JSONL line or Parquet record batch is in memory at a time, so a
    corpus larger than RAM streams through. The source's keys and files are
    checked when this is called; a bad record raises when it is reached.
    """
    files = _source_files(source)
    fmt, field = source.get("format", "auto"), source.get("field", "text")
    if source.get("path") == "stdlib":
        return _stdlib_documents(files)
    return _file_documents(files, fmt, field)


def _stdlib_documents(files: list[str]) -> Iterator[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in map(Path, files):
        try:
            yield Document(str(path.relative_to(root)), path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue


def _file_documents(files: list[str], fmt: str, field: str) -> Iterator[Document]:
    for file in files:
        kind = fmt if fmt != "auto" else {".jsonl": "jsonl", ".parquet": "parquet"}.get(Path(file).suffix, "text")
        if kind == "text":
            yield Document(file, Path(file).read_text(encoding="utf-8", errors="replace"))
        elif kind == "jsonl":
            for n, record in jsonl_objects(Path(file), ConfigError):
                if not isinstance(record.get(field), str):
                    raise ConfigError(f"{file} line {n} has no string field '{field}'.")
                yield Document(f"{file}:{n}", record[field])
        else:
            yield from _parquet_documents(file, field)


def _parquet_documents(file: str, field: str) -> Iterator[Document]:
    """One record batch at a time; rows with an empty or null text are skipped but keep their row numbers."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"{file} is Parquet; install pyarrow (pip install 'phi2_jax[parquet]').") from None
    try:
        parquet = pq.ParquetFile(file)
    except (pa.ArrowException, OSError) as error:
        raise ConfigError(f"{file} could not be read as Parquet ({error}).") from None
    schema = parquet.schema_arrow
    if field not in schema.names:
        raise ConfigError(f"{file} has no column '{field}'; its columns are {', '.join(schema.names)} (set the source's field).")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ConfigError(f"{file} column '{field}' holds {kind}; expected strings.")
    n = 0
    for batch in parquet.iter_batches(columns=[field]):
        for text in batch.column(0).to_pylist():
            if text:
                yield Document(f"{file}:{n}", text)
            n += 1


def source_fingerprint(source: dict) -> str:
    """A cache key for a source's contents: its settings and each file's path, size and modification time.

    Hashing the contents themselves would read a large corpus once more at every
    start just to find its cached tokens; any edit changes a file's mtime.
    """
    digest = hashlib.sha256(json.dumps({k: source.get(k) for k in ("path", "format", "field")}).encode())
    for file in _source_files(source):
        stat = os.stat(file)
        digest.update(f"{os.path.abspath(file)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def is_validation(doc: Document, fraction: float) -> bool:
    """Held out by a stable hash of the document's name, so the split never depends on order or process."""
    h = int.from_bytes(hashlib.sha256(doc.name.encode()).digest()[:8], "little")
    return (h % 10_000) < fraction * 10_000


class TokenFile:
    """Writes documents' tokens, each followed by EOS, as raw int32 to `path`, published whole or not at all.

    Documents are tokenized 256 at a time and appended to a temporary sibling,
    which is renamed to `path` when the `with` block ends cleanly and deleted if
    it raises, so an interrupted run never leaves a truncated stream behind.
    """

    _BATCH = 256

    def __init__(self, path: Path, tokenizer: Tokenizer, label: str):
        self.path, self.tokenizer, self.label = path, tokenizer, label
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
        ids = np.asarray([t for ids in self.tokenizer.encode_batch(self.pending) for t in ids + eos], np.int32)
        self.file.write(ids.tobytes())
        self.documents, self.tokens, self.pending = self.documents + len(self.pending), self.tokens + len(ids), []
        now = time.perf_counter()
        if now - self.logged > 10:  # a large corpus takes a while: say how far it got
            self.logged = now
            log.info("tokenizing %s: %d documents, %.1fM tokens, %.0fk tokens/s", self.label, self.documents,
                     self.tokens / 1e6, self.tokens / (now - self.start) / 1e3)

    def __exit__(self, kind, error, traceback) -> None:
        try:
            if kind is None:
                self._flush()
            self.file.close()
            if kind is None:
                os.replace(self.tmp, self.path)  # atomic: a concurrent process sees the whole stream or none
                log.info("tokenized %s: %d documents, %d tokens in %.1fs", self.label, self.documents, self.tokens,
                         time.perf_counter() - self.start)
        finally:
            self.tmp.unlink(missing_ok=True)


def read_tokens(path: Path) -> np.ndarray:
    """A token file as an int32 array that pages in on demand: a large corpus need not fit in RAM."""
    if path.stat().st_size == 0:
        return np.zeros(0, np.int32)
    return np.memmap(path, dtype=np.int32, mode="r")


class PackedSequences:
    """Random-access packed examples over a token stream: a Grain data source.

    Example i is the window stream[i*L : i*L + L + 1]; inputs are its first L
    tokens, targets the last L. A document ends at its EOS token, so segment
    ids count the EOS tokens before each position.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, eos_id: int):
        self.tokens, self.seq_len, self.eos_id = tokens, seq_len, eos_id
        self._len = max(0, (len(tokens) - 1) // seq_len)

    def __len__(self) -> int:
        return self._len

    def __getstate__(self) -> dict:
        # Grain's worker processes receive the source pickled: a token file goes as its path (each worker maps
        # it again), not as a copy of every token.
        state = dict(self.__dict__)
        if isinstance(self.tokens, np.memmap) and self.tokens.filename:
            state["tokens"] = Path(self.tokens.filename)
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state["tokens"], Path):
            state["tokens"] = read_tokens(state["tokens"])
        self.__dict__.update(state)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        window = self.tokens[index * self.seq_len: index * self.seq_len + self.seq_len + 1]
        inputs, targets = window[:-1], window[1:]
        ended = (inputs == self.eos_id).astype(np.int32)
        segment_ids = 1 + np.concatenate([[0], np.cumsum(ended)[:-1]]).astype(np.int32)
        starts = np.concatenate([[True], segment_ids[1:] != segment_ids[:-1]])
        index_ = np.arange(self.seq_len)
        positions = index_ - np.maximum.accumulate(np.where(starts, index_, 0))
        return {"input_ids": inputs.astype(np.int32), "targets": targets.astype(np.int32),
                "segment_ids": segment_ids, "positions": positions.astype(np.int32)}


@dataclass
class Splits:
    train: list[PackedSequences]  # one per source
    weights: list[float]
    validation: PackedSequences
    tokenizer: Tokenizer


def build_splits(sources: list[dict], tokenizer_spec: str, seq_len: int, val_fraction: float, vocab_size: int,
                 max_documents: int = 0) -> Splits:
    """Reads, splits, tokenizes (training a tokenizer if asked) and packs every source.

    Tokens are cached on disk, keyed by the tokenizer and the sources' fingerprints,
    so only the first run reads and tokenizes the corpus: in one streaming pass
    per source, each document appended to its split's token file.
    """
    from phi2_jax.tokenizer import load_tokenizer, train_sentencepiece

    if not sources:
        raise ConfigError("data.sources is empty; expected at least one source such as {path: stdlib}.")
    keys = [f"{source_fingerprint(source)}|{max_documents}|{val_fraction}" for source in sources]

    def documents(source: dict, validation: bool | None = None) -> Iterator[Document]:
        docs = read_source(source)
        docs = itertools.islice(docs, max_documents) if max_documents else docs
        return (d for d in docs if validation is None or is_validation(d, val_fraction) == validation)

    if tokenizer_spec == "auto":
        log.info("tokenizer: a %d-token sentencepiece BPE on the training documents (trained once, then cached)",
                 vocab_size)
        tokenizer = load_tokenizer(train_sentencepiece(
            lambda: (d.text for source in sources for d in documents(source, validation=False)), vocab_size, "auto",
            corpus_key="|".join(keys)))
    else:
        tokenizer = load_tokenizer(tokenizer_spec)
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                          f"{vocab_size}; expected a model vocabulary at least as large.")

    tokenizer_key = f"{hashlib.sha256(Path(tokenizer.source).read_bytes()).hexdigest()}|{tokenizer.vocab_size}"
    folder = cache_dir() / "tokens"
    train_files = [folder / f"{_digest(tokenizer_key, 'train', key)}.int32" for key in keys]
    val_file = folder / f"{_digest(tokenizer_key, 'validation', *keys)}.int32"
    if not val_file.is_file() or not all(f.is_file() for f in train_files):
        # One pass over each source writes its training tokens and its share of the validation tokens.
        with _token_file_if(not val_file.is_file(), val_file, tokenizer, "validation documents") as val_out:
            for source, train_file in zip(sources, train_files):
                if train_file.is_file() and val_out is None:
                    continue
                with _token_file_if(not train_file.is_file(), train_file, tokenizer,
                                    f"training documents of '{source.get('path')}'") as train_out:
                    for doc in documents(source):
                        out = val_out if is_validation(doc, val_fraction) else train_out
                        if out is not None:
                            out.add(doc)

    train_sets, weights = [], []
    for source, train_file in zip(sources, train_files):
        packed = PackedSequences(read_tokens(train_file), seq_len, tokenizer.eos_id)
        if len(packed.tokens) == 0:
            raise ConfigError(f"data source '{source.get('path')}' has no training documents.")
        if len(packed) == 0:
            raise ConfigError(f"data source '{source.get('path')}' holds fewer than seq_len {seq_len} tokens.")
        train_sets.append(packed)
        weights.append(float(source.get("weight", 1.0)))
    val = PackedSequences(read_tokens(val_file), seq_len, tokenizer.eos_id)
    return Splits(train_sets, weights, val, tokenizer)


def _digest(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _token_file_if(needed: bool, path: Path, tokenizer: Tokenizer, label: str):
    """A TokenFile for `path` if that file is still needed, else a context that yields None."""
    return TokenFile(path, tokenizer, label) if needed else contextlib.nullcontext()


def train_dataset(splits: Splits, batch_size: int, seed: int, process_index: int = 0, process_count: int = 1,
                  workers: int = 0) -> grain.IterDataset:
    """Infinite, shuffled, mixed, process-sharded batches of `batch_size` (this process's share) sequences."""
    parts = []
    for i, packed in enumerate(splits.train):
        ds = grain.MapDataset.source(packed).shuffle(seed=seed + i)
        parts.append(ds)
    mixed = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, splits.weights)
    mixed = mixed.repeat()
    # Process p takes rows [p*B, (p+1)*B) of every global batch of B*P rows, so the
    # global batch is the same whatever the number of processes.
    global_batch = batch_size * process_count

    def row(j: int) -> dict:
        return mixed[(j // batch_size) * global_batch + process_index * batch_size + j % batch_size]

    ds = grain.MapDataset.range(len(mixed) // global_batch * batch_size).map(row)
    ds = ds.batch(batch_size, drop_remainder=True)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
    if workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # Grain's worker processes read absl flags; we have no absl main
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return it


def validation_batches(splits: Splits, batch_size: int, num_batches: int, process_index: int = 0,
                       process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """The first `num_batches` validation batches, the same every time (this process's share)."""
    val = splits.validation
    needed = batch_size * process_count
    count = min(num_batches, len(val) // needed) if needed else 0
    batches = []
    for b in range(count):
        rows = [val[b * needed + process_index * batch_size + r] for r in range(batch_size)]
        batches.append({k: np.stack([row[k] for row in rows]) for k in rows[0]})
    return batches

