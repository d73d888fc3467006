"""`python -m phi2_jax.convert` / `phi2-convert`: Hugging Face <-> Orbax, one tensor (or layer) at a time.

    from-hf HF_DIR CKPT_DIR [--dtype float32|bfloat16]
    to-hf   CKPT_OR_RUN_DIR HF_DIR [--dtype float16|bfloat16|float32] [--max-shard-size 2GB] [--tokenizer DIR]
    inspect PATH

Both directions stream: from-hf maps each Hugging Face tensor in turn and
writes it into the Orbax checkpoint in chunks (`orbax_stream.py`); to-hf reads
one parameter at a time (the next ones on a background thread while the
current one is written) and writes safetensors shards in row blocks. Peak
memory is a few tensors, not the model.

Output is written to a hidden sibling of the destination and renamed into
place only when complete, so a failed run leaves nothing behind and never
damages an existing folder (which is only replaced with --overwrite).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np

from phi2_jax.checkpoint import run_checkpoints as checkpoint
from phi2_jax.util.atomic_dir import refuse_overlap, write_atomically
from phi2_jax.config import PhiConfig
from phi2_jax.errors import UserInputError, WeightsError, exit_on_user_error
from phi2_jax.hf.files import HFWeights
from phi2_jax.util.host_arrays import contiguous, numpy_dtype
from phi2_jax.util.host_memory import reexec_with_huge_pages
from phi2_jax.hf.layout import detect_layout, flatten, hf_names_and_shapes, hf_tensor, tensor_plan
from phi2_jax.hf import sentencepiece_export
from phi2_jax.hf.loading import check_hf_tensors, newest_restorable, our_shapes, report_nonfinite
from phi2_jax.model.lora import merged_kernel
from phi2_jax.checkpoint.orbax_stream import ParamReader, ParamWriter
from phi2_jax.util.progress import Progress
from phi2_jax.hf.safetensors_io import write_streaming

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json",
                   "special_tokens_map.json", "tokenizer.model")


# ----------------------------------------------------------------------------- from-hf
def leaf_keys(path: str, layer: int | None) -> tuple[str, ...]:
    """'layers/mlp/fc1/kernel', 3 -> ('layers', '3', 'mlp', 'fc1', 'kernel'): the checkpoint's per-layer tree."""
    parts = path.split("/")
    return (parts[0], str(layer), *parts[1:]) if layer is not None else tuple(parts)


def storage_dtype(source: np.dtype, param: np.dtype) -> np.dtype:
    """The dtype a converted tensor is stored in: the narrowest that holds the parameter values exactly.

    A float16 or bfloat16 tensor converted for float32 parameters is stored as it
    came: widening to float32 is exact, and Orbax widens on restore (to the
    abstract target's dtype), so every loader sees the same float32 values while
    the checkpoint is half the bytes (the converter's time is its disk writes).
    """
    return source if param == np.float32 and source.itemsize < param.itemsize else param


