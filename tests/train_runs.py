"""Runs `python -m phi2_jax.train` in a subprocess, as a user would, with a small fast config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# ~10 s per run on 2 CPU cores after the first tokenizer training.
FAST = [
    "model.num_hidden_layers=2", "model.vocab_size=512", "data.seq_len=64", "data.max_documents=150",
    "train.batch_size=8", "train.log_every=5", "train.eval_every=10", "train.eval_batches=2", "train.samples=false",
    "checkpoint.every=5", "optim.warmup_steps=5", "optim.lr=3e-3",
]


def train_env(devices: int = 1, cache: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    if cache is not None:
        env["PHI2_JAX_CACHE"] = str(cache)
    # The runs of a test (straight, stopped, resumed) compile the same programs: XLA's persistent cache
    # compiles each once per test session (keyed by the program, so a hit runs the same executable).
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(COMPILE_CACHE))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    return env


COMPILE_CACHE = Path(tempfile.gettempdir()) / f"phi2_jax_test_xla_cache_{os.getuid()}"


def command(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "phi2_jax.train", f"run_dir={run_dir}", *FAST, *overrides]


def run(run_dir: Path, *overrides: str, devices: int = 1, cache: Path | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(run_dir, *overrides), cwd=ROOT, env=train_env(devices, cache),
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def train_losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["train/loss"] for r in map(json.loads, lines) if "train/loss" in r}


def final_params(run_dir: Path, step: int) -> dict[str, np.ndarray]:
    import orbax.checkpoint as ocp

    from phi2_jax.hf.layout import flatten

    import jax

    path = (run_dir / "checkpoints" / str(step) / "params").absolute()
    checkpointer = ocp.StandardCheckpointer()
    # Onto one device of this process, whatever topology (processes, devices) saved it.
    stored = checkpointer.metadata(path).item_metadata.tree
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restored = checkpointer.restore(path, jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                                                                       sharding=device), stored))
    layers = restored.pop("layers")  # stored one entry per layer: stack them back
    flat = {k: np.asarray(v) for k, v in flatten(restored).items()}
    per_layer = [flatten(layers[str(i)]) for i in range(len(layers))]
    flat.update({f"layers/{k}": np.stack([layer[k] for layer in per_layer]) for k in per_layer[0]})
    return flat


def run_in(folder: Path, run_dir, *overrides: str, devices: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m phi2_jax.train run_dir=... OVERRIDES` run from `folder` (relative paths and imports resolve there)."""
    proc = subprocess.run([sys.executable, "-m", "phi2_jax.train", f"run_dir={run_dir}", *overrides], cwd=folder,
                          env=train_env(devices), capture_output=True, text=True, timeout=600)
    if check and proc.returncode:
        raise AssertionError(f"train exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def logged(run_dir: Path, key: str) -> dict[int, float]:
    """{step: value} of one metrics.jsonl key."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}
