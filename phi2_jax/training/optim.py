"""Optax optimiser: AdamW with warmup then cosine / linear / constant, decay only on matrices, clipping.

Weight decay skips biases and LayerNorm parameters (decaying a LayerNorm scale
towards 0 shrinks the layer's output, not its complexity). Master weights stay
in the parameter dtype (float32 by default) whatever the compute dtype.
"""

from __future__ import annotations

import optax

from phi2_jax.hf.layout import flatten, unflatten


def learning_rate_schedule(lr: float, steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then `schedule` down to `lr * min_lr_ratio` at `steps`."""
    warmup = optax.linear_schedule(0.0, lr, max(warmup_steps, 1))
    rest = max(steps - warmup_steps, 1)
    if schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, rest, alpha=min_lr_ratio)
    elif schedule == "linear":
        after = optax.linear_schedule(lr, lr * min_lr_ratio, rest)
    else:
        after = optax.constant_schedule(lr)
    return optax.join_schedules([warmup, after], [warmup_steps])


def decay_mask(params: dict) -> dict:
    """True for weight matrices and the embedding; False for biases and LayerNorm parameters."""
    flat = flatten(params)
    return unflatten({path: path.endswith("/kernel") or path == "embed_tokens" for path in flat})


def make_optimizer(optim, steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimiser for an `OptimSection` over `steps` steps, and its learning-rate schedule."""
    schedule = learning_rate_schedule(optim.lr, steps, optim.warmup_steps, optim.schedule, optim.min_lr_ratio)
    tx = optax.chain(
        optax.clip_by_global_norm(optim.clip_norm) if optim.clip_norm > 0 else optax.identity(),
        optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
                    mask=decay_mask),
    )
    return tx, schedule

