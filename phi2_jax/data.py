"""Input pipeline: documents -> tokens -> packed sequences -> Grain batches with a checkpointable iterator.

    sources (stdlib | text | jsonl | parquet globs, each with a mixture weight)
      -> documents, split train / validation by a hash of each document's name
      -> tokenized once, EOS after every document, cached as a token stream (.npy)
      -> packed: the stream is cut into seq_len + 1 windows (concat-then-split);
         segment ids mark documents so attention never crosses them, and
         positions restart at every document
      -> Grain MapDataset: shuffled (seeded), mixed by weight, this process's
         shard, batched; the iterator's state goes into every checkpoint.

The default source is the running interpreter's standard library: real Python
code, like Phi-2's coding data, with no download.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import sysconfig
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


def stdlib_documents() -> list[Document]:
    """Every .py file of the running interpreter's standard library (tests excluded), in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        if _STDLIB_SKIP & set(path.relative_to(root).parts):
            continue
        try:
            docs.append(Document(str(path.relative_to(root)), path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue
    return docs


def _files(pattern: str) -> list[str]:
    files = sorted(glob.glob(pattern, recursive=True))
    if not files:
        raise ConfigError(f"data source '{pattern}' matches no files.")
    return files


def read_source(source: dict) -> list[Document]:
    """Documents of one source: {path, format: auto|text|jsonl|parquet, field: 'text'}."""
    path, fmt, field = source.get("path", ""), source.get("format", "auto"), source.get("field", "text")
    unknown = set(source) - {"path", "format", "weight", "field"}
    if unknown:
        raise ConfigError(f"data source {source} has unknown key '{sorted(unknown)[0]}'; expected path, format, weight, field.")
    if path == "stdlib":
        return stdlib_documents()
    docs = []
    for file in _files(path):
        kind = fmt if fmt != "auto" else {".jsonl": "jsonl", ".parquet": "parquet"}.get(Path(file).suffix, "text")
        if kind == "text":
            docs.append(Document(file, Path(file).read_text(encoding="utf-8", errors="replace")))
        elif kind == "jsonl":
            for n, record in jsonl_objects(Path(file), ConfigError):
                if not isinstance(record.get(field), str):
                    raise ConfigError(f"{file} line {n} has no string field '{field}'.")
                docs.append(Document(f"{file}:{n}", record[field]))
        elif kind == "parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise ConfigError(f"{file} is Parquet; install pyarrow (pip install 'phi2_jax[parquet]').") from None
            table = pq.read_table(file, columns=[field])
            docs += [Document(f"{file}:{n}", t) for n, t in enumerate(table.column(field).to_pylist()) if t]
        else:
            raise ConfigError(f"data source format '{kind}' is unknown; expected auto, text, jsonl or parquet.")
    return docs


def is_validation(doc: Document, fraction: float) -> bool:
    """Held out by a stable hash of the document's name, so the split never depends on order or process."""
    h = int.from_bytes(hashlib.sha256(doc.name.encode()).digest()[:8], "little")
    return (h % 10_000) < fraction * 10_000


def token_stream(docs: list[Document], tokenizer: Tokenizer, key: str) -> np.ndarray:
    """All documents tokenized, each followed by EOS, as one int32 array (cached on disk by content)."""
    digest = hashlib.sha256(f"{tokenizer.source}|{tokenizer.vocab_size}|{key}".encode())
    for d in docs:
        digest.update(hashlib.sha256(d.text.encode()).digest())
    path = cache_dir() / "tokens" / f"{digest.hexdigest()[:16]}.npy"
    if path.is_file():
        return np.load(path, mmap_mode="r")  # pages in on demand: a large corpus need not fit in RAM
    log.info("tokenizing %d %s documents (cached in %s afterwards)", len(docs), key, path.parent)
    chunks = []
    for start in range(0, len(docs), 256):
        for ids in tokenizer.encode_batch([d.text for d in docs[start:start + 256]]):
            chunks.append(np.asarray(ids + [tokenizer.eos_id], np.int32))
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, np.int32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{np.random.randint(1 << 30)}.npy")
    np.save(tmp, tokens)
    tmp.replace(path)
    return tokens


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
    """Reads, splits, tokenizes (training a tokenizer if asked) and packs every source."""
    from phi2_jax.tokenizer import load_tokenizer, train_sentencepiece

    if not sources:
        raise ConfigError("data.sources is empty; expected at least one source such as {path: stdlib}.")
    per_source = []
    for source in sources:
        docs = read_source(source)
        if max_documents:
            docs = docs[:max_documents]
        train = [d for d in docs if not is_validation(d, val_fraction)]
        val = [d for d in docs if is_validation(d, val_fraction)]
        if not train:
            raise ConfigError(f"data source '{source.get('path')}' has no training documents.")
        per_source.append((source, train, val))
    if tokenizer_spec == "auto":
        all_train = [d.text for _, train, _ in per_source for d in train]
        log.info("tokenizer: a %d-token sentencepiece BPE on %d training documents (trained once, then cached)",
                 vocab_size, len(all_train))
        tokenizer = load_tokenizer(train_sentencepiece(all_train, vocab_size, "auto"))
    else:
        tokenizer = load_tokenizer(tokenizer_spec)
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                          f"{vocab_size}; expected a model vocabulary at least as large.")
    train_sets, weights, val_docs = [], [], []
    for source, train, val in per_source:
        train_sets.append(PackedSequences(token_stream(train, tokenizer, "train"), seq_len, tokenizer.eos_id))
        weights.append(float(source.get("weight", 1.0)))
        val_docs += val
    for source, packed in zip(sources, train_sets):
        if len(packed) == 0:
            raise ConfigError(f"data source '{source.get('path')}' holds fewer than seq_len {seq_len} tokens.")
    val = PackedSequences(token_stream(val_docs, tokenizer, "validation"), seq_len, tokenizer.eos_id)
    return Splits(train_sets, weights, val, tokenizer)


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

