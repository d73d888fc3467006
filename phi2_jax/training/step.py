"""The jitted training and evaluation steps, with explicit shardings over the mesh.

Functional in the hot loop: parameters and optimiser state are plain pytrees
(`nnx.to_pure_dict` layout) passed to one `jax.jit` with in/out shardings and
donated buffers; the NNX module is rebuilt from its static graphdef inside the
trace, so no graph traversal happens per step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from phi2_jax.hf.layout import flatten, unflatten
from phi2_jax.model.lora import is_adapter
from phi2_jax.model.transformer import Phi, abstract_model
from phi2_jax.sharding import logical_to_spec, state_shardings, with_shardings


def cross_entropy(logits: jax.Array, targets: jax.Array, z_loss: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """(mean loss including z-loss, mean cross-entropy), float32. logits [..., V], targets [...]."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = (log_z - target_logit).mean()
    # z-loss keeps log Z near 0 so bf16 logits do not drift (PaLM).
    return nll + z_loss * jnp.square(log_z).mean(), nll


@dataclasses.dataclass
class StepFunctions:
    """Everything the loop needs, compiled for one (config, mesh, optimiser)."""

    graphdef: Any
    param_shardings: Any
    opt_shardings: Any
    abstract_params: Any           # ShapeDtypeStructs with shardings: restore targets, AOT compile inputs
    abstract_opt_state: Any
    batch_sharding: NamedSharding  # [grad_accum, micro, T]
    eval_sharding: NamedSharding   # [batch, T]
    init_opt: Callable
    train_step: Callable   # (params, opt_state, batch, step) -> (params, opt_state, metrics)
    eval_loss: Callable    # lm: (params, batch) -> mean cross-entropy; sft/dpo: -> {loss, count, metric: sums}


def partition(params: dict, lora: bool) -> tuple[dict, dict]:
    """(trainable, frozen) halves of a parameter tree: everything is trainable unless training LoRA adapters."""
    if not lora:
        return params, {}
    flat = flatten(params)
    return (unflatten({k: v for k, v in flat.items() if is_adapter(k)}),
            unflatten({k: v for k, v in flat.items() if not is_adapter(k)}))


def combine(trainable: dict, frozen: dict) -> dict:
    return unflatten({**flatten(frozen), **flatten(trainable)}) if frozen else trainable


def tuned_for_backend(model_config, backend: str):
    """The model config with the weight-gradient form measured fastest on `backend` (model/dense.py): the
    transposed one on XLA:CPU, the native one (forward-mode autodiff intact) elsewhere. For the trainer and the
    bench to call: the choice is theirs, made at the edge, not the model's."""
    return model_config.replace(weight_grad="transposed" if backend == "cpu" else "native")


