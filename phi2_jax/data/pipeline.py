"""Input pipeline: documents -> tokens -> packed sequences -> Grain batches with a checkpointable iterator.

    sources (stdlib | text | jsonl | parquet globs, each with a mixture weight; `sources.py`)
      -> documents, split train / validation by a hash of each document's name
      -> tokenized once in a streaming pass, EOS after every document, cached
         on disk as uint16 token files (int32 for a vocabulary past 65,536)
         that are memory-mapped, never loaded (`token_files.py`); or token files tokenized elsewhere (format: tokens)
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
import hashlib
import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grain
import numpy as np

from phi2_jax.errors import ConfigError, UserInputError, is_disk_full
from phi2_jax.model.transformer import default_positions
from phi2_jax.data.sources import Document, is_validation, read_source, source_files, source_fingerprint
from phi2_jax.data.token_files import TokenArrays, TokenFile, check_shards_complete, check_token_ids, token_suffix
from phi2_jax.data.tokenizer import Tokenizer, cache_dir
from phi2_jax.data.tokenize_once import tokenize_once

log = logging.getLogger(__name__)


class PackedSequences:
    """Random-access packed examples over a token stream: a Grain data source.

    Example i is the window stream[i*L : i*L + L + 1]; inputs are its first L
    tokens, targets the last L. A document ends at its EOS token, so segment
    ids count the EOS tokens before each position.
    """

    def __init__(self, tokens: TokenArrays | np.ndarray, seq_len: int, eos_id: int):
        self.tokens, self.seq_len, self.eos_id = tokens, seq_len, eos_id
        self._len = max(0, (len(tokens) - 1) // seq_len)

    def __len__(self) -> int:
        return self._len

    @property
    def amount(self) -> str:
        """What the split holds, for messages: '30 tokens'."""
        return f"{len(self.tokens)} tokens"

    @property
    def unit(self) -> str:
        """What one batch row is, for messages."""
        return f"sequences of {self.seq_len} + 1 tokens"

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        window = self.tokens[index * self.seq_len: index * self.seq_len + self.seq_len + 1]
        inputs, targets = window[:-1], window[1:]
        ended = (inputs == self.eos_id).astype(np.int32)
        segment_ids = 1 + np.concatenate([[0], np.cumsum(ended)[:-1]]).astype(np.int32)
        positions = default_positions(1, self.seq_len, segment_ids=segment_ids[None], xp=np)[0]
        return {"input_ids": inputs.astype(np.int32), "targets": targets.astype(np.int32),
                "segment_ids": segment_ids, "positions": positions.astype(np.int32)}


@dataclass
class Splits:
    train: list[PackedSequences]  # one per source (post-training: data/post_data.RowSource, the same interface)
    weights: list[float]
    validation: PackedSequences
    tokenizer: Tokenizer

    # What a too-small validation split's warning advises (post-training has no validation token files).
    more_validation = "raise data.val_fraction or add a validation token file (format: tokens, split: validation)"


def build_splits(sources: list[dict], tokenizer_spec: str, seq_len: int, val_fraction: float, vocab_size: int,
                 max_documents: int = 0, process_index: int = 0, process_count: int = 1,
                 wait_s: float = 300.0) -> Splits:
    """Reads, splits, tokenizes (training a tokenizer if asked) and packs every source.

    Text sources are tokenized once and cached on disk, keyed by the tokenizer
    and the sources' fingerprints: the first run reads each source in one
    streaming pass, appending each document to its split's token file. Token
    sources (format: tokens) are used as they are, for the split they name.
    In a job of `process_count` processes only process 0 tokenizes (and trains
    an 'auto' tokenizer); the others wait up to `wait_s` seconds of silence for
    it and then read its cache, which must be on a folder they share
    (`tokenize_once.py`).
    """
    from phi2_jax.data.tokenizer import load_tokenizer, train_sentencepiece

    if max_documents < 0:
        raise ConfigError(f"data.max_documents is {max_documents}; expected 0 (every document) or a positive cap.")
    if not sources:
        raise ConfigError("data.sources is empty; expected at least one source such as {path: stdlib}.")
    given = {i: TokenArrays([Path(f) for f in source_files(source)])  # source index -> its token files
             for i, source in enumerate(sources) if source.get("format") == "tokens"}
    texts = {i: s for i, s in enumerate(sources) if i not in given}  # source index -> text source
    keys = {i: f"{source_fingerprint(source)}|{max_documents}|{val_fraction}" for i, source in texts.items()}
    for tokens in given.values():
        check_shards_complete(tokens.paths)
        check_token_ids(tokens, vocab_size)
    if tokenizer_spec == "auto" and not texts:
        raise ConfigError("data.tokenizer 'auto' trains on text sources and there are none; expected the "
                          "tokenizer the token files were made with (a tokenizer.json or .model path).")

    def check(tokenizer: Tokenizer) -> Tokenizer:
        if tokenizer.vocab_size > vocab_size:
            raise ConfigError(f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} tokens but the model's "
                              f"vocab_size is {vocab_size}; expected a model vocabulary at least as large.")
        return tokenizer

    # A named tokenizer is loaded (cheaply) by every process, so that all of them refuse a bad one alike.
    named = None if tokenizer_spec == "auto" else check(load_tokenizer(tokenizer_spec))

    def tokenize(may_tokenize: bool) -> tuple[Tokenizer, dict[int, Path], Path]:
        tokenizer = named
        if tokenizer is None:
            if may_tokenize:  # elsewhere it is process 0's, read from the cache
                log.info("tokenizer: a %d-token sentencepiece BPE on the training documents (trained once, then "
                         "cached)", vocab_size)
            tokenizer = check(load_tokenizer(train_sentencepiece(
                lambda: (d.text for source in texts.values() for d in documents(source, max_documents)
                         if not is_validation(d, val_fraction)), vocab_size, "auto", corpus_key="|".join(keys.values()),
                may_train=may_tokenize)))
        return (tokenizer, *_cached_token_files(texts, keys, tokenizer, val_fraction, max_documents, may_tokenize))

    # The job names what its cache holds: a done file of another tokenizer or corpus never counts.
    tokenizer_id = "auto" if named is None else hashlib.sha256(Path(named.source).read_bytes()).hexdigest()
    job = _digest(tokenizer_id, str(vocab_size), *keys.values())
    tokenizer, train_files, val_file = tokenize_once(cache_dir() / "tokens", job, process_index,
                                                     process_count if texts else 1, tokenize, wait_s)

    train_sets, weights, val_paths = [], [], [val_file] if texts else []
    for i, source in enumerate(sources):
        if source.get("split") == "validation":
            val_paths += given[i].paths
            continue
        tokens = given[i] if i in given else TokenArrays([train_files[i]])
        packed = PackedSequences(tokens, seq_len, tokenizer.eos_id)
        if len(tokens) == 0:
            raise ConfigError(f"data source '{source.get('path')}' has no training documents.")
        if len(packed) == 0:
            raise ConfigError(f"data source '{source.get('path')}' holds fewer than seq_len {seq_len} tokens.")
        train_sets.append(packed)
        weights.append(float(source.get("weight", 1.0)))
    if not train_sets:
        raise ConfigError("data.sources holds validation token files only; expected at least one training source.")
    val = PackedSequences(TokenArrays(val_paths), seq_len, tokenizer.eos_id)
    return Splits(train_sets, weights, val, tokenizer)


def documents(source: dict, max_documents: int = 0, files: list[str] | None = None) -> Iterator[Document]:
    """A text source's documents (of only `files`, if given), the first `max_documents` of them if that is set."""
    docs = read_source(source, files)
    return itertools.islice(docs, max_documents) if max_documents else docs


