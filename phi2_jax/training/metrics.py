"""Training metrics: FLOP counts and MFU, the progress line, TensorBoard events, the loss-curve plot."""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from phi2_jax.config import PhiConfig
from phi2_jax.util.progress import format_eta

# Datasheet figures by a substring of `device_kind`, the more specific names first ("NVIDIA H100 PCIe"
# must not be read as the SXM part, "NVIDIA H100 80GB HBM3").
# Dense bf16 tensor-core peaks (FLOP/s); float32 runs use TF32 at half of these.
_GPU_BF16_PEAK = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12), ("H100", 989e12),
                  ("H200", 989e12), ("H800", 989e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12),
                  ("L4", 121e12), ("A10", 125e12))
# HBM / GDDR bandwidth (bytes/s), the denominator of decoding's memory-bandwidth utilisation.
_GPU_MEMORY_BANDWIDTH = (("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12), ("H200", 4.8e12),
                         ("H800", 3.35e12), ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12),
                         ("A100", 1.555e12), ("L40S", 0.864e12), ("L4", 0.3e12), ("A10", 0.6e12))


def datasheet_value(device_kind: str, table: tuple[tuple[str, float], ...]) -> float | None:
    """The first entry of `table` whose name occurs in `device_kind`, or None."""
    return next((value for name, value in table if name in device_kind), None)


def train_flops_per_token(config: PhiConfig, seq_len: int) -> float:
    """6 N + 12 L T d: forward + backward matmul FLOPs per token.

    N counts the weights that take part in matmuls (all but the embedding
    table, which is a lookup); 12 L T d is attention's QK^T and PV at full
    (not causally halved) length T, the convention of PaLM's MFU.
    """
    n = config.num_params() - config.vocab_size * config.hidden_size
    return 6.0 * n + 12.0 * config.num_hidden_layers * seq_len * config.hidden_size


def update_flops(config: PhiConfig, objective: str, rows: int, seq_len: int, reference_forward: bool = False) -> float:
    """Model FLOPs of one optimiser update on `rows` rows of `seq_len` tokens, for train.objective `objective`.

    A DPO row is a pair: two sequences through the model. `reference_forward`: the loss also runs the
    reference forward (LoRA's adapters-off reference for DPO, or GRPO's KL term), a forward being a third
    of forward + backward.
    """
    sequences = rows * (2 if objective == "dpo" else 1)
    per_token = train_flops_per_token(config, seq_len) * (4 / 3 if reference_forward else 1)
    return per_token * sequences * seq_len


def run_update_flops(config, model_config: PhiConfig) -> float:
    """`update_flops` of one compiled train step of run config `config`: its objective, batch and row length
    (run_config.row_length). The loss runs a reference forward with LoRA (the adapters off) for DPO, and for
    GRPO when grpo.beta > 0; a full fine-tune's reference is computed outside the step."""
    from phi2_jax.training.run_config import row_length

    t = config.train
    in_loss = t.objective == "dpo" or (t.objective == "grpo" and config.grpo.beta > 0)
    reference = bool(model_config.lora_rank) and in_loss
    return update_flops(model_config, t.objective, t.batch_size, row_length(config), reference)


def _fastest_seconds(fn, *args, runs: int = 5) -> float:
    """The fastest of `runs` timed calls of the jitted `fn`, after one untimed call that compiles it."""
    fn(*args).block_until_ready()
    best = math.inf
    for _ in range(runs):
        start = time.perf_counter()
        fn(*args).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def measured_cpu_peak(size: int = 1024) -> float:
    """FLOP/s of a float32 matmul on this CPU, best of a few runs: the MFU denominator on a CPU."""
    a = jnp.ones((size, size), jnp.float32)
    return 2.0 * size**3 / _fastest_seconds(jax.jit(lambda x: x @ x), a)


