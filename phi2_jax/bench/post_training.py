"""The post-training suites of `python -m phi2_jax.bench`: `sft` and `dpo`, against TRL with `--compare trl`.

Each times one full optimizer step on one batch, the same examples (token ids
built once here) and the same weights (our Hugging Face export) on both sides:

    ours    training/post_step.accumulate over the rows (data/post_batches.py:
            pack_examples / preference_rows) with the objective's loss sums
            (training/objectives.py), global-norm clipping at 1.0 and AdamW
            (lr 1e-4, weight decay 0.1 off biases and LayerNorms: training/optim.py's
            mask), jitted, parameters and optimizer state donated.
    theirs  TRL's trainer's step as transformers' Trainer takes it
            (bench/trl_worker.py: training_step, gradient clipping at 1.0, the
            Trainer's AdamW with the same settings, zero_grad).

    sft  completion-only loss; each example fills one row of seq + 1 tokens
         (a prompt of a quarter to a half of it, the completion after), so
         packing and TRL's padding both leave no padding: the same positions
         on both sides.
    dpo  loss_type sigmoid, beta 0.1, full fine-tuning; the reference
         log-probs are computed once before the timed steps (ours by a forward
         pass of the initial model, TRL's by precompute_ref_log_probs) and read
         from the batch. Each of a pair's rows is seq + 1 tokens (the prompt
         as above, chosen and rejected of equal length), so one step is a
         forward and backward pass over 2 x batch rows of seq.

The dropout is off on both sides (config resid_pdrop 0) so that the first
step is deterministic: each run checks that both sides' first-step loss and
gradient norm (and for dpo the policy's log-probs) agree, and prints it.

Adding a suite: a builder returning a `PostCase`, registered in POST_SUITES,
and its trainer in trl_worker.make_trainer. grpo, whose work is not one step on
a fixed batch, has rows of its own (grpo_suite.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from phi2_jax.bench.suites import PeakRSS, TorchWorker, alternate, device_peak_memory_mb, _rows
from phi2_jax.data.formats import Example, PreferencePair
from phi2_jax.data.post_batches import pack_examples, preference_rows
from phi2_jax.training.metrics import train_flops_per_token
from phi2_jax.training.objectives import pair_logps
from phi2_jax.training.optim import decay_mask
from phi2_jax.training.post_step import accumulate, objective_loss_sums

EOS = 0  # the presets' eos_token_id; also the padding id (nothing is padded here)
RTOL = {"float32": 1e-4, "bfloat16": 2e-2}  # first-step agreement; bfloat16 compute rounds at ~4e-3


@dataclasses.dataclass
class PostCase:
    """One post-training suite's work, built once and given to both sides."""

    suite: str
    case: str                     # the table's case column
    tokens: int                   # input positions one step trains on
    batch: dict                   # ours: every leaf [1 micro-batch, rows, seq]
    loss_sums: Callable           # post_step.objective_loss_sums(...)
    examples: list[dict]          # the same examples as token ids, for trl_worker.py
    checked: tuple[str, ...]      # what both sides' first steps must agree on


