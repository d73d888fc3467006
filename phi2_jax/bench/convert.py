"""The `convert` benchmark: a random full-size phi-2 folder through our converter and through transformers.

The folder is generated tensor by tensor (fp16, two shards, like the published
model), so making it needs no more memory than the converter should. Each step
runs in its own process; wall time and peak resident memory (the process tree's
RSS sampled every 20 ms) are recorded side by side.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from phi2_jax.config import PhiConfig, preset
from phi2_jax.hf.layout import hf_names_and_shapes, tensor_plan
from phi2_jax.hf.loading import our_shapes
from phi2_jax.hf.safetensors_io import write_streaming


def write_random_hf_folder(config: PhiConfig, folder: Path, shards: int = 2, seed: int = 0) -> int:
    """A random float16 Phi folder in the transformers layout, `shards` files + index; returns total bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes = hf_names_and_shapes(config, "transformers", our_shapes(config))
    names = [name for name, _, _ in tensor_plan(config, "transformers")]
    total = sum(int(np.prod(shapes[n])) * 2 for n in names)
    groups, size = [[]], 0
    for name in names:
        if size > total / shards * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append(name)
        size += int(np.prod(shapes[name])) * 2
    rng = np.random.default_rng(seed)

    def tensors(group):
        for name in group:
            values = rng.standard_normal(shapes[name], dtype=np.float32) * 0.02
            if name.endswith("layernorm.weight"):
                values += 1.0
            yield [values.astype(np.float16)]  # one block: the whole tensor

    files = [f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))]
    for group, file in zip(groups, files):
        write_streaming(folder / file, [(n, shapes[n], np.float16) for n in group], tensors(group))
    index = {"metadata": {"total_size": total}, "weight_map": {n: f for g, f in zip(groups, files) for n in g}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    hf = config.to_hf_dict(torch_dtype="float16")
    (folder / "config.json").write_text(json.dumps(hf, indent=2))
    return total


def run_measured(command: list[str]) -> dict:
    """Runs `command`; returns wall seconds and the peak RSS of its whole process tree (MB)."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    parent, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            rss = parent.memory_info().rss + sum(c.memory_info().rss for c in parent.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.02)
    output = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{output[-3000:]}")
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": peak / 2**20}


_TRANSFORMERS_ROUND_TRIP = """
import sys, torch
from transformers import PhiForCausalLM
model = PhiForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float16)
model.save_pretrained(sys.argv[2], max_shard_size="2GB")
"""


def bench_convert(work: Path, preset_name: str = "phi-2", compare: bool = True, repeats: int = 3) -> list[dict]:
    """Rows: ours from-hf, to-hf and their sum (the round trip), and transformers' load + save of the same folder.

    The three commands run in turn, `repeats` rounds, so a slow spell of the
    disk hits all of them alike; each row holds the median wall time and the
    largest peak RSS over its runs.
    """
    config = preset(preset_name)
    source = work / "hf-source"
    shutil.rmtree(work, ignore_errors=True)
    start = time.perf_counter()
    total = write_random_hf_folder(config, source)
    print(f"generated a random {preset_name} folder: {total / 1e9:.2f} GB fp16 in {time.perf_counter() - start:.0f}s",
          file=sys.stderr)
    convert = [sys.executable, "-m", "phi2_jax.convert"]
    commands = {
        "from-hf": [*convert, "from-hf", str(source), str(work / "ckpt"), "--overwrite"],
        "to-hf": [*convert, "to-hf", str(work / "ckpt"), str(work / "hf-ours"), "--dtype", "float16", "--overwrite"],
    }
    if compare:
        if importlib.util.find_spec("transformers") is None:
            print("transformers is not installed: no comparison row", file=sys.stderr)
        else:
            commands["transformers"] = [sys.executable, "-c", _TRANSFORMERS_ROUND_TRIP, str(source),
                                        str(work / "hf-transformers")]
    runs: dict[str, list[dict]] = {name: [] for name in commands}
    for round_ in range(repeats):
        for name, command in commands.items():
            runs[name].append(run_measured(command))
            print(f"round {round_ + 1}/{repeats} {name}: {runs[name][-1]['seconds']:.1f}s", file=sys.stderr)
    _check_identical(source, work / "hf-ours")

    def row(impl, case, measured):
        return {"suite": "convert", "impl": impl, "case": case, "model_gb": total / 1e9, "repeats": len(measured),
                "seconds": statistics.median(m["seconds"] for m in measured),
                "peak_rss_mb": max(m["peak_rss_mb"] for m in measured)}

    rows = [row("phi2_jax", "from-hf (fp16 HF -> Orbax)", runs["from-hf"]),
            row("phi2_jax", "to-hf (Orbax -> fp16 HF)", runs["to-hf"])]
    round_trips = [{"seconds": a["seconds"] + b["seconds"], "peak_rss_mb": max(a["peak_rss_mb"], b["peak_rss_mb"])}
                   for a, b in zip(runs["from-hf"], runs["to-hf"])]
    rows.append(row("phi2_jax", "round trip (from-hf + to-hf)", round_trips))
    if "transformers" in runs:
        rows.append(row("transformers", "from_pretrained + save_pretrained (fp16)", runs["transformers"]))
        for ours in rows[:3]:
            ours["speedup_vs_transformers"] = rows[3]["seconds"] / ours["seconds"]
    return rows


def _check_identical(source: Path, exported: Path) -> None:
    """Spot-checks that the round trip is exact, so a fast wrong converter cannot pass the benchmark."""
    from phi2_jax.hf.files import HFWeights

    a, b = HFWeights(source), HFWeights(exported)
    for name in a.names[:3] + a.names[-3:]:
        if not np.array_equal(a.read(name), b.read(name)):
            raise AssertionError(f"round trip changed tensor {name}")
