"""GRPO's numbers, as TRL 1.16's GRPOTrainer computes them: group advantages, the clipped per-token objective
with its optional KL term, and the rollout batch the objective reads.

Advantages (TRL's default multi_objective_aggregation 'sum_then_normalize'), rewards [N*G] grouped
consecutively (the G completions of prompt 0, then of prompt 1, ...):
    A = r - mean(group of r), divided by (std + 1e-4) unless scale_rewards is 'none', where std is the
    group's (scale_rewards 'group') or the whole batch's ('batch'), with Bessel's correction (ddof=1).
    NaN rewards (every reward function returned None) are left out of mean and std; their advantage is 0.
Per token, with ratio = exp(logp - old_logp) and the sampling temperature applied to the logits:
    loss = -min(ratio A, clip(ratio, 1 - epsilon_low, 1 + epsilon_high) A) + beta kl
    kl = (exp(ref - logp) - (ref - logp) - 1), times ratio with bias_correction_kl (TRL 1.16's default)
Aggregation (TRL's loss_type), as SUMS that the train step divides once over all micro-batches
(training/post_step.accumulate):
    grpo     sum over sequences of each one's token mean      / sequences
    bnpo     sum over completion tokens                       / completion tokens
    dr_grpo  sum over completion tokens / max_completion_length / sequences
With one micro-batch each equals TRL's loss. Over several, grpo and dr_grpo still equal TRL's (its per-micro-
batch values divided by the accumulation steps, micro-batches being of equal size); bnpo becomes the token
mean over the whole accumulated batch (what TRL calls 'dapo') where TRL averages per-micro-batch token means.
Not implemented (TRL options at their defaults here): importance_sampling_level 'sequence', delta,
top_entropy_quantile, off_policy_mask_threshold, vLLM importance sampling, multi_objective_aggregation
'normalize_then_sum', the entropy bonus, and loss types other than the three above.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from phi2_jax.errors import ConfigError, UserInputError
from phi2_jax.hf.layout import flatten
from phi2_jax.inference.generate import generate, left_pad
from phi2_jax.training.objectives import adapters_off, token_logps

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")
# TRL's other loss types, refused by name rather than as unknown.
TRL_ONLY_LOSS_TYPES = ("dapo", "cispo", "sapo", "vespo", "luspo")
STD_EPSILON = 1e-4  # TRL's: advantages / (std + 1e-4)


# ----------------------------------------------------------------------------- advantages
@dataclasses.dataclass(frozen=True)
class Advantages:
    """advantages float32 [N*G]; frac_reward_zero_std as TRL logs it (the share of completions whose std,
    group or batch as scaled, is ~0); tied_groups: the share of groups whose rewards all tie (no signal)."""

    advantages: np.ndarray
    frac_reward_zero_std: float
    tied_groups: float


def _nanstd(x: np.ndarray, axis=None) -> np.ndarray:
    """TRL's nanstd: Bessel-corrected (ddof=1) over the non-NaN values, NaN where fewer than two."""
    count = np.sum(~np.isnan(x), axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        variance = np.nansum((x - _safe_nanmean(x, axis)) ** 2, axis=axis) / (count - 1)
    return np.where(count > 1, np.sqrt(np.maximum(variance, 0.0)), np.nan)


def _safe_nanmean(x: np.ndarray, axis) -> np.ndarray:
    """nanmean keeping dims, 0 (not a warning) over all-NaN slices."""
    count = np.sum(~np.isnan(x), axis=axis, keepdims=True)
    return np.nansum(x, axis=axis, keepdims=True) / np.maximum(count, 1)


def group_advantages(rewards, group_size: int, scale_rewards: str = "group") -> Advantages:
    """GRPO advantages of rewards [N*G] (G = group_size consecutive completions per prompt), float32 [N*G]."""
    rewards = np.asarray(rewards, np.float64)
    if scale_rewards not in SCALE_REWARDS:
        raise ConfigError(f"grpo.scale_rewards is {scale_rewards!r}; expected one of {', '.join(SCALE_REWARDS)}.")
    if rewards.ndim != 1 or group_size < 1 or rewards.size % group_size:
        raise UserInputError(f"{rewards.size} rewards do not split into groups of {group_size}; expected "
                             f"prompts x num_generations rewards.")
    grouped = rewards.reshape(-1, group_size)
    mean = np.repeat(_safe_nanmean(grouped, 1)[:, 0], group_size)
    if scale_rewards == "batch":
        std = np.full_like(rewards, _nanstd(rewards) if rewards.size > 1 else 0.0)
    else:
        std = np.repeat(_nanstd(grouped, 1), group_size) if group_size > 1 else np.zeros_like(rewards)
    with np.errstate(invalid="ignore"):
        advantages = rewards - mean
        if scale_rewards != "none":
            advantages = advantages / (std + STD_EPSILON)
    zero_std = np.isclose(std, 0.0, rtol=1e-5, atol=1e-8)  # torch.isclose's defaults; NaN is not close
    tied = [np.unique(g[~np.isnan(g)]).size <= 1 for g in grouped]
    return Advantages(np.nan_to_num(advantages, nan=0.0).astype(np.float32), float(zero_std.mean()),
                      float(np.mean(tied)))


# ----------------------------------------------------------------------------- options
def check_grpo_options(*, num_generations: int = 8, beta: float = 0.0, epsilon: float = 0.2,
                       epsilon_high: float | None = None, loss_type: str = "grpo", scale_rewards: str = "group",
                       max_completion_length: int = 256, temperature: float = 1.0, top_p: float = 1.0,
                       batch_size: int | None = None) -> None:
    """One sentence per bad option, naming its grpo.* key; batch_size (completions per step), when given,
    must hold whole groups."""

    def number(value) -> bool:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)

    def integer(value) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    if loss_type in TRL_ONLY_LOSS_TYPES:
        raise ConfigError(f"grpo.loss_type {loss_type!r} is one of TRL's that phi2_jax does not implement; expected "
                          f"one of {', '.join(LOSS_TYPES)}.")
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"grpo.loss_type is {loss_type!r}, which is unknown; expected one of {', '.join(LOSS_TYPES)}.")
    if scale_rewards not in SCALE_REWARDS:
        raise ConfigError(f"grpo.scale_rewards is {scale_rewards!r}; expected one of {', '.join(SCALE_REWARDS)}.")
    if not (integer(num_generations) and num_generations >= 2):
        raise ConfigError(f"grpo.num_generations is {num_generations!r}; expected an integer >= 2 (advantages "
                          f"compare completions of the same prompt).")
    if not (number(beta) and beta >= 0):
        raise ConfigError(f"grpo.beta is {beta!r}; expected a number >= 0 (0: no KL term, no reference).")
    if not (number(epsilon) and 0 < epsilon < 1):
        raise ConfigError(f"grpo.epsilon is {epsilon!r}; expected a number > 0 and < 1.")
    if epsilon_high is not None and not (number(epsilon_high) and epsilon_high > 0):
        raise ConfigError(f"grpo.epsilon_high is {epsilon_high!r}; expected a number > 0 (or unset: epsilon).")
    if not (integer(max_completion_length) and max_completion_length >= 1):
        raise ConfigError(f"grpo.max_completion_length is {max_completion_length!r}; expected a positive integer.")
    if not (number(temperature) and temperature > 0):
        raise ConfigError(f"grpo.temperature is {temperature!r}; expected a number > 0 (GRPO samples).")
    if not (number(top_p) and 0 < top_p <= 1):
        raise ConfigError(f"grpo.top_p is {top_p!r}; expected a number in (0, 1].")
    if batch_size is not None and batch_size % num_generations:
        raise ConfigError(f"grpo.num_generations {num_generations} does not divide the batch of {batch_size} "
                          f"completions; expected whole groups in every batch.")


