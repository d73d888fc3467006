"""`python -m phi2_jax.pretokenize`: tokenize a corpus once, for training from token files anywhere.

    python -m phi2_jax.pretokenize OUT_DIR --tokenizer path/to/phi-2 --source 'data/*.jsonl' [--source ...]
        [--field text] [--val-fraction 0.005] [--shard I --num-shards N] [--overwrite]

Each --source (a glob, or `stdlib`) is read lazily and streamed through the
tokenizer, EOS after every document, exactly as the trainer's own cache does:
OUT_DIR/train-NNN.uint16 holds source NNN's training documents and
OUT_DIR/validation.uint16 every source's held-out ones (split by document name),
with OUT_DIR/tokens.json saying what made them (.int32 instead of .uint16 for a
vocabulary past 65,536). Train from them with

    data.sources='[{path: "OUT_DIR/train-*.uint16", format: tokens},
                   {path: "OUT_DIR/validation.uint16", format: tokens, split: validation}]'
    data.tokenizer=path/to/phi-2

so that no training process (on any host) tokenizes anything.

Sharded (`--shard I --num-shards N`, one process per shard: a SLURM array or a
Kubernetes Indexed Job), the sources' files, in order, are cut into N contiguous
runs of about equal bytes; shard I tokenizes run I into OUT_DIR/shard-IIIII/
(the same files as above, for its share). Globbing `OUT_DIR/shard-*/train-*` and
`OUT_DIR/shard-*/validation.*` gives, in path order, the very token streams one
unsharded run writes: every shard writes the held-out documents of its own files.
A file is never split, so N past the number of files leaves shards empty.

OUT_DIR (or each shard folder) appears whole or not at all, and an existing one
is only replaced with --overwrite. An OUT_DIR that a source's files lie in, or
that a source's glob could reach, is refused before anything is read or deleted.
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

from phi2_jax.data.pipeline import tokenize_sources
from phi2_jax.data.sources import source_files, stdlib_root
from phi2_jax.data.token_files import RAW_DTYPES, TokenArrays, token_suffix
from phi2_jax.data.tokenizer import load_tokenizer
from phi2_jax.errors import ConfigError, exit_on_user_error
from phi2_jax.util.atomic_dir import write_atomically
from phi2_jax.util.progress import log_info_to_stderr

log = logging.getLogger(__name__)


def pretokenize(out_dir: Path, tokenizer_path: str, sources: list[dict], val_fraction: float,
                overwrite: bool = False, shard: int = 0, num_shards: int = 1) -> dict:
    """Writes the token files and their description into `out_dir` (into `out_dir/shard-IIIII` when
    `num_shards` > 1); returns the description (tokens.json)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"--val-fraction {val_fraction} is outside [0, 1); expected a small fraction such as 0.005.")
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ConfigError(f"--shard {shard} of --num-shards {num_shards} is out of range; expected "
                          f"0 <= shard < num-shards (a SLURM array's SLURM_ARRAY_TASK_ID, a Job's completion index).")
    # Every pattern and key is checked, and the files listed once, before anything is written: what is read is
    # exactly this list, never a glob evaluated again after output began to appear.
    files = [source_files(source) for source in sources]
    _check_apart(Path(out_dir), sources, files)
    dest = Path(out_dir) if num_shards == 1 else Path(out_dir) / f"shard-{shard:05d}"
    if num_shards > 1:
        _check_other_shards(Path(out_dir), num_shards)
    tokenizer = load_tokenizer(tokenizer_path)
    suffix = token_suffix(tokenizer.vocab_size)
    share = shard_files(files, shard, num_shards)
    texts = {i: source for i, source in enumerate(sources) if share[i]}
    summary: dict = {}

    def write(staging: Path) -> None:
        start = time.perf_counter()
        train_files, val_file = {i: staging / f"train-{i:03d}{suffix}" for i in texts}, staging / f"validation{suffix}"
        tokenize_sources(texts, tokenizer, val_fraction, train_files, val_file, files=share)
        entries = {path.name: {"tokens": len(TokenArrays([path])), "source": texts[i],
                                "source_files": len(share[i])}
                   for i, path in train_files.items()}
        entries[val_file.name] = {"tokens": len(TokenArrays([val_file]))}
        summary.update({
            "tokenizer": str(Path(tokenizer.source).resolve()),
            "tokenizer_sha256": hashlib.sha256(Path(tokenizer.source).read_bytes()).hexdigest(),
            "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "dtype": suffix[1:],
            "val_fraction": val_fraction, "shard": shard, "num_shards": num_shards,
            "seconds": round(time.perf_counter() - start, 1), "files": entries,
        })
        (staging / "tokens.json").write_text(json.dumps(summary, indent=2) + "\n")
        if val_fraction > 0 and entries[val_file.name]["tokens"] == 0:
            # Training from these files would report no validation loss, without saying why.
            log.warning("%s holds no tokens: none of the documents%s fell in the held-out --val-fraction %g; training "
                        "from these files reports no validation loss unless another validation file is given.",
                        dest / val_file.name, f" of shard {shard}" if num_shards > 1 else "", val_fraction)

    write_atomically(dest, overwrite, write)
    return summary