def from_hf(hf_dir: Path, ckpt_dir: Path, dtype: str = "float32", overwrite: bool = False,
            allow_nonfinite: bool = False) -> tuple[PhiConfig, list[str]]:
    """Converts a Hugging Face Phi folder to an Orbax checkpoint (params + meta), one tensor at a time.

    `dtype` is the parameter dtype the checkpoint restores to; see `storage_dtype` for what is on disk.
    A tensor holding NaN or infinity stops the conversion unless `allow_nonfinite` (then one line reports them).
    Returns the model config and the dtypes the tensors were stored in.
    """
    if dtype not in ("float32", "bfloat16"):
        raise UserInputError(f"--dtype {dtype} is not a parameter dtype; expected float32 or bfloat16.")
    if not hf_dir.is_dir():
        raise WeightsError(f"{hf_dir} does not exist or is not a folder; expected a Hugging Face model folder.")
    config = PhiConfig.from_hf_file(hf_dir, param_dtype=dtype)
    weights = HFWeights(hf_dir, allow_nonfinite=allow_nonfinite)
    layout = detect_layout(weights.names, str(hf_dir))
    check_hf_tensors(weights, config, layout)
    target = numpy_dtype(dtype)
    plan = tensor_plan(config, layout)
    stored: set[str] = set()

    def write(staging: Path) -> None:
        progress = Progress(f"from-hf {hf_dir.name} ({layout}, {weights.dtype(plan[0][0])})", len(plan),
                            weights.total_bytes())
        with ParamWriter(staging / "params") as writer:  # a failure waits for the writes in flight
            for name, rule, layer in plan:
                source = weights.read(name)
                for path, part in zip(rule.ours, rule.transform.to_ours(source)):
                    stored_as = storage_dtype(part.dtype, target)
                    stored.add(str(stored_as))
                    writer.write(leaf_keys(path, layer), part, stored_as)
                progress.advance(1, source.nbytes)
                del source
            writer.close()
        meta = {"model_config": config.to_dict(), "source": str(hf_dir.absolute()), "source_layout": layout,
                "stored_dtypes": sorted(stored), "format": "phi2_jax model checkpoint v1"}
        if tokenizer_kind(hf_dir) == "folder":  # to-hf and generate find the tokenizer the model came with
            meta["tokenizer"] = str(hf_dir.absolute())
        checkpoint.save_meta(staging, meta)
        progress.close()

    write_atomically(ckpt_dir, overwrite, write, sources=[hf_dir])
    if report_nonfinite(weights):
        print(f"warning: {report_nonfinite(weights)}", file=sys.stderr)
    return config, sorted(stored)