def prompt_lengths(rng: np.random.Generator, batch: int, seq: int) -> np.ndarray:
    return rng.integers(max(1, seq // 4), max(2, seq // 2 + 1), batch)


def sft_case(model, batch: int, seq: int) -> PostCase:
    rng = np.random.default_rng(3)
    examples = []
    for prompt in prompt_lengths(rng, batch, seq):
        ids = rng.integers(1, model.config.vocab_size, seq + 1).astype(np.int32)
        ids[-1] = EOS
        examples.append(Example(ids, (np.arange(seq + 1) >= prompt).astype(np.float32)))
    rows = pack_examples(examples, seq, EOS)
    assert rows["input_ids"].shape == (batch, seq)  # one example per row: the same positions as TRL's batch
    return PostCase("sft", f"batch {batch} x seq {seq}, completion-only", batch * seq,
                    {k: jnp.asarray(v)[None] for k, v in rows.items()},
                    objective_loss_sums("sft", nnx.split(model)[0]),
                    [{"ids": e.ids.tolist(), "completion_mask": e.weights.astype(int).tolist()} for e in examples],
                    ("loss", "grad_norm"))


def dpo_case(model, batch: int, seq: int) -> PostCase:
    rng = np.random.default_rng(4)
    pairs = []
    for prompt in prompt_lengths(rng, batch, seq):
        chosen, rejected = (np.append(rng.integers(1, model.config.vocab_size, seq - prompt), EOS) for _ in range(2))
        pairs.append(PreferencePair(rng.integers(1, model.config.vocab_size, prompt).astype(np.int32),
                                    chosen.astype(np.int32), rejected.astype(np.int32)))
    rows = {k: jnp.asarray(v) for k, v in preference_rows(pairs, seq, EOS).items()}
    # The reference: the initial model's log-probs, computed once (TRL: precompute_ref_log_probs).
    graphdef, state = nnx.split(model)
    ref_chosen, ref_rejected = jax.jit(lambda s, b: pair_logps(nnx.merge(graphdef, s), b))(state, rows)
    rows.update(ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected)
    return PostCase("dpo", f"{batch} pairs x seq {seq}, sigmoid", 2 * batch * seq,
                    {k: v[None] for k, v in rows.items()},
                    objective_loss_sums("dpo", graphdef, beta=0.1, loss_type="sigmoid"),
                    [{"prompt": p.prompt.tolist(), "chosen": p.chosen.tolist(), "rejected": p.rejected.tolist()}
                     for p in pairs],
                    ("loss", "grad_norm", "logps/chosen", "logps/rejected"))


POST_SUITES: dict[str, Callable[..., PostCase]] = {"sft": sft_case, "dpo": dpo_case}


def optimizer_steps(model, loss_sums: Callable) -> tuple[Callable[[dict], dict], dict]:
    """(step(batch): one optimizer step on a batch, updating the parameters in place, returning its loss and
    metrics; the state {"p": parameters, "o": optimizer state} it updates)."""
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4, weight_decay=0.1, mask=decay_mask))
    params = jax.tree.map(jnp.copy, nnx.to_pure_dict(nnx.state(model)))  # donated; the model keeps its own
    state = {"p": params, "o": tx.init(params)}

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, batch):
        grads, loss, metrics = accumulate(loss_sums, params, {}, batch, None, 1)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {**metrics, "loss": loss,
                                                                 "grad_norm": optax.global_norm(grads)}

    def run(batch: dict) -> dict:
        state["p"], state["o"], metrics = step(state["p"], state["o"], batch)
        return {k: float(v) for k, v in metrics.items()}  # float() waits for the step

    return run, state


def our_step(model, case: PostCase) -> Callable[[], dict]:
    """One optimizer step per call on `case.batch`, updating the parameters in place; returns its loss and metrics."""
    run, _ = optimizer_steps(model, case.loss_sums)
    return lambda: run(case.batch)


def first_steps_agree(case: PostCase, ours: dict, theirs: dict, rtol: float) -> dict:
    """Both sides' first-step figures and whether they agree within rtol; printed, as a bench timing different
    work would be worthless."""
    figures = {key: [ours[key], theirs[key]] for key in case.checked}
    agree = all(np.isclose(a, b, rtol=rtol, atol=0) for a, b in figures.values())
    line = ", ".join(f"{key} ours {a:.6g} trl {b:.6g}" for key, (a, b) in figures.items())
    print(f"{case.suite} first step: {line}: {'agree' if agree else 'DISAGREE'} (rtol {rtol:g})", flush=True)
    return {**figures, "rtol": rtol, "agree": bool(agree)}


def bench_post(suite: str, model, batch: int, seq: int, repeats: int, twin_dir: Path | None, peak: float
               ) -> list[dict]:
    """Rows for one post-training suite (ours, and TRL's when twin_dir holds our exported weights)."""
    case = POST_SUITES[suite](model, batch, seq)
    worker = None
    if twin_dir is not None:  # started first: TRL's setup runs while our step compiles (untimed, both)
        (twin_dir / f"{suite}.json").write_text(json.dumps(case.examples))
        setup = {"suite": suite, "examples": str(twin_dir / f"{suite}.json"), "batch": batch, "work_dir": str(twin_dir),
                 "checkpointing": model.config.remat != "none"}
        worker = TorchWorker(twin_dir / "weights", model.config.compute_dtype, setup, script="trl_worker.py")
    first: dict[str, list[dict]] = {"ours": [], "theirs": []}
    run = our_step(model, case)
    ours = lambda: first["ours"].append(run())  # noqa: E731  (every step's figures; the first one is checked)
    with PeakRSS() as memory:
        a, b = alternate(ours, (lambda: first["theirs"].append(worker.run())) if worker else None, repeats)
    our_peak = {"peak_rss_mb": memory.peak_mb, "peak_device_mb": device_peak_memory_mb()}
    their_peak = worker.close() if worker else None
    flops = train_flops_per_token(model.config, seq) * case.tokens
    rows = _rows(suite, case.case, case.tokens, a, b, our_peak, their_peak, mfu_s=flops / peak, theirs="trl")
    rows[0]["first_step_loss"] = first["ours"][0]["loss"]
    if worker:
        rows[0]["first_step_check"] = first_steps_agree(case, first["ours"][0], first["theirs"][0],
                                                        RTOL.get(model.config.compute_dtype, 2e-2))
        rows[1]["first_step_loss"] = first["theirs"][0]["loss"]
    return rows
