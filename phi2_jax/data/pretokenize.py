"""`python -m phi2_jax.pretokenize`: tokenize a corpus once, for training from token files anywhere.

    python -m phi2_jax.pretokenize OUT_DIR --tokenizer path/to/phi-2 --source 'data/*.jsonl' [--source ...]
        [--field text] [--val-fraction 0.005] [--overwrite]

Each --source (a glob, or `stdlib`) is read lazily and streamed through the
tokenizer, EOS after every document, exactly as the trainer's own cache does:
OUT_DIR/train-NNN.int32 holds source NNN's training documents and
OUT_DIR/validation.int32 every source's held-out ones (split by document name),
with OUT_DIR/tokens.json saying what made them. Train from them with

    data.sources='[{path: "OUT_DIR/train-*.int32", format: tokens},
                   {path: "OUT_DIR/validation.int32", format: tokens, split: validation}]'
    data.tokenizer=path/to/phi-2

so that no training process (on any host) tokenizes anything. OUT_DIR appears
whole or not at all, and an existing one is only replaced with --overwrite.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from phi2_jax.util.atomic_dir import write_atomically
from phi2_jax.data.pipeline import tokenize_sources
from phi2_jax.errors import ConfigError, exit_on_user_error
from phi2_jax.util.progress import log_info_to_stderr
from phi2_jax.data.sources import source_files
from phi2_jax.data.token_files import TokenArrays
from phi2_jax.data.tokenizer import load_tokenizer


def pretokenize(out_dir: Path, tokenizer_path: str, sources: list[dict], val_fraction: float,
                overwrite: bool = False) -> dict:
    """Writes the token files and their description into `out_dir`; returns the description (tokens.json)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"--val-fraction {val_fraction} is outside [0, 1); expected a small fraction such as 0.005.")
    for source in sources:
        source_files(source)  # every pattern and key is checked before anything is written
    tokenizer = load_tokenizer(tokenizer_path)
    texts = dict(enumerate(sources))
    summary: dict = {}

    def write(staging: Path) -> None:
        start = time.perf_counter()
        train_files, val_file = {i: staging / f"train-{i:03d}.int32" for i in texts}, staging / "validation.int32"
        tokenize_sources(texts, tokenizer, val_fraction, train_files, val_file)
        files = {path.name: {"tokens": len(TokenArrays([path])), "source": texts[i]} for i, path in train_files.items()}
        files[val_file.name] = {"tokens": len(TokenArrays([val_file]))}
        summary.update({
            "tokenizer": str(Path(tokenizer.source).resolve()),
            "tokenizer_sha256": hashlib.sha256(Path(tokenizer.source).read_bytes()).hexdigest(),
            "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "dtype": "int32",
            "val_fraction": val_fraction, "seconds": round(time.perf_counter() - start, 1), "files": files,
        })
        (staging / "tokens.json").write_text(json.dumps(summary, indent=2) + "\n")

    write_atomically(out_dir, overwrite, write)
    return summary


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
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    log_info_to_stderr(command_line=argv is None)
    sources = [{"path": path, "format": args.format, "field": args.field} for path in args.source]
    summary = pretokenize(args.out_dir, args.tokenizer, sources, args.val_fraction, args.overwrite)
    counts = ", ".join(f"{name} {entry['tokens']:,}" for name, entry in summary["files"].items())
    print(f"wrote {args.out_dir} in {summary['seconds']}s: {counts} tokens")


if __name__ == "__main__":
    main()
