"""Post-training objectives: SFT (weighted cross-entropy) and the DPO family, as TRL computes them.

Every objective returns SUMS (a loss sum and the count it is over) so that the
train step divides once, after all micro-batches of an accumulated batch:
sum of weighted token losses / sum of weights over the whole batch, which is
what transformers' Trainer does with `num_items_in_batch` (a mean of
per-micro-batch means would overweight short micro-batches).

DPO (Rafailov et al. 2023) and its variants, named as TRL names them:
    logits = (log pi(chosen) - log pi(rejected)) - (log ref(chosen) - log ref(rejected))
    sigmoid: -log sigmoid(beta logits)
    robust:  (-(1 - ls) log sigmoid(beta logits) + ls log sigmoid(-beta logits)) / (1 - 2 ls)   (ls = label_smoothing)
    hinge:   relu(1 - beta logits)
    ipo:     (logits' - 1 / (2 beta))^2, logits' with each log-ratio averaged over its response's tokens
rewards = beta * (log pi - log ref), summed over the response (for ipo too), as TRL logs them.
As in TRL 1.x, label_smoothing belongs to robust alone (older TRL also applied it to sigmoid).
The reference with LoRA is the same parameters with every lora_b zeroed (the
adapters off): no second copy of the base weights is made.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from phi2_jax.errors import ConfigError
from phi2_jax.hf.layout import flatten, unflatten

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def token_logps(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target) per position, float32 [...] for logits [..., V] and targets [...]."""
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return target_logit - jax.nn.logsumexp(logits, axis=-1)


def weighted_nll(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of weight * cross-entropy, sum of weights), float32 scalars."""
    weights = weights.astype(jnp.float32)
    return -(token_logps(logits, targets) * weights).sum(), weights.sum()


def sft_loss_sums(model, batch: dict, dropout_rng=None) -> tuple[jax.Array, jax.Array]:
    """SFT on a packed batch (data/post_batches.pack_examples): (weighted loss sum, weight sum).

    Only tokens with weight > 0 count: completions / assistant turns, or every token if the
    examples were made with count_prompt=True. Divide the sums of all micro-batches once.
    """
    logits = model(batch["input_ids"], position_ids=batch["positions"], segment_ids=batch["segment_ids"],
                   dropout_rng=dropout_rng)
    return weighted_nll(logits, batch["targets"], batch["weights"])


# ----------------------------------------------------------------------------- DPO
def sequence_logps(model, input_ids: jax.Array, targets: jax.Array, weights: jax.Array, dropout_rng=None
                   ) -> tuple[jax.Array, jax.Array]:
    """(each row's summed log-prob of its weighted targets, its weight sum), float32 [B] each."""
    logits = model(input_ids, dropout_rng=dropout_rng)
    weights = weights.astype(jnp.float32)
    return (token_logps(logits, targets) * weights).sum(-1), weights.sum(-1)


def pair_logps(model, batch: dict, dropout_rng=None) -> tuple[jax.Array, jax.Array]:
    """(chosen, rejected) summed log-probs [B] from ONE forward pass over both, concatenated along the batch."""
    b = batch["chosen_input_ids"].shape[0]
    cat = {k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], axis=0)
           for k in ("input_ids", "targets", "weights")}
    logps, _ = sequence_logps(model, cat["input_ids"], cat["targets"], cat["weights"], dropout_rng)
    return logps[:b], logps[b:]


def adapters_off(params: dict) -> dict:
    """The parameter tree with every lora_b zeroed: the base model's function, sharing every other array.

    Only the (small) zero adapters are new; each base weight is the same array object as in `params`.
    """
    flat = flatten(params)
    return unflatten({k: jnp.zeros_like(v) if k.endswith("/lora_b") else v for k, v in flat.items()})