# ----------------------------------------------------------------------------- to-hf
def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000 (decimal units, as transformers' max_shard_size); a size must be positive."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    upper = text.strip().upper()
    size = None
    for unit, factor in units.items():
        if upper.endswith(unit):
            try:
                size = int(float(upper[: -len(unit)]) * factor)
            except (ValueError, OverflowError):  # 'xGB', 'nanGB', 'infGB'
                pass
            break
    if size is None and upper.lstrip("-").isdigit():
        size = int(upper)
    if size is None:
        raise UserInputError(f"--max-shard-size '{text}' is not a size; expected e.g. 2GB, 500MB or 1000000.")
    if size <= 0:
        raise UserInputError(f"--max-shard-size '{text}' is {size} bytes; expected a positive size, e.g. 2GB.")
    return size


def tokenizer_kind(path: Path) -> str | None:
    """'folder' (Hugging Face tokenizer files), 'json' (a tokenizer.json), 'sentencepiece' (a .model) or None."""
    if path.is_dir():
        return "folder" if any((path / f).is_file() for f in TOKENIZER_FILES) else None
    if path.is_file() and path.suffix in (".json", ".model"):
        return "json" if path.suffix == ".json" else "sentencepiece"
    return None


def _check_export_args(dtype: str, tokenizer: Path | None, max_shard_size: str = "2GB") -> None:
    if dtype not in ("float16", "bfloat16", "float32"):
        raise UserInputError(f"--dtype {dtype} is not supported; expected float16, bfloat16 or float32.")
    parse_size(max_shard_size)
    if tokenizer is not None and tokenizer_kind(tokenizer) is None:
        raise UserInputError(f"--tokenizer {tokenizer} is neither a folder holding tokenizer files (e.g. "
                             f"tokenizer.json), a tokenizer.json file, nor a sentencepiece .model file.")


def write_tokenizer(staging: Path, tokenizer: Path, config: PhiConfig) -> str:
    """Copies (or, for sentencepiece, converts) `tokenizer` into `staging`; returns a sentence saying what it did.

    transformers reads a tokenizer from tokenizer.json, so a sentencepiece model
    is converted to one (`sentencepiece_export`) and kept beside it as
    tokenizer.model; if it cannot be converted the sentence says why and no
    tokenizer is written.
    """
    kind = tokenizer_kind(tokenizer)
    if kind == "folder":
        copied = [f for f in TOKENIZER_FILES if (tokenizer / f).is_file()]
        for f in copied:
            shutil.copy2(tokenizer / f, staging / f)
        return f"tokenizer: copied {', '.join(copied)} from {tokenizer}."
    if kind == "json":
        shutil.copy2(tokenizer, staging / "tokenizer.json")
        return f"tokenizer: copied {tokenizer} as tokenizer.json."
    if kind == "sentencepiece":
        try:
            written = sentencepiece_export.export(tokenizer, staging, config.max_position_embeddings)
        except sentencepiece_export.NotConvertible as why:
            return (f"tokenizer not exported: {why}, and transformers needs a tokenizer.json; pass --tokenizer "
                    f"with a folder that holds one.")
        shutil.copy2(tokenizer, staging / "tokenizer.model")
        return f"tokenizer: converted the sentencepiece model {tokenizer} to {' and '.join(written)}."
    return (f"tokenizer not exported: {tokenizer} no longer holds a tokenizer; pass --tokenizer with a folder "
            f"holding tokenizer.json or a sentencepiece .model file.")


def _cast(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A C-contiguous copy in `dtype`, rounded to nearest even from float32, exactly as torch's .to(dtype)."""
    if array.dtype in (dtype, np.float32):
        return contiguous(array, dtype)
    return contiguous(array, np.float32).astype(dtype)  # e.g. bfloat16 -> float16: widen exactly, round once


def write_hf_folder(staging: Path, config: PhiConfig, ours: Callable[[str, int | None], np.ndarray], dtype: str,
                    max_shard_size: str, tokenizer: Path | None, label: str) -> tuple[list[str], str | None]:
    """Writes a Hugging Face folder into `staging`; `ours(path, layer)` serves our (merged) arrays one at a time.

    Returns the safetensors file names and the sentence `write_tokenizer` said (None without a tokenizer).
    """
    out_dtype = numpy_dtype(dtype)
    plan = tensor_plan(config, "transformers")
    shapes = hf_names_and_shapes(config, "transformers", our_shapes(config))
    limit = parse_size(max_shard_size)
    shards: list[list] = [[]]
    size = 0
    for entry in plan:
        nbytes = int(np.prod(shapes[entry[0]])) * out_dtype.itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    total = sum(int(np.prod(s)) for s in shapes.values()) * out_dtype.itemsize
    progress = Progress(f"{label} ({dtype}, {len(shards)} shard{'s' * (len(shards) > 1)})", len(plan), total)

    def row_blocks(rule, layer):
        array = hf_tensor(rule, lambda path: ours(path, layer))
        rows = max(1, (64 << 20) // max(array[0].nbytes, 1)) if array.ndim else 1
        for start in range(0, max(array.shape[0], 1) if array.ndim else 1, rows):
            block = _cast(array[start:start + rows] if array.ndim else array, out_dtype)
            progress.advance(0, block.nbytes)
            yield block
        progress.advance(1, 0)

    weight_map = {}
    for shard, file in zip(shards, names):
        specs = [(name, shapes[name], out_dtype) for name, _, _ in shard]
        write_streaming(staging / file, specs, (row_blocks(rule, layer) for _, rule, layer in shard), {"format": "pt"})
        weight_map.update({name: file for name, _, _ in shard})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (staging / "config.json").write_text(json.dumps(config.to_hf_dict(torch_dtype=dtype), indent=2))
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    (staging / "generation_config.json").write_text(json.dumps(generation, indent=2))
    note = write_tokenizer(staging, tokenizer, config) if tokenizer is not None else None
    progress.close()
    return names, note


def _with_merged_adapters(read: Callable[[str, int | None], np.ndarray], config: PhiConfig):
    """Wraps `read(path, layer)` so that adapted kernels come back with their LoRA adapter merged in."""
    if not config.lora_rank:
        return read

    def merged(path: str, layer: int | None) -> np.ndarray:
        value = read(path, layer)
        module = path.split("/")[-2] if "/" in path else ""
        if path.endswith("/kernel") and module in config.lora_targets and path.startswith("layers/"):
            prefix = path[: -len("kernel")]
            value = merged_kernel(value, read(prefix + "lora_a", layer), read(prefix + "lora_b", layer), config)
        return value

    return merged


class ReadAhead:
    """`read(path, layer)` served in a known order, reading the next `depth` parameters on a background thread.

    Reading parameters out of the checkpoint and writing safetensors each take
    about half of an export, so reading ahead while writing shortens it (measured:
    docs/benchmarks.md, "Converter: bytes, no transposes, mapped reads, read-ahead").
    A request out of order (a LoRA adapter's factors) is read on the spot.
    """

    def __init__(self, read: Callable[[str, int | None], np.ndarray], order: list[tuple[str, int | None]],
                 depth: int = 2):
        self.read, self.order, self.depth = read, order, depth
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="phi2_jax_read_ahead")
        self.pending: dict[tuple[str, int | None], Future] = {}
        self.next = 0  # index in `order` of the next parameter to submit
        self._schedule()

    def __call__(self, path: str, layer: int | None) -> np.ndarray:
        future = self.pending.pop((path, layer), None)
        self._schedule()
        return future.result() if future is not None else self.read(path, layer)

    def _schedule(self) -> None:
        while len(self.pending) < self.depth and self.next < len(self.order):
            key = self.order[self.next]
            self.pending[key] = self.pool.submit(self.read, *key)
            self.next += 1

    def close(self) -> None:
        """Stops reading ahead (a failed export must not keep reading in the background)."""
        self.pool.shutdown(wait=True, cancel_futures=True)


def to_hf(source: Path, hf_dir: Path, dtype: str = "float16", max_shard_size: str = "2GB",
          tokenizer: Path | None = None, overwrite: bool = False) -> list[str]:
    """Writes a Hugging Face folder from a converted checkpoint or a training run's newest checkpoint.

    The tokenizer is `tokenizer`, else the one the checkpoint records (a run's
    sentencepiece model is converted to tokenizer.json); a line on stderr says
    what was written, or why no tokenizer was. A run whose newest checkpoint is
    damaged exports the previous one, saying so, as the trainer resumes from it.
    """
    _check_export_args(dtype, tokenizer, max_shard_size)
    if not source.exists():
        raise UserInputError(f"{source} does not exist; expected a converted checkpoint or a training run folder.")
    if not checkpoint.step_dirs(source):
        raise UserInputError(f"{source} holds no phi2_jax checkpoint (no params/ and meta/); expected the output of "
                             f"from-hf or a training run folder.")
    refuse_overlap(hf_dir, [source, tokenizer])

    def export(step_dir: Path) -> tuple[list[str], str]:
        meta = checkpoint.read_meta(step_dir)
        config = PhiConfig.from_dict(meta["model_config"])
        recorded = meta.get("tokenizer")
        chosen = tokenizer or (Path(recorded) if recorded else None)
        reader = ParamReader(step_dir / "params")
        order = [(path, layer) for _, rule, layer in tensor_plan(config, "transformers") for path in rule.ours]
        ahead = ReadAhead(lambda path, layer: reader.read(leaf_keys(path, layer)), order)
        ours = _with_merged_adapters(ahead, config)
        result: list = []

        def write(staging: Path) -> None:
            result.extend(write_hf_folder(staging, config, ours, dtype, max_shard_size, chosen, f"to-hf {hf_dir.name}"))
            if meta.get("chat_template"):  # a post-training run's: apply_chat_template renders what it trained on
                (staging / "chat_template.jinja").write_text(meta["chat_template"], encoding="utf-8")

        try:
            write_atomically(hf_dir, overwrite, write, sources=[source, chosen])
        finally:
            ahead.close()
        names, note = result
        return names, note or (f"tokenizer not exported: {step_dir} records no tokenizer; pass --tokenizer with a "
                               f"folder holding tokenizer.json or a sentencepiece .model file.")

    names, note = newest_restorable(source, export)
    print(note, file=sys.stderr)
    return names


def save_pretrained(model, hf_dir: str | Path, *, dtype: str = "float32", max_shard_size: str = "2GB",
                    tokenizer: str | Path | None = None, overwrite: bool = False) -> list[str]:
    """Writes an in-memory model as a Hugging Face folder (LoRA adapters merged), atomically.

    tokenizer: a folder of tokenizer files, a tokenizer.json, or a sentencepiece .model (converted to tokenizer.json).
    """
    from flax import nnx

    tokenizer = Path(tokenizer) if tokenizer else None
    _check_export_args(dtype, tokenizer, max_shard_size)
    config = model.config
    flat = flatten(nnx.to_pure_dict(nnx.state(model)))

    def read(path: str, layer: int | None) -> np.ndarray:
        return np.asarray(jax.device_get(flat[path] if layer is None else flat[path][layer]))

    ours = _with_merged_adapters(read, config)
    result: list = []
    write_atomically(Path(hf_dir), overwrite, lambda staging: result.extend(
        write_hf_folder(staging, config, ours, dtype, max_shard_size, tokenizer, f"save {Path(hf_dir).name}")),
        sources=[tokenizer])
    names, note = result
    if note:
        print(note, file=sys.stderr)
    return names


# ----------------------------------------------------------------------------- inspect
def inspect(path: Path) -> dict:
    """What a folder or checkpoint holds, read from headers and metadata only."""
    if not path.exists():
        raise UserInputError(f"{path} does not exist.")
    if checkpoint.step_dirs(path):
        import orbax.checkpoint as ocp

        def describe(step_dir: Path) -> dict:
            meta = checkpoint.read_meta(step_dir)
            config = PhiConfig.from_dict(meta["model_config"])
            tree = ocp.StandardCheckpointer().metadata(step_dir.absolute() / "params")
            tree = getattr(tree, "item_metadata", tree)
            leaves = jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape"))
            return {"format": "phi2_jax Orbax checkpoint", "path": str(step_dir), "step": meta.get("step", "-"),
                    "stored as": sorted({str(np.dtype(x.dtype)) for x in leaves}),
                    "restores as": config.param_dtype, "tensors": len(leaves),
                    "parameters": sum(int(np.prod(x.shape)) for x in leaves), "config": config.to_hf_dict()}

        return newest_restorable(path, describe)  # a damaged checkpoint: one line, or the previous one described
    weights = HFWeights(path)
    layout = detect_layout(weights.names, str(path))
    config = PhiConfig.from_hf_file(path)
    return {"format": f"Hugging Face ({weights.format}, {len(weights.files)} file{'s' * (len(weights.files) > 1)})",
            "path": str(path), "layout": layout, "dtypes": sorted({weights.dtype(n) for n in weights.names}),
            "tensors": len(weights.names), "parameters": sum(int(np.prod(weights.shape(n))) for n in weights.names),
            "config": config.to_hf_dict()}


# ----------------------------------------------------------------------------- CLI
def parse_args(argv):
    parser = argparse.ArgumentParser(prog="phi2-convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("from-hf", help="Hugging Face folder -> Orbax checkpoint")
    a.add_argument("hf_dir", type=Path)
    a.add_argument("ckpt_dir", type=Path)
    a.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a.add_argument("--overwrite", action="store_true")
    a.add_argument("--allow-nonfinite", action="store_true",
                   help="convert weights holding NaN or infinity (reported) instead of refusing them")
    b = sub.add_parser("to-hf", help="Orbax checkpoint or run folder -> Hugging Face folder")
    b.add_argument("source", type=Path)
    b.add_argument("hf_dir", type=Path)
    b.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    b.add_argument("--max-shard-size", default="2GB")
    b.add_argument("--tokenizer", type=Path)
    b.add_argument("--overwrite", action="store_true")
    c = sub.add_parser("inspect", help="describe a folder or checkpoint without loading weights")
    c.add_argument("path", type=Path)
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv=None) -> None:
    if argv is None:  # a command line, not a call from Python
        reexec_with_huge_pages()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if argv is None:  # the command owns its process: conversion is host work, so it never grabs an accelerator
        jax.config.update("jax_platforms", "cpu")
    if args.command == "from-hf":
        config, stored = from_hf(args.hf_dir, args.ckpt_dir, args.dtype, args.overwrite,
                                args.allow_nonfinite)
        print(f"wrote {args.ckpt_dir} ({config.num_params():,} parameters, {args.dtype}; stored as {', '.join(stored)})")
    elif args.command == "to-hf":
        files = to_hf(args.source, args.hf_dir, args.dtype, args.max_shard_size, args.tokenizer, args.overwrite)
        print(f"wrote {args.hf_dir} ({len(files)} safetensors file{'s' * (len(files) > 1)}, {args.dtype})")
    else:
        info = inspect(args.path)
        config = info.pop("config")
        for key, value in info.items():
            print(f"{key:>11}: {value:,}" if isinstance(value, int) else f"{key:>11}: {value}")
        print("     config: " + ", ".join(f"{k}={v}" for k, v in config.items()
                                          if k not in ("architectures", "rope_parameters", "dtype", "torch_dtype")))


if __name__ == "__main__":
    main()
