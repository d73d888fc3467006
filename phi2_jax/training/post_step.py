"""Gradient accumulation for objectives that return sums: one division by the whole batch's count.

`train_step` in step.py averages per-micro-batch means, right for pre-training
(every micro-batch has the same number of targets) but not for SFT, whose
micro-batches count different numbers of completion tokens, nor for DPO
metrics. `accumulate` scans the micro-batches summing loss, count, metric sums
and gradients of the loss SUM, then divides once: the gradient of
(sum of weighted losses / sum of weights over all micro-batches), exactly,
because the count depends on the data and not on the parameters.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from phi2_jax.training.objectives import check_dpo_options, objective_sums
from phi2_jax.training.step import combine

# (trainable, frozen, micro_batch, rng) -> (loss sum, count, {metric: sum})
LossSums = Callable[..., tuple[jax.Array, jax.Array, dict]]


def objective_loss_sums(objective: str, graphdef, **options) -> LossSums:
    """The per-micro-batch loss-sums function for train.objective 'sft', 'dpo' (options: beta, loss_type,
    label_smoothing) or 'grpo' (options: grpo.grpo_loss_sums' keywords), over (trainable, frozen) halves of the
    parameters."""
    if objective == "dpo":
        check_dpo_options(options.get("loss_type", "sigmoid"), options.get("beta", 0.1),
                          options.get("label_smoothing", 0.0))

    if objective == "grpo":  # training/grpo.py: the clipped-ratio objective over rollout rows
        from phi2_jax.training.grpo import grpo_loss_sums

        def loss_sums(trainable, frozen, micro_batch, rng):
            return grpo_loss_sums(graphdef, combine(trainable, frozen), micro_batch, rng, **options)

        return loss_sums

    def loss_sums(trainable, frozen, micro_batch, rng):
        return objective_sums(objective, graphdef, combine(trainable, frozen), micro_batch, rng, **options)

    return loss_sums


def accumulate(loss_sums: LossSums, trainable, frozen, batch: dict, step_key: jax.Array | None, grad_accum: int
               ) -> tuple[dict, jax.Array, dict]:
    """(gradients, loss, metrics) of sum(loss sums) / sum(counts) over the micro-batches of `batch`
    (every leaf [grad_accum, micro, ...]); micro-batch i gets dropout key fold_in(step_key, i)."""

    def micro_step(carry, xs):
        grads_sum, totals = carry
        micro_batch, index = xs
        rng = None if step_key is None else jax.random.fold_in(step_key, index)

        def value(params):
            total, count, metrics = loss_sums(params, frozen, micro_batch, rng)
            return total, (count, metrics)

        (total, (count, metrics)), grads = jax.value_and_grad(value, has_aux=True)(trainable)
        totals = jax.tree.map(jnp.add, totals, {"loss": total, "count": count, **metrics})
        return (jax.tree.map(jnp.add, grads_sum, grads), totals), None

    first = jax.tree.map(lambda x: x[0], batch)
    shapes = jax.eval_shape(lambda: loss_sums(trainable, frozen, first, step_key))
    zero_totals = {"loss": jnp.zeros((), jnp.float32), "count": jnp.zeros((), jnp.float32),
                   **{k: jnp.zeros(v.shape, jnp.float32) for k, v in shapes[2].items()}}
    zeros = jax.tree.map(jnp.zeros_like, trainable)
    (grads, totals), _ = jax.lax.scan(micro_step, (zeros, zero_totals), (batch, jnp.arange(grad_accum)))
    # Clamped so that a batch without one counted token gives zero, not 0 / 0 (TRL does the same).
    count = jnp.maximum(totals.pop("count"), 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    metrics = {k: v / count for k, v in totals.items()}
    metrics["count"] = count
    return grads, metrics.pop("loss"), metrics