def _cached_token_files(texts: dict[int, dict], keys: dict[int, str], tokenizer: Tokenizer, val_fraction: float,
                        max_documents: int, may_tokenize: bool = True) -> tuple[dict[int, Path], Path]:
    """The cached token files of each text source's training documents and of all their validation documents,
    written first if missing and `may_tokenize`; else missing ones are refused."""
    tokenizer_key = f"{hashlib.sha256(Path(tokenizer.source).read_bytes()).hexdigest()}|{tokenizer.vocab_size}"
    folder, suffix = cache_dir() / "tokens", token_suffix(tokenizer.vocab_size)
    train_files = {i: folder / f"{_digest(tokenizer_key, 'train', key)}{suffix}" for i, key in keys.items()}
    val_file = folder / f"{_digest(tokenizer_key, 'validation', *keys.values())}{suffix}"
    missing = next((f for f in [*train_files.values(), val_file] if not f.is_file()), None)
    if texts and missing is not None and not may_tokenize:
        raise ConfigError(f"{missing} is not in the token cache although process 0 has finished writing it, so "
                          f"{folder} is not shared between the hosts; expected $PHI2_JAX_CACHE on a folder every "
                          f"host shares, or token files made beforehand by python -m phi2_jax.pretokenize.")
    if texts:
        try:
            tokenize_sources(texts, tokenizer, val_fraction, train_files, val_file, max_documents)
        except OSError as error:  # said here, not by the token files: pretokenize names its own output folder
            if not is_disk_full(error):
                raise
            raise UserInputError(f"writing the tokenized documents to {folder} failed: the disk is full (or a quota or "
                                 f"file-size limit was reached); no partial file was kept. Free space there and run "
                                 f"the same command again.") from None
    return train_files, val_file