# ----------------------------------------------------------------------------- the objective
def completion_logps(model, batch: dict, dropout_rng=None, temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """(log p(target) [B, T], entropy [B, T], no gradient) at `temperature`, float32, for a rollout batch."""
    logits = model(batch["input_ids"], position_ids=batch["positions"], segment_ids=batch["segment_ids"],
                   dropout_rng=dropout_rng)
    scaled = logits.astype(jnp.float32) / temperature  # TRL scores at the sampling temperature
    logps = token_logps(scaled, batch["targets"].astype(jnp.int32))
    scaled = jax.lax.stop_gradient(scaled)
    entropy = jax.nn.logsumexp(scaled, axis=-1) - (jax.nn.softmax(scaled, axis=-1) * scaled).sum(-1)
    return logps, entropy


def reference_logps(graphdef, params: dict, batch: dict, temperature: float = 1.0) -> jax.Array:
    """The reference's per-token log-probs [B, T]: the parameters with the LoRA adapters off."""
    return completion_logps(nnx.merge(graphdef, adapters_off(params)), batch, None, temperature)[0]


def grpo_loss_sums(graphdef, params: dict, batch: dict, dropout_rng=None, *, beta: float = 0.0,
                   epsilon_low: float = 0.2, epsilon_high: float = 0.2, loss_type: str = "grpo",
                   max_completion_length: int, temperature: float = 1.0, bias_correction_kl: bool = True) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(loss sum, count, metric sums) of one micro-batch of rollout rows (see the module docstring).

    batch: input_ids, targets, positions, segment_ids [B, T] (`rollout_batch`), completion_mask [B, T]
    float32 (1 where the target is a counted completion token), advantages [B], and optionally old_logps
    [B, T] (the sampling policy's; absent: this policy's, detached, TRL's on-policy case) and ref_logps
    [B, T] (absent and beta > 0: the parameters with the adapters off).
    bias_correction_kl: multiply the KL term by the ratio (TRL 1.16's use_bias_correction_kl, default on:
    the unbiased reverse-KL gradient of DeepSeek-V3.2; it changes the gradient even on-policy).
    Sequences are the rows with any real token (all-padding filler rows count for nothing).
    Metric sums (token sums; turn them into TRL's logged means with `grpo_metrics`): kl (when beta > 0),
    entropy, clip_ratio/low_mean, clip_ratio/high_mean, clip_ratio/region_mean, completion_tokens, sequences.
    """
    flat_keys = flatten(params)
    if beta > 0 and "ref_logps" not in batch and not any(k.endswith("/lora_b") for k in flat_keys):
        # Without adapters "adapters off" is the policy itself: the KL would be 0, silently.
        raise ConfigError("grpo.beta > 0 needs a reference: set model.lora_rank > 0 (the reference is then the base "
                          "with the adapters off) or give ref_logps in the batch.")
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"grpo.loss_type is {loss_type!r}, which is unknown; expected one of {', '.join(LOSS_TYPES)}.")
    logps, entropy = completion_logps(nnx.merge(graphdef, params), batch, dropout_rng, temperature)
    mask = batch["completion_mask"].astype(jnp.float32)
    advantages = batch["advantages"].astype(jnp.float32)[:, None]
    old = jax.lax.stop_gradient(batch["old_logps"] if "old_logps" in batch else logps)
    ratio = jnp.exp(logps - old)
    clipped = jnp.clip(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -jnp.minimum(ratio * advantages, clipped * advantages)
    metrics = {}
    if beta > 0:
        ref = batch["ref_logps"] if "ref_logps" in batch else reference_logps(graphdef, params, batch, temperature)
        ref = jax.lax.stop_gradient(ref)
        kl = jnp.exp(ref - logps) - (ref - logps) - 1
        if bias_correction_kl:
            kl = kl * ratio
        per_token = per_token + beta * kl
        metrics["kl"] = jax.lax.stop_gradient((kl * mask).sum())
    masked = per_token * mask
    sequences = (batch["segment_ids"] > 0).any(-1).astype(jnp.float32).sum()
    if loss_type == "grpo":
        total, count = (masked.sum(-1) / jnp.maximum(mask.sum(-1), 1.0)).sum(), sequences
    elif loss_type == "bnpo":
        total, count = masked.sum(), mask.sum()
    else:  # dr_grpo
        total, count = masked.sum() / max_completion_length, sequences
    low = ((ratio < 1 - epsilon_low) & (advantages < 0)).astype(jnp.float32)
    high = ((ratio > 1 + epsilon_high) & (advantages > 0)).astype(jnp.float32)
    metrics.update({
        "entropy": (entropy * mask).sum(),
        "clip_ratio/low_mean": (low * mask).sum(),
        "clip_ratio/high_mean": (high * mask).sum(),
        "clip_ratio/region_mean": (jnp.maximum(low, high) * mask).sum(),
        "completion_tokens": mask.sum(),
        "sequences": sequences,
    })
    return total, count, metrics


TOKEN_METRICS = ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")


def grpo_metrics(metric_sums: dict) -> dict[str, float]:
    """TRL's logged means from accumulated metric sums (raw, or all divided by the same count, as
    post_step.accumulate returns them): token metrics over completion tokens."""
    tokens = max(float(metric_sums["completion_tokens"]), 1e-30)
    out = {k: float(metric_sums[k]) / tokens for k in TOKEN_METRICS if k in metric_sums}
    return out


# ----------------------------------------------------------------------------- rollouts
def rollout_batch(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], eos_id: int,
                  pad_id: int, length: int, mask_truncated: bool = False) -> dict[str, np.ndarray]:
    """The objective's token arrays [B, length] for B (prompt, completion) pairs: prompt_ids[i] is the prompt
    of completion_ids[i] (the caller repeats each prompt once per completion of its group).

    Each completion is cut after its first EOS (kept and counted, as TRL does); one without EOS is
    truncated, and with mask_truncated its completion_mask row is zero (TRL's mask_truncated_completions).
    Row layout, TRL's: prompts left-padded so that every completion starts at the same column, then
    right padding; input_ids[t] predicts targets[t]; segment 1 = the real tokens, 0 = padding; positions
    count from 0 at each row's first real token. Returns input_ids, targets, positions, segment_ids
    (int32), completion_mask (float32, 1 where targets[t] is a counted completion token), truncated (bool [B]).
    """
    if len(prompt_ids) != len(completion_ids) or not prompt_ids:
        raise UserInputError(f"{len(prompt_ids)} prompts for {len(completion_ids)} completions; expected one prompt "
                             f"per completion, at least one.")
    if any(len(p) == 0 for p in prompt_ids):
        raise UserInputError("a prompt is empty; expected at least one token.")
    completions, truncated = [], []
    for ids in completion_ids:
        ids = list(ids)
        cut = ids.index(eos_id) + 1 if eos_id in ids else None
        completions.append(ids[:cut] if cut else ids)
        truncated.append(cut is None)
    prompt_width = max(len(p) for p in prompt_ids)
    needed = prompt_width + max(len(c) for c in completions) - 1
    if needed > length:
        raise UserInputError(f"a batch with prompts of up to {prompt_width} tokens and completions of up to "
                             f"{needed + 1 - prompt_width} needs length >= {needed}, got {length}.")
    rows = len(prompt_ids)
    full = np.full((rows, length + 1), pad_id, np.int32)
    real = np.zeros((rows, length + 1), bool)
    completion_mask = np.zeros((rows, length), np.float32)
    for r, (prompt, completion) in enumerate(zip(prompt_ids, completions)):
        start = prompt_width - len(prompt)
        end = prompt_width + len(completion)
        full[r, start:prompt_width], full[r, prompt_width:end] = prompt, completion
        real[r, start:end] = True
        if not (mask_truncated and truncated[r]):
            completion_mask[r, prompt_width - 1:end - 1] = 1.0
    segment_ids = real[:, :-1].astype(np.int32)
    positions = np.maximum(np.cumsum(segment_ids, axis=1) - 1, 0) * segment_ids
    return {"input_ids": full[:, :-1], "targets": full[:, 1:], "positions": positions.astype(np.int32),
            "segment_ids": segment_ids, "completion_mask": completion_mask, "truncated": np.array(truncated)}


def sample_completions(model, prompt_ids: Sequence[Sequence[int]], group_size: int, max_completion_length: int,
                       temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, eos_id: int | None = None
                       ) -> tuple[list[list[int]], list[bool]]:
    """group_size sampled completions of each prompt, in groups (prompt 0's first): (completion ids [N*G],
    truncated [N*G]). Completions are cut after their first EOS (kept); truncated: no EOS within
    max_completion_length. The same seed gives the same completions."""
    eos = model.config.eos_token_id if eos_id is None else eos_id
    repeated = [list(p) for p in prompt_ids for _ in range(group_size)]
    ids, mask = left_pad(repeated)
    out = generate(model, ids, mask, max_new_tokens=max_completion_length, temperature=temperature,
                   top_p=None if top_p >= 1.0 else top_p, seed=seed, eos_token_id=eos)
    completions, truncated = [], []
    for row in out[:, ids.shape[1]:].tolist():
        cut = row.index(eos) + 1 if eos in row else None
        completions.append(row[:cut] if cut else row)
        truncated.append(cut is None)
    return completions, truncated


def rollout_metrics(completion_ids: Sequence[Sequence[int]], truncated: Sequence[bool]) -> dict[str, float]:
    """TRL's completions/* metrics of one generation batch (lengths in tokens, EOS included)."""
    lengths = np.array([len(c) for c in completion_ids], np.float64)
    done = lengths[~np.asarray(truncated, bool)]
    return {"completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
            "completions/max_length": float(lengths.max()),
            "completions/clipped_ratio": float(np.mean(truncated)),
            "completions/mean_terminated_length": float(done.mean()) if done.size else 0.0,
            "completions/min_terminated_length": float(done.min()) if done.size else 0.0,
            "completions/max_terminated_length": float(done.max()) if done.size else 0.0}
