"""Training text sources: the standard library, text, JSONL and Parquet globs, read lazily as documents.

A source is {path, format: auto|text|jsonl|parquet|tokens, field: 'text', weight}
(tokens: already tokenized files, read by `token_files.py`, not here). One file,
JSONL line or Parquet record batch is in memory at a time, so a corpus larger
than RAM streams through; a source's fingerprint names its contents cheaply.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from phi2_jax.errors import ConfigError
from phi2_jax.util.jsonl import jsonl_objects

_STDLIB_SKIP = {"site-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3", "turtledemo"}


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def stdlib_root() -> Path:
    """The running interpreter's standard library folder (the `stdlib` source)."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """Every .py file of the running interpreter's standard library (tests excluded), in a fixed order."""
    root = stdlib_root()
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


_FORMATS = ("auto", "text", "jsonl", "parquet", "tokens")


def source_files(source: dict) -> list[str]:
    """The files a source reads, as glob spells them (documents are named after them), after checking its keys."""
    unknown = set(source) - {"path", "format", "weight", "field", "split"}
    if unknown:
        raise ConfigError(f"data source {source} has unknown key '{sorted(unknown)[0]}'; "
                          f"expected path, format, weight, field, split.")
    fmt = source.get("format", "auto")
    if fmt not in _FORMATS:
        raise ConfigError(f"data source format '{fmt}' is unknown; expected {', '.join(_FORMATS)}.")
    weight = source.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise ConfigError(f"data source '{source.get('path')}' has weight {weight!r}; expected a positive number "
                          f"(a sampling ratio such as 0.5).")
    if "split" in source and (fmt != "tokens" or source["split"] not in ("train", "validation")):
        raise ConfigError(f"data source {source}: 'split' takes train or validation, for token files (format: tokens) "
                          f"only; text sources are split by document (data.val_fraction).")
    if source.get("path", "") == "stdlib":
        return [str(p) for p in stdlib_files()]
    return _files(source.get("path", ""))


def read_source(source: dict, files: list[str] | None = None) -> Iterator[Document]:
    """Documents of one source, {path, format: auto|text|jsonl|parquet, field: 'text'}, read lazily.

    One file, JSONL line or Parquet record batch is in memory at a time, so a
    corpus larger than RAM streams through. The source's keys and files are
    checked when this is called; a bad record raises when it is reached.
    `files`: only these of the source's files (a pretokenize shard's share), as
    `source_files` spells them.
    """
    every = source_files(source)
    files = every if files is None else files
    fmt, field = source.get("format", "auto"), source.get("field", "text")
    assert fmt != "tokens", "token files hold no documents; read them with token_files.TokenArrays"
    if source.get("path") == "stdlib":
        return _stdlib_documents(files)
    return _file_documents(files, fmt, field)


def _stdlib_documents(files: list[str]) -> Iterator[Document]:
    root = stdlib_root()
    for path in map(Path, files):
        try:
            yield Document(str(path.relative_to(root)), path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue


def _file_documents(files: list[str], fmt: str, field: str) -> Iterator[Document]:
    for file in files:
        kind = fmt if fmt != "auto" else {".jsonl": "jsonl", ".parquet": "parquet"}.get(Path(file).suffix, "text")
        if kind == "text":
            text = Path(file).read_text(encoding="utf-8", errors="replace")
            if "\x00" in text:  # text never holds NUL; a token file or an archive would train on garbage
                raise ConfigError(f"{file} holds NUL bytes, so it is binary, not text; expected text, .jsonl or "
                                  f".parquet files (token files are read with format: tokens).")
            yield Document(file, text)
        elif kind == "jsonl":
            for n, record in jsonl_objects(Path(file), ConfigError):
                if not isinstance(record.get(field), str):
                    raise ConfigError(f"{file} line {n} has no string field '{field}'.")
                yield Document(f"{file}:{n}", record[field])
        else:
            yield from _parquet_documents(file, field)


def open_parquet(file: str):
    """A `pyarrow.parquet.ParquetFile`, or one sentence: pyarrow missing, or the file not Parquet."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"{file} is Parquet; install pyarrow (pip install 'phi2_jax[parquet]').") from None
    try:
        return pq.ParquetFile(file)
    except (pa.ArrowException, OSError) as error:
        raise ConfigError(f"{file} could not be read as Parquet ({error}).") from None


def _parquet_documents(file: str, field: str) -> Iterator[Document]:
    """One record batch at a time; rows with an empty or null text are skipped but keep their row numbers."""
    import pyarrow as pa

    parquet = open_parquet(file)
    schema = parquet.schema_arrow
    if field not in schema.names:
        raise ConfigError(f"{file} has no column '{field}'; its columns are {', '.join(schema.names)} "
                          f"(set the source's field).")
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
    for file in source_files(source):
        stat = os.stat(file)
        digest.update(f"{os.path.abspath(file)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def is_validation(doc: Document, fraction: float) -> bool:
    """Held out by a stable hash of the document's name, so the split never depends on order or process."""
    h = int.from_bytes(hashlib.sha256(doc.name.encode()).digest()[:8], "little")
    return (h % 10_000) < fraction * 10_000