def shard_files(files: list[list[str]], shard: int, num_shards: int) -> list[list[str]]:
    """Shard `shard`'s share of each source's files: the sources' files, in order, cut into `num_shards`
    contiguous runs of about equal bytes, so that the shards' outputs in shard order are one run's output."""
    flat = [(i, f) for i, source_files_ in enumerate(files) for f in source_files_]
    sizes = [os.path.getsize(f) for _, f in flat]
    total, before = sum(sizes), 0
    share: list[list[str]] = [[] for _ in files]
    for j, ((i, file), size) in enumerate(zip(flat, sizes)):
        # A file belongs to the shard its middle byte falls in (by count when every file is empty).
        middle = (before + size / 2) / total if total else (j + 0.5) / len(flat)
        if min(num_shards - 1, int(middle * num_shards)) == shard:
            share[i].append(file)
        before += size
    return share


# Names pretokenize writes (any suffix it may use), at OUT_DIR/NAME or OUT_DIR/shard-IIIII/NAME.
_WRITTEN = [f"{stem}{suffix}" for stem in ("train-000", "validation") for suffix in RAW_DTYPES] + ["tokens.json"]


def _check_apart(out_dir: Path, sources: list[dict], files: list[list[str]]) -> None:
    """Refuses an OUT_DIR that holds a source's files (--overwrite would delete them) or whose contents a source's
    glob could match (pretokenize, or a later run, would read its own output as text)."""
    out = out_dir.resolve()
    for source, its_files in zip(sources, files):
        pattern = source.get("path", "")
        inside = next((f for f in its_files if Path(f).resolve().is_relative_to(out)), None)
        if inside is not None:
            raise ConfigError(f"OUT_DIR {out_dir} holds {inside}, a file of source '{pattern}'; expected an OUT_DIR "
                              f"apart from the sources (writing there would read its own output, and --overwrite "
                              f"would delete the corpus).")
        if _glob_reaches(out, pattern):
            raise ConfigError(f"source '{pattern}' could match the token files written into OUT_DIR {out_dir}; "
                              f"expected an OUT_DIR outside what the sources' globs match.")


def _glob_reaches(out: Path, pattern: str) -> bool:
    """Whether glob `pattern` could match a file pretokenize writes under `out` (conservatively: yes if unsure)."""
    if pattern == "stdlib":
        root, rest = stdlib_root().resolve(), ["**", "*.py"]
    else:
        parts = Path(pattern).parts
        static = next((k for k, part in enumerate(parts) if glob.has_magic(part)), len(parts))
        root, rest = Path(*parts[:static]).resolve() if static else Path.cwd(), list(parts[static:])
    if not out.is_relative_to(root) or not rest:
        return False
    below = list(out.relative_to(root).parts)
    if "**" in rest:  # any depth: only the name can rule a match out
        return rest[-1] == "**" or any(fnmatch.fnmatchcase(name, rest[-1]) for name in _WRITTEN)
    candidates = [below + [name] for name in _WRITTEN] + [below + ["shard-00000", name] for name in _WRITTEN]
    return any(len(c) == len(rest) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(c, rest)) for c in candidates)


def _check_other_shards(out_dir: Path, num_shards: int) -> None:
    """Refuses shard folders of a run with another --num-shards: a glob over both would mix two cuts of the corpus."""
    for summary in sorted(out_dir.glob("shard-*/tokens.json")):
        other = json.loads(summary.read_text()).get("num_shards")
        if other != num_shards:
            raise ConfigError(f"{summary.parent} was written with --num-shards {other}, not {num_shards}; expected "
                              f"one OUT_DIR per sharding (a glob over both would read parts of the corpus twice).")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m phi2_jax.pretokenize", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="a new (or empty) folder for the token files")
    parser.add_argument("--tokenizer", required=True,
                        help="tokenizer.json, a folder holding one, or a sentencepiece .model")
    parser.add_argument("--source", action="append", required=True,
                        help="a glob of text / .jsonl / .parquet files, or 'stdlib'; repeat for more sources")
    parser.add_argument("--format", default="auto", choices=("auto", "text", "jsonl", "parquet"),
                        help="the sources' format (auto: by file suffix)")
    parser.add_argument("--field", default="text", help="the text field of JSONL records / Parquet rows")
    parser.add_argument("--val-fraction", type=float, default=0.005, help="documents held out for validation")
    parser.add_argument("--shard", type=int, default=0, help="this process's shard, 0 <= I < --num-shards")
    parser.add_argument("--num-shards", type=int, default=1,
                        help="split the files over this many processes, each writing OUT_DIR/shard-IIIII")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR (or shard folder)")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    log_info_to_stderr(command_line=argv is None)
    sources = [{"path": path, "format": args.format, "field": args.field} for path in args.source]
    summary = pretokenize(args.out_dir, args.tokenizer, sources, args.val_fraction, args.overwrite,
                          args.shard, args.num_shards)
    dest = args.out_dir if args.num_shards == 1 else args.out_dir / f"shard-{args.shard:05d}"
    counts = ", ".join(f"{name} {entry['tokens']:,}" for name, entry in summary["files"].items())
    print(f"wrote {dest} in {summary['seconds']}s: {counts} tokens")


if __name__ == "__main__":
    main()