def device_peak_flops(compute_dtype: str) -> tuple[float, str]:
    """Peak FLOP/s of ONE device for `compute_dtype`, and where the number comes from."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return measured_cpu_peak(), "measured float32 matmul on this CPU"
    kind = device.device_kind
    peak = datasheet_value(kind, _GPU_BF16_PEAK)
    if peak is None:
        return math.nan, f"unknown peak for {kind}"
    factor = 1.0 if compute_dtype in ("bfloat16", "float16") else 0.5
    return peak * factor, f"{kind} datasheet dense {'bf16' if factor == 1 else 'tf32'}"


@functools.cache
def measured_cpu_bandwidth(megabytes: int = 256) -> float:
    """Bytes/s of a float32 matrix-vector product over a matrix far larger than the caches, best of a few.

    The denominator of decoding's bandwidth utilisation on a CPU: a batch-1 decoding step
    is matrix-vector products over the weights, so this is the speed it could at best read them.
    """
    matrix = jnp.ones((megabytes * 2**20 // 4 // 4096, 4096), jnp.float32)
    vector = jnp.ones((4096,), jnp.float32)
    return matrix.nbytes / _fastest_seconds(jax.jit(lambda m, v: m @ v), matrix, vector)


def device_memory_bandwidth() -> tuple[float, str]:
    """Memory bandwidth (bytes/s) of ONE device, and where the number comes from."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return measured_cpu_bandwidth(), "measured float32 matrix-vector product over 256 MB on this CPU"
    bandwidth = datasheet_value(device.device_kind, _GPU_MEMORY_BANDWIDTH)
    if bandwidth is None:
        return math.nan, f"unknown memory bandwidth for {device.device_kind}"
    return bandwidth, f"{device.device_kind} datasheet memory bandwidth"


def decode_bytes_per_token(config: PhiConfig, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Bytes a greedy decoding step must read at the least, averaged over `new_tokens` steps.

    Every weight once (all but the embedding table, of which a step gathers only
    `batch` rows) and the live part of the KV cache, both in the compute dtype:
    the numerator of memory-bandwidth utilisation (MBU), the decoding
    counterpart of MFU.
    """
    width = jnp.dtype(config.compute_dtype).itemsize
    weights = (config.num_params() - config.vocab_size * config.hidden_size) * width
    mean_context = prompt_len + (new_tokens - 1) / 2  # the cache holds prompt_len + i tokens at step i
    per_position = 2 * config.num_hidden_layers * config.kv_dim * width  # k and v of every layer
    return weights + batch * mean_context * per_position


def progress_line(step: int, total: int, loss: float, lr: float, grad_norm: float, tokens_per_s: float,
                  mfu: float, eta_s: float) -> str:
    return (f"step {step}/{total}  loss {loss:.4f}  lr {lr:.3e}  grad_norm {grad_norm:.3f}  "
            f"tokens/s {tokens_per_s:,.0f}  mfu {100 * mfu:.1f}%  eta {format_eta(eta_s)}")


class EventWriter:
    """TensorBoard scalars through tensorboardX (no TensorFlow); a no-op on processes other than 0."""

    def __init__(self, run_dir: Path, enabled: bool):
        self._writer = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(run_dir / "events"), flush_secs=10)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def plot_loss_curve(history: dict[str, list[tuple[int, float]]], path: Path, objective: str = "lm") -> None:
    """Writes a PNG of training (and validation) loss against step; any other series of `history`
    (DPO's reward margins and accuracies) is drawn in a second panel beside it."""
    # The Figure API draws without pyplot, so the caller's backend (a notebook's inline one) is left alone.
    from matplotlib.figure import Figure

    losses = {k: v for k, v in history.items() if k in ("train", "validation")}
    others = {k: v for k, v in history.items() if k not in losses and v}
    fig = Figure(figsize=(12 if others else 7, 4), dpi=110)
    axes = fig.subplots(1, 2) if others else [fig.add_subplot()]
    for ax, series in zip(axes, (losses, others)):
        for name, points in series.items():
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, label=name, marker="o" if len(points) < 20 else None)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("DPO loss" if objective == "dpo" else "cross-entropy (nats/token)")
    axes[0].set_title(f"phi2_jax training loss ({objective})")
    if others:
        axes[1].set_title("DPO rewards (beta * log-ratio to the reference)")
    fig.tight_layout()
    fig.savefig(path)
