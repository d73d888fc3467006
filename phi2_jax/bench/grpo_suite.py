"""The `grpo` suite of `python -m phi2_jax.bench`, against TRL's GRPOTrainer with `--compare trl`.

The same weights (our Hugging Face export) and the same prompts (token ids built
once here: `batch` prompts of `prompt_tokens` random ids) on both sides, G
completions of each, temperature 1.0, top_p 1. Two cases, ours and TRL's
alternated (post_training.py's conventions otherwise):

    rollout  sampling G completions of every prompt from the current weights.
             ours    training/grpo.sample_completions (inference/generate.py's decoder).
             theirs  GRPOTrainer._generate_single_turn, its path without vLLM:
                     transformers' `generate` with the GenerationConfig TRL builds.
    step     rollout + reward + advantages + one optimizer update.
             ours    the chain of training/rollouts.py: sample_completions,
                     rollout_batch, group_advantages, then post_step.accumulate
                     over grpo_loss_sums (loss_type grpo, beta 0, epsilon 0.2, on-policy)
                     with the sft/dpo suites' clipping and AdamW, jitted.
             theirs  GRPOTrainer.training_step on one batch of its dataloader
                     (generation, reward, advantages, loss, backward), clipping,
                     the optimizer's step, zero_grad (trl_worker.py).

Every completion is exactly new_tokens long on both sides, so both count the
same new tokens: ours samples with no EOS (eos id -1), TRL's generation
config gets min_new_tokens = max_completion_length (its EOS logit is masked).
The reward is a completion's index in its group (0 .. G-1) on both sides: no
reward cost, and advantages that are not all zero. tokens/s counts new
(completion) tokens only, in both cases.

Before timing, both sides' loss, gradient norm and entropy are computed on the
same rollouts (ours, sampled from the initial weights; TRL's `_compute_loss` on
them as tests/test_grpo.py feeds it) and printed with whether they agree. On
policy the loss is -mean(advantages) = 0 up to rounding, so it is compared
with an absolute tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from phi2_jax.bench.post_training import RTOL, optimizer_steps
from phi2_jax.bench.suites import PeakRSS, TorchWorker, alternate, device_peak_memory_mb, _rows
from phi2_jax.training.grpo import grpo_metrics, group_advantages, rollout_batch, sample_completions
from phi2_jax.training.post_step import accumulate, objective_loss_sums

NO_EOS = -1  # no token ends a completion early: every one is new_tokens long
LOSS_ATOL = 1e-5  # the on-policy loss is 0 up to rounding on both sides


def group_index_rewards(prompts: int, generations: int) -> np.ndarray:
    """The bench's reward: each completion's index in its group, as trl_worker.py's reward function gives it."""
    return np.tile(np.arange(generations, dtype=np.float64), prompts)


class GRPOChain:
    """Our rollouts and steps (training/rollouts.py's chain, without the trainer's sharding and reward functions)."""

    def __init__(self, model, prompts: list[list[int]], generations: int, new_tokens: int):
        self.prompts, self.g, self.new_tokens = prompts, generations, new_tokens
        self.graphdef = nnx.split(model)[0]
        self.loss_sums = objective_loss_sums("grpo", self.graphdef, beta=0.0, epsilon_low=0.2, epsilon_high=0.2,
                                             loss_type="grpo", max_completion_length=new_tokens, temperature=1.0)
        self.update, self.state = optimizer_steps(model, self.loss_sums)
        self.seed = 0

    def sample(self, params) -> list[list[int]]:
        self.seed += 1  # a fresh sample each call, as each trainer step's seed differs
        completions, _ = sample_completions(nnx.merge(self.graphdef, params), self.prompts, self.g, self.new_tokens,
                                            1.0, 1.0, self.seed, NO_EOS)
        assert all(len(c) == self.new_tokens for c in completions)
        return completions

    def batch(self, completions: list[list[int]]) -> dict:
        """The objective's rows of these completions, rewards and advantages included, every leaf [1, rows, ...]."""
        prompt_len = len(self.prompts[0])
        rows = rollout_batch([p for p in self.prompts for _ in range(self.g)], completions, NO_EOS, 0,
                             prompt_len + self.new_tokens - 1)
        rows.pop("truncated")
        rows["advantages"] = group_advantages(group_index_rewards(len(self.prompts), self.g), self.g).advantages
        return {k: jnp.asarray(v)[None] for k, v in rows.items()}

    def rollout(self) -> None:
        self.sample(self.state["p"])

    def step(self) -> dict:
        return self.update(self.batch(self.sample(self.state["p"])))

    def check(self, batch: dict) -> dict:
        """Loss, gradient norm and entropy of the current parameters on `batch`, no update."""
        @jax.jit
        def figures(params, batch):
            grads, loss, metrics = accumulate(self.loss_sums, params, {}, batch, None, 1)
            return loss, optax.global_norm(grads), metrics

        loss, grad_norm, metrics = figures(self.state["p"], batch)
        return {"loss": float(loss), "grad_norm": float(grad_norm), "entropy": grpo_metrics(metrics)["entropy"]}


