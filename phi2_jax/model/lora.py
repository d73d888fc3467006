"""LoRA bookkeeping: which parameters are adapters, fresh adapters for a base model, merging for export.

The adapter maths lives in `model.Linear`; this module only moves parameters
around. Merged weights are `kernel + (lora_alpha / lora_rank) * lora_a @ lora_b`,
so a merged model computes what the adapted one does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from phi2_jax.config import PhiConfig


def init_lora_a(key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    """lora_a [..., in, r] ~ N(0, 1/in); lora_b starts at 0, so a fresh adapter leaves the function unchanged."""
    return (jax.random.normal(key, shape, jnp.float32) * shape[-2] ** -0.5).astype(dtype)


def is_adapter(path: str) -> bool:
    """True for a '/'-joined parameter path of a LoRA adapter weight."""
    return path.rsplit("/", 1)[-1] in ("lora_a", "lora_b")


def merged_kernel(kernel, lora_a, lora_b, config: PhiConfig):
    """kernel [..., in, out] with the adapter folded in (numpy or jax, stacked layers allowed)."""
    scale = config.lora_alpha / config.lora_rank
    return kernel + scale * (lora_a.astype(np.float32) @ lora_b.astype(np.float32)).astype(kernel.dtype)


def merge_adapters(flat_params: dict, config: PhiConfig) -> dict:
    """A flat parameter dict without adapters, each adapted kernel merged."""
    merged = {k: v for k, v in flat_params.items() if not is_adapter(k)}
    for path in flat_params:
        if path.endswith("/lora_a"):
            prefix = path[: -len("lora_a")]
            merged[prefix + "kernel"] = merged_kernel(flat_params[prefix + "kernel"], flat_params[path],
                                                      flat_params[prefix + "lora_b"], config)
    return merged


def fresh_adapters(shapes: dict[str, tuple], dtype, seed: int = 0) -> dict[str, np.ndarray]:
    """New adapters for every adapter path in `shapes` (`init_lora_a`, lora_b = 0), as host arrays."""
    key = jax.random.key(seed)
    out = {}
    for index, (path, shape) in enumerate(sorted(shapes.items())):
        if path.endswith("/lora_a"):
            out[path] = np.asarray(init_lora_a(jax.random.fold_in(key, index), shape, dtype))
        elif path.endswith("/lora_b"):
            out[path] = np.zeros(shape, dtype)
    return out