def policy_and_reference_logps(graphdef, params: dict, batch: dict, dropout_rng=None
                               ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(policy chosen, policy rejected, reference chosen, reference rejected) summed log-probs [B].

    The reference is `batch['ref_chosen_logps']` / `batch['ref_rejected_logps']` when given
    (precomputed, e.g. with `reference_logps`: the only way without LoRA short of a second copy
    of the weights), else the same parameters with the LoRA adapters off (`adapters_off`),
    without dropout and without gradient.
    """
    if "ref_chosen_logps" not in batch and not any(k.endswith("/lora_b") for k in flatten(params)):
        # Without adapters "adapters off" is the policy itself: the loss would be a constant, silently.
        raise ConfigError("train.objective dpo needs a reference: set model.lora_rank > 0 (the reference is then the "
                          "base with the adapters off) or give ref_chosen_logps / ref_rejected_logps in the batch.")
    policy = pair_logps(nnx.merge(graphdef, params), batch, dropout_rng)
    if "ref_chosen_logps" in batch:
        reference = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    else:
        reference = pair_logps(nnx.merge(graphdef, adapters_off(params)), batch, None)
    return (*policy, *(jax.lax.stop_gradient(r) for r in reference))


def reference_logps(graphdef, params: dict, batch: dict) -> tuple[jax.Array, jax.Array]:
    """The reference's (chosen, rejected) log-probs with adapters off, to store in the batch ahead of training."""
    return pair_logps(nnx.merge(graphdef, adapters_off(params)), batch, None)


def check_dpo_options(loss_type: str, beta: float, label_smoothing: float) -> None:
    """One sentence per bad option, naming the train.* key."""
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"dpo.loss_type is {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}.")
    if not beta > 0:
        raise ConfigError(f"dpo.beta is {beta}; expected a positive number (0.1 is TRL's default).")
    if not 0 <= label_smoothing < 0.5:
        raise ConfigError(f"dpo.label_smoothing is {label_smoothing}; expected a number in [0, 0.5).")
    if label_smoothing and loss_type != "robust":
        # TRL (1.x) reads label_smoothing only for robust (and exo_pair): saying so beats ignoring it silently.
        raise ConfigError(f"dpo.label_smoothing is {label_smoothing} but loss_type {loss_type!r} ignores it; "
                          f"expected 0, or loss_type robust.")


def dpo_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta: float, loss_type: str = "sigmoid",
               label_smoothing: float = 0.0, chosen_tokens=None, rejected_tokens=None
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(losses [B], chosen rewards [B], rejected rewards [B]) as TRL's DPOTrainer computes them.

    ipo needs chosen_tokens / rejected_tokens [B]: it averages each log-ratio over its response's tokens.
    """
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -jax.nn.log_sigmoid(beta * delta)
    elif loss_type == "robust":
        losses = ((-(1 - label_smoothing) * jax.nn.log_sigmoid(beta * delta)
                   + label_smoothing * jax.nn.log_sigmoid(-beta * delta)) / (1 - 2 * label_smoothing))
    elif loss_type == "hinge":
        losses = jax.nn.relu(1 - beta * delta)
    elif loss_type == "ipo":
        delta = chosen_ratio / jnp.maximum(chosen_tokens, 1.0) - rejected_ratio / jnp.maximum(rejected_tokens, 1.0)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ConfigError(f"dpo.loss_type is {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}.")
    return losses, jax.lax.stop_gradient(beta * chosen_ratio), jax.lax.stop_gradient(beta * rejected_ratio)


def dpo_loss_sums(graphdef, params: dict, batch: dict, dropout_rng=None, *, beta: float, loss_type: str = "sigmoid",
                  label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(loss sum over pairs, pair count, metric sums over pairs) for one micro-batch of preference rows.

    Metric sums are keyed as TRL logs them; divide each by the total pair count of the batch.
    """
    pc, pr, rc, rr = policy_and_reference_logps(graphdef, params, batch, dropout_rng)
    losses, chosen_rewards, rejected_rewards = dpo_losses(
        pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
        chosen_tokens=batch["chosen_weights"].astype(jnp.float32).sum(-1),
        rejected_tokens=batch["rejected_weights"].astype(jnp.float32).sum(-1))
    metrics = {
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(jnp.float32).sum(),
        "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
        "logps/chosen": jax.lax.stop_gradient(pc).sum(),
        "logps/rejected": jax.lax.stop_gradient(pr).sum(),
    }
    return losses.sum(), jnp.asarray(losses.shape[0], jnp.float32), metrics


def objective_sums(objective: str, graphdef, params: dict, batch: dict, dropout_rng=None, **options: Any
                   ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """The train step's one call per micro-batch: (loss sum, count, metric sums) for 'sft' or 'dpo'."""
    if objective == "sft":
        total, count = sft_loss_sums(nnx.merge(graphdef, params), batch, dropout_rng)
        return total, count, {}
    if objective == "dpo":
        return dpo_loss_sums(graphdef, params, batch, dropout_rng, **options)
    raise ConfigError(f"train.objective is {objective!r}; expected 'lm', 'sft' or 'dpo'.")