def rollouts_agree(ours: dict, theirs: dict, rtol: float) -> dict:
    """Both sides' figures on the same rollouts and whether they agree; printed, as a bench timing different
    work would be worthless."""
    figures = {key: [ours[key], theirs[key]] for key in ("loss", "grad_norm", "entropy")}
    agree = all(np.isclose(a, b, rtol=rtol, atol=LOSS_ATOL if key == "loss" else 0)
                for key, (a, b) in figures.items())
    line = ", ".join(f"{key} ours {a:.6g} trl {b:.6g}" for key, (a, b) in figures.items())
    print(f"grpo on the same rollouts: {line}: {'agree' if agree else 'DISAGREE'} (rtol {rtol:g}, loss atol "
          f"{LOSS_ATOL:g})", flush=True)
    return {**figures, "rtol": rtol, "agree": bool(agree)}


def bench_grpo(model, batch: int, prompt_tokens: int, generations: int, new_tokens: int, repeats: int,
               twin_dir: Path | None) -> list[dict]:
    """Rows of the rollout and step cases (ours, and TRL's when twin_dir holds our exported weights)."""
    rng = np.random.default_rng(5)
    prompts = [rng.integers(1, model.config.vocab_size, prompt_tokens).tolist() for _ in range(batch)]
    worker = None
    if twin_dir is not None:  # started first: TRL's setup runs while ours compiles (untimed, both)
        examples = {"prompts": prompts, "generations": generations, "new_tokens": new_tokens}
        (twin_dir / "grpo.json").write_text(json.dumps(examples))
        setup = {"suite": "grpo", "examples": str(twin_dir / "grpo.json"), "batch": batch, "work_dir": str(twin_dir),
                 "checkpointing": model.config.remat != "none"}
        worker = TorchWorker(twin_dir / "weights", model.config.compute_dtype, setup, script="trl_worker.py")
    ours = GRPOChain(model, prompts, generations, new_tokens)
    tokens = batch * generations * new_tokens
    check = None
    if worker:  # first, while both sides hold the initial weights
        completions = ours.sample(ours.state["p"])
        rows = ours.batch(completions)
        theirs = worker.ask(op="check", prompts=[p for p in prompts for _ in range(generations)],
                            completions=completions, advantages=np.asarray(rows["advantages"][0]).tolist())
        check = rollouts_agree(ours.check(rows), theirs, RTOL.get(model.config.compute_dtype, 2e-2))

    def their_rollout():
        assert worker.ask(op="rollout")["new_tokens"] == tokens, "TRL sampled other than new_tokens per completion"

    steps: dict[str, list[dict]] = {"ours": [], "theirs": []}
    with PeakRSS() as memory:
        rollout = alternate(ours.rollout, their_rollout if worker else None, repeats)
        step = alternate(lambda: steps["ours"].append(ours.step()),
                         (lambda: steps["theirs"].append(worker.run())) if worker else None, repeats)
    our_peak = {"peak_rss_mb": memory.peak_mb, "peak_device_mb": device_peak_memory_mb()}
    their_peak = worker.close() if worker else None  # the worker's peak over both cases
    g = f"{batch} prompts x G {generations}, prompt {prompt_tokens} + {new_tokens} new"
    out = (_rows("grpo", f"rollout: {g}", tokens, *rollout, our_peak, their_peak, theirs="trl")
           + _rows("grpo", f"step: {g}", tokens, *step, our_peak, their_peak, theirs="trl"))
    if worker:
        assert all(s["new_tokens"] == tokens for s in steps["theirs"]), "TRL's steps sampled other than new_tokens"
        out[0]["rollout_check"] = check
    return out