def optimizer_shardings(tx: optax.GradientTransformation, params_abstract: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Each optimiser-state leaf sharded like the parameter it belongs to (AdamW's mu and nu); counters replicated.

    The compiler, asked for `tx.init`'s output shardings, answers replicated: every device would hold the
    whole float32 mu and nu (20.7 GiB per device for phi-2 on 8 devices instead of 2.6).
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    state = jax.eval_shape(tx.init, params_abstract)
    return optax.tree_utils.tree_map_params(tx, lambda _, sharding: sharding, state, param_shardings,
                                            transform_non_params=lambda _: replicated)


def abstract_params(model_config, mesh: Mesh) -> tuple[Any, Any, Any]:
    """(graphdef, abstract params as a pure dict, their NamedShardings) without allocating anything."""
    graphdef, state = nnx.split(abstract_model(model_config, mesh))
    shardings = nnx.to_pure_dict(state_shardings(state, mesh))
    return graphdef, nnx.to_pure_dict(state), shardings


def batch_sharding(mesh: Mesh, ndim: int, accumulated: bool = True) -> NamedSharding:
    """A batch leaf's sharding: rows over the data axes, time over the context axis; [grad_accum, ...] leading
    when `accumulated`. Leaves of fewer dimensions (a per-row value such as a reference log-prob) drop time."""
    names = ((None,) if accumulated else ()) + ("act_batch", "act_length")
    return NamedSharding(mesh, logical_to_spec(names[:ndim], mesh=mesh))


def build_steps(model_config, mesh: Mesh, tx: optax.GradientTransformation, schedule: optax.Schedule,
                seed: int, grad_accum: int, z_loss: float, objective: str = "lm",
                objective_options: dict | None = None) -> StepFunctions:
    """Jits the train step (batch [grad_accum, micro, T] per key) and the eval loss with explicit shardings.

    objective 'sft' / 'dpo' (training/objectives.py, with `objective_options`: beta, loss_type, label_smoothing)
    divides the summed loss once by the whole accumulated batch's count (training/post_step.py); their batches
    carry leaves of different ranks, each placed by `batch_sharding` when it is made.
    """
    graphdef, params_abstract, param_shardings = abstract_params(model_config, mesh)
    batch_sharding = NamedSharding(mesh, logical_to_spec((None, "act_batch", "act_length"), mesh=mesh))
    eval_sharding = NamedSharding(mesh, logical_to_spec(("act_batch", "act_length"), mesh=mesh))

    # With LoRA only the adapters train: the optimiser sees (and keeps state for) them alone.
    lora = model_config.lora_rank > 0
    trainable, frozen = partition(params_abstract, lora)
    trainable_shardings, _ = partition(param_shardings, lora)
    opt_shardings = optimizer_shardings(tx, trainable, trainable_shardings, mesh)
    init_opt = jax.jit(lambda params: tx.init(partition(params, lora)[0]), in_shardings=(param_shardings,),
                       out_shardings=opt_shardings)

    def loss_fn(trainable, frozen, batch, rng):
        model: Phi = nnx.merge(graphdef, combine(trainable, frozen))
        logits = model(batch["input_ids"], position_ids=batch["positions"],
                               segment_ids=batch["segment_ids"], dropout_rng=rng)
        return cross_entropy(logits, batch["targets"], z_loss)

    if objective != "lm":
        return _post_training_steps(objective, objective_options or {}, graphdef, params_abstract, param_shardings,
                                    opt_shardings, init_opt, tx, schedule, seed, grad_accum, lora, mesh)

    def train_step(params, opt_state, batch, step):
        step_key = jax.random.fold_in(jax.random.key(seed), step)  # same dropout after a resume
        trainable, frozen = partition(params, lora)

        def micro_step(grads_sum, xs):
            micro_batch, index = xs
            (_, nll), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, micro_batch,
                                                                         jax.random.fold_in(step_key, index))
            return jax.tree.map(jnp.add, grads_sum, grads), nll

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        grads, nlls = jax.lax.scan(micro_step, zeros, (batch, jnp.arange(grad_accum)))
        grads = jax.tree.map(lambda g: g / grad_accum, grads)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        params = combine(optax.apply_updates(trainable, updates), frozen)
        metrics = {"loss": nlls.mean(), "grad_norm": optax.global_norm(grads), "lr": schedule(step)}
        metrics["finite"] = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])  # no NaN checkpoint
        return params, opt_state, metrics

    train_step = jax.jit(train_step, in_shardings=(param_shardings, opt_shardings, batch_sharding, None),
                         out_shardings=(param_shardings, opt_shardings, None), donate_argnums=(0, 1))
    eval_loss = jax.jit(lambda params, batch: loss_fn(*partition(params, lora), batch, None)[1],
                        in_shardings=(param_shardings, eval_sharding))
    abstract_in = with_shardings(params_abstract, param_shardings)
    abstract_opt = with_shardings(jax.eval_shape(init_opt, abstract_in), opt_shardings)
    return StepFunctions(graphdef, param_shardings, opt_shardings, abstract_in, abstract_opt, batch_sharding,
                         eval_sharding, init_opt, train_step, eval_loss)


def _post_training_steps(objective: str, options: dict, graphdef, params_abstract, param_shardings, opt_shardings,
                         init_opt, tx, schedule, seed: int, grad_accum: int, lora: bool, mesh: Mesh) -> StepFunctions:
    """The train step and the (sums-returning) eval for sft / dpo; batch shardings come with the arrays."""
    from phi2_jax.training.post_step import accumulate, objective_loss_sums

    loss_sums = objective_loss_sums(objective, graphdef, **options)

    def train_step(params, opt_state, batch, step):
        step_key = jax.random.fold_in(jax.random.key(seed), step)  # same dropout after a resume
        trainable, frozen = partition(params, lora)
        grads, loss, metrics = accumulate(loss_sums, trainable, frozen, batch, step_key, grad_accum)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        params = combine(optax.apply_updates(trainable, updates), frozen)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads), "lr": schedule(step)}
        metrics["finite"] = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        return params, opt_state, metrics

    def eval_sums(params, batch):
        total, count, metrics = loss_sums(*partition(params, lora), batch, None)
        return {"loss": total, "count": count, **metrics}

    train_step = jax.jit(train_step, in_shardings=(param_shardings, opt_shardings, None, None),
                         out_shardings=(param_shardings, opt_shardings, None), donate_argnums=(0, 1))
    eval_loss = jax.jit(eval_sums, in_shardings=(param_shardings, None))
    abstract_in = with_shardings(params_abstract, param_shardings)
    abstract_opt = with_shardings(jax.eval_shape(init_opt, abstract_in), opt_shardings)
    return StepFunctions(graphdef, param_shardings, opt_shardings, abstract_in, abstract_opt,
                         batch_sharding(mesh, 3), batch_sharding(mesh, 2, accumulated=False), init_opt, train_step,
                         eval_loss)