def tokenize_sources(texts: dict[int, dict], tokenizer: Tokenizer, val_fraction: float, train_files: dict[int, Path],
                     val_file: Path, max_documents: int = 0, files: dict[int, list[str]] | None = None) -> None:
    """Writes whichever of the token files do not exist yet: each text source's training documents to
    train_files[i], all sources' validation documents (split by name) to val_file. `files[i]`: read only
    these of source i's files (all of them by default).

    One streaming pass over each source that still needs one; each file is
    published whole when its pass ends (see `TokenFile`).
    """
    if val_file.is_file() and all(f.is_file() for f in train_files.values()):
        return
    with _token_file_if(not val_file.is_file(), val_file, tokenizer, "validation documents") as val_out:
        for i, source in texts.items():
            if train_files[i].is_file() and val_out is None:
                continue
            with _token_file_if(not train_files[i].is_file(), train_files[i], tokenizer,
                                f"training documents of '{source.get('path')}'") as train_out:
                for doc in documents(source, max_documents, None if files is None else files[i]):
                    out = val_out if is_validation(doc, val_fraction) else train_out
                    if out is not None:
                        out.add(doc)


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

        if not flags.FLAGS.is_parsed():
            raise ConfigError("data.workers > 0 starts Grain worker processes, which read absl flags that this "
                              "process has not parsed; call phi2_jax.data.pipeline.allow_grain_workers() once "
                              "first (the train command does), or use data.workers=0.")
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return it


def allow_grain_workers() -> None:
    """Marks absl's flags parsed, which Grain's worker processes require: a process-wide change, so the commands
    (and a notebook that wants workers) make it, never the pipeline itself."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def validation_batches(splits: Splits, batch_size: int, num_batches: int, process_index: int = 0,
                       process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """The first `num_batches` validation batches, the same every time (this process's share).

    Fewer when the validation split is too small, with a warning: a run that reports no validation loss
    should say why.
    """
    val = splits.validation
    needed = batch_size * process_count
    count = min(num_batches, len(val) // needed) if needed else 0
    if count < num_batches and process_index == 0:
        tokens, shape = val.amount, f"{needed} {val.unit}"
        if count == 0:
            log.warning("the validation split holds %s, fewer than one batch of %s, so no validation loss will "
                        "be reported; %s.", tokens, shape, splits.more_validation)
        else:
            log.warning("the validation split holds %s, %d of the %d batches of %s asked for "
                        "(train.eval_batches); the validation loss is their mean.", tokens, count, num_batches, shape)
    batches = []
    for b in range(count):
        rows = [val[b * needed + process_index * batch_size + r] for r in range(batch_size)]
        batches.append({k: np.stack([row[k] for row in rows]) for k in rows[0]})
    return batches

