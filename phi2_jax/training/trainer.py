"""One training run: the `Trainer` behind `python -m phi2_jax.train` (training/train_command.py).

    config -> mesh -> params + optimiser (sharded at init) -> Grain iterator
           -> jitted step -> progress / TensorBoard / checkpoints

train.objective picks what a batch holds and what the step computes: packed text (lm), packed SFT
examples with loss weights, DPO preference pairs, or GRPO rollouts sampled at every step
(training/rollouts.py). Resumes from the newest checkpoint in `run_dir` (checkpoints that do not fit the
config are refused, never overwritten); a SIGTERM to any process stops every process after the same
step, saves it once and exits 0; a non-finite loss or gradient stops the run before it can be saved.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from phi2_jax.config import RUNTIME_FIELDS
from phi2_jax.errors import ConfigError, UserInputError
from phi2_jax.training.preemption import StopAgreement, StopRequest
from phi2_jax.training.run_config import RunConfig, objective_options, row_length
from phi2_jax.training.run_lock import RunLock
from phi2_jax.training.run_log import PLOTTED_REWARDS, RunLog, reward_summary

log = logging.getLogger("phi2_jax.training.trainer")

SAMPLE_PROMPTS = ("def fibonacci(n):\n", "import os\n\n\ndef list_files(path):\n", "class Stack:\n    def __init__(self):\n")


class TrainingDiverged(UserInputError):
    """The loss or gradient became NaN or infinite (the config's learning rate, usually): the run stops unsaved."""


class Trainer:
    """One training run: data, mesh, compiled steps and checkpoints for a validated `RunConfig`."""

    def __init__(self, config: RunConfig, model_config, stop: StopRequest | None = None):
        """`stop`: set by the command's SIGTERM handler; without one the run only ends at `train.steps`."""
        import jax

        from phi2_jax.data.pipeline import build_splits, train_dataset
        from phi2_jax.training.optim import make_optimizer
        from phi2_jax.sharding import make_mesh
        from phi2_jax.training.step import build_steps, tuned_for_backend

        self.config, self.jax = config, jax
        t = config.train
        self.is_main = jax.process_index() == 0
        self.mesh = make_mesh(config.mesh)
        self.model_config = model_config
        d = config.data
        self.objective = t.objective
        # Everything that can refuse the config runs before run_dir is created.
        if self.objective == "lm":
            self.splits = build_splits(d.sources, d.tokenizer, d.seq_len, d.val_fraction, self.model_config.vocab_size,
                                       d.max_documents, jax.process_index(), jax.process_count())
        elif self.objective == "grpo":
            from phi2_jax.training.rollouts import grpo_splits

            from phi2_jax.training.rewards import RewardSet

            self.splits, self._prompt_records, self._prompt_ids = grpo_splits(config, self._tokenizer(False))
            self._rewards = RewardSet.from_specs(config.grpo.rewards, timeout_s=config.grpo.reward_timeout)
        else:
            self.splits = self._post_training_splits()
        pc = jax.process_count()
        self.local_batch = t.batch_size // pc
        # GRPO's rows are prompts, each sampled grpo.num_generations times: the batch counts completions.
        per_row = config.grpo.num_generations if self.objective == "grpo" else 1
        if self.local_batch % per_row:
            raise ConfigError(f"train.batch_size {t.batch_size} completions over {pc} processes is not a whole number "
                              f"of prompts of grpo.num_generations {per_row} completions per process.")
        self.dataset = train_dataset(self.splits, self.local_batch // per_row, d.shuffle_seed, jax.process_index(), pc,
                                     d.workers)
        # GRPO scores held-out prompts itself; full-fine-tune DPO builds them after its reference pass (_run).
        self.val_batches = ([] if self.objective == "grpo" or self._needs_reference_pass()
                            else self._validation_batches())
        self.tx, self.schedule = make_optimizer(config.optim, t.steps)
        options = objective_options(config)
        self.steps = build_steps(tuned_for_backend(self.model_config, jax.default_backend()), self.mesh, self.tx,
                                 self.schedule, t.seed, t.grad_accum, config.optim.z_loss, self.objective, options)
        self._starting_params = None  # the reference pass's parameters, reused as the first step's
        self.run_dir = Path(config.run_dir)
        self.run_log = RunLog(self.run_dir, self.is_main, self.objective)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.stop = stop or StopRequest()
        self.agreement = StopAgreement()

    def _tokenizer(self, writes_eos_as_text: bool):
        from phi2_jax.data.post_data import post_tokenizer

        tokenizer = post_tokenizer(self.config.data.tokenizer, self.config.checkpoint.init_from, writes_eos_as_text)
        if tokenizer.vocab_size > self.model_config.vocab_size:
            raise ConfigError(f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} tokens but the model's "
                              f"vocab_size is {self.model_config.vocab_size}; expected the model's own tokenizer.")
        return tokenizer

    def _post_training_splits(self):
        """SFT / DPO rows from records in TRL's conventions (data/post_data.py)."""
        from phi2_jax.data.post_data import build_post_splits, chat_template

        cfg, d = self.config, self.config.data
        tokenizer = self._tokenizer(True)
        template = chat_template(d.chat_template, tokenizer, cfg.checkpoint.init_from)
        return build_post_splits(d.sources, tokenizer, template, self.objective,
                                 d.seq_len, d.val_fraction, d.fields, cfg.sft.count_prompt, d.max_documents)

    def _grpo_rollouts(self):
        from phi2_jax.training.rollouts import GRPORollouts

        g = self.config.grpo
        # Full fine-tuning keeps the start as the KL reference: a frozen copy (with LoRA: the adapters off).
        reference = self._initial_params() if g.beta > 0 and not self.model_config.lora_rank else None
        return GRPORollouts(self.config, self._prompt_records, self._prompt_ids, self.splits.tokenizer, self._rewards,
                            self.steps.graphdef, self.mesh, reference)

    def _validation_batches(self) -> list:
        from phi2_jax.data.pipeline import validation_batches

        jax = self.jax
        return validation_batches(self.splits, self.local_batch, self.config.train.eval_batches, jax.process_index(),
                                  jax.process_count())

    def _carried_chat_template(self):
        """GRPO renders no template, but a run it starts from may have trained one (SFT): it is kept with this run
        so exports still render conversations as the model learned them. None when there is none to carry."""
        source = self.config.checkpoint.init_from
        if self.objective != "grpo" or not source or not (Path(source) / "chat_template.jinja").is_file():
            return None
        from phi2_jax.data.chat import load_chat_template

        return load_chat_template(source)

    def _model_flops_per_step(self) -> float:
        """The model FLOPs of a trainer step, for MFU. GRPO's step is grpo.num_iterations updates on rollout rows
        (prompt + completion) plus the log-prob passes outside them; sampling's own work is not counted."""
        from phi2_jax.training.metrics import run_update_flops, train_flops_per_token

        cfg = self.config
        if self.objective != "grpo":
            return run_update_flops(cfg, self.model_config)
        g, row = cfg.grpo, row_length(cfg)
        forward = train_flops_per_token(self.model_config, row) / 3 * cfg.train.batch_size * row
        outside = (g.num_iterations > 1) + (g.beta > 0 and not self.model_config.lora_rank)  # old; frozen copy's
        return g.num_iterations * run_update_flops(cfg, self.model_config) + outside * forward

    def _needs_reference_pass(self) -> bool:
        return self.objective == "dpo" and self.model_config.lora_rank == 0

    # ------------------------------------------------------------------ state
    def _initial_params(self):
        if self._starting_params is not None:  # loaded for the reference pass; used once
            params, self._starting_params = self._starting_params, None
            return params
        from flax import nnx

        from phi2_jax.model.transformer import create_model

        source, seed = self.config.checkpoint.init_from, self.config.train.seed
        if not source:
            return nnx.to_pure_dict(nnx.state(create_model(self.model_config, mesh=self.mesh, seed=seed)))
        from phi2_jax.hf.layout import flatten, unflatten
        from phi2_jax.hf.loading import from_pretrained

        runtime = {k: getattr(self.model_config, k) for k in RUNTIME_FIELDS if k not in ("param_dtype",)}
        base = from_pretrained(source, mesh=self.mesh, dtype=self.model_config.param_dtype, **{**runtime, "lora_rank": 0})
        log.info("initialised from %s", source)
        params = nnx.to_pure_dict(nnx.state(base))
        if self.model_config.lora_rank:  # the base weights come from the source; adapters start fresh (B = 0)
            fresh = nnx.to_pure_dict(nnx.state(create_model(self.model_config, mesh=self.mesh, seed=seed)))
            params = unflatten({**flatten(fresh), **flatten(params)})
        return params

    def _global_batch(self, local: dict) -> dict:
        """This process's rows -> one global array per key, split [grad_accum, micro, T] over the mesh."""
        from phi2_jax.training.step import batch_sharding

        jax, t = self.jax, self.config.train
        out = {}
        for key, value in local.items():
            value = value.reshape(t.grad_accum, self.local_batch // t.grad_accum, *value.shape[1:])
            shape = (t.grad_accum, t.batch_size // t.grad_accum, *value.shape[2:])
            out[key] = jax.make_array_from_process_local_data(batch_sharding(self.mesh, value.ndim), value, shape)
        return out

    def _eval_batch(self, local: dict) -> dict:
        from phi2_jax.training.step import batch_sharding

        jax = self.jax
        return {k: jax.make_array_from_process_local_data(batch_sharding(self.mesh, v.ndim, accumulated=False), v,
                                                          (self.config.train.batch_size, *v.shape[1:]))
                for k, v in local.items()}

    def evaluate(self, params) -> dict[str, float] | None:
        """{'loss': ...} on the held-out batches (post-training adds its metrics, e.g. rewards/accuracies;
        GRPO: {'reward': ...} of greedy completions of held-out prompts)."""
        if self.objective == "grpo":
            t = self.config.train
            count = t.eval_batches * t.batch_size // self.config.grpo.num_generations
            return self.rollouts.held_out(params, self.splits.validation.rows["index"][:count].tolist()) or None
        if not self.val_batches:
            return None
        results = [self.jax.device_get(self.steps.eval_loss(params, self._eval_batch(b))) for b in self.val_batches]
        if self.objective == "lm":
            return {"loss": sum(float(r) for r in results) / len(results)}
        # Sums over every held-out row divided once: completion tokens (SFT) or pairs (DPO).
        count = max(sum(float(r["count"]) for r in results), 1.0)
        return {k: sum(float(r[k]) for r in results) / count for k in results[0] if k != "count"}

    # ------------------------------------------------------------------ loop
    def run(self) -> dict:
        """Resumes or initialises, trains to `train.steps` (or an agreed stop), and returns a summary.

        Holds `run_dir/train.lock` (process 0) for its duration, so a second trainer on the folder is refused.
        """
        lock = RunLock(self.run_dir)
        error = None
        if self.is_main:
            try:
                lock.acquire()
            except ConfigError as refused:
                error = refused
        # Every process learns process 0's outcome, so none goes on alone into the step's collectives.
        if self.agreement.any(error is not None):
            raise error or ConfigError(f"process 0 could not take the lock of {self.run_dir}; its log says why.")
        try:
            return self._run()
        finally:
            lock.release()

    def _run(self) -> dict:
        from phi2_jax.checkpoint.run_checkpoints import RunCheckpoints

        cfg, t = self.config, self.config.train
        if cfg.checkpoint.restart:
            self._set_previous_run_aside()
        checkpoints = RunCheckpoints(self.run_dir, cfg.checkpoint.keep, cfg.checkpoint.async_save)
        try:
            if self._needs_reference_pass():  # before the iterator reads a row: the log-probs ride in the rows
                if checkpoints.steps():  # a resume this config may not make is refused before the pass rewrites
                    self._refuse_other_run(checkpoints)  # the run's reference_logps.npz
                from phi2_jax.training.reference import attach_reference_logps

                self._starting_params = attach_reference_logps(
                    self.splits, self.run_dir, self._initial_params, self.steps.graphdef, self.mesh, t.batch_size,
                    self.is_main, start=json.dumps([cfg.checkpoint.init_from, self.model_config.to_dict()],
                                                   sort_keys=True, default=str))
                self.val_batches = self._validation_batches()
            iterator = iter(self.dataset)
            start, params, opt_state = self._resume_or_initialise(checkpoints, iterator)
            self._starting_params = None  # a resume restored its own: no second copy of the weights held
            if self.objective == "grpo":
                self.rollouts = self._grpo_rollouts()
            result = {"step": start, "seconds": 0.0, "final_loss": None, "steps_run": 0}
            if start >= t.steps:
                self.run_log.say(f"{self.run_dir} is already at step {start} (train.steps {t.steps}): nothing to "
                                 f"train; config.json is left as it is.")
                return result
            if self.agreement.any(self.stop.requested):
                self.run_log.say("SIGTERM before the first step: nothing to save; exiting.")
                return result
            return self._train(checkpoints, iterator, start, params, opt_state)
        finally:
            checkpoints.close()

    def _set_previous_run_aside(self) -> None:
        """checkpoint.restart: moves an earlier run's checkpoints and logs to run_dir/replaced-<time>/ (kept)."""
        names = ("checkpoints", "checkpoints_damaged", "metrics.jsonl", "config.json", "events", "loss_curve.png",
                 "reference_logps.npz")
        present = [name for name in names if (self.run_dir / name).exists()]
        if present:
            aside = self.run_dir / time.strftime("replaced-%Y%m%d-%H%M%S", time.gmtime())
            if self.is_main:
                aside.mkdir()
                for name in present:
                    (self.run_dir / name).rename(aside / name)
            if self.jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("phi2_jax: previous run set aside")
            self.run_log.say(f"checkpoint.restart=true: moved the previous run's {', '.join(present)} to {aside}; "
                      f"starting at step 0")

    def _refuse_other_run(self, checkpoints) -> tuple[dict, str]:
        """Raises ConfigError when the run's newest checkpoint cannot be read or was trained with settings this
        config may not change; else (the saved run config, the remedy sentence for later refusals)."""
        from phi2_jax.training.resume import describe, fixed_differences

        cfg, steps = self.config, checkpoints.steps()
        remedy = ("resume with the run's settings, use another run_dir, or pass checkpoint.restart=true to start "
                  f"afresh here (which moves the old checkpoints to {self.run_dir}/replaced-<time>/, deleting nothing)")
        newest = checkpoints.newest_meta()
        if newest is None:
            raise ConfigError(f"none of the checkpoints in {checkpoints.directory} (steps "
                              f"{', '.join(map(str, steps))}) can be read; nothing was changed; {remedy}.")
        newest_step, meta = newest
        saved_run, saved_model = meta.get("run_config", {}), meta.get("model_config", {})
        where = checkpoints.directory / str(newest_step)
        saved_workers = saved_run.get("data", {}).get("workers", cfg.data.workers)
        if saved_workers != cfg.data.workers:  # Grain's iterator state differs with and without workers
            raise ConfigError(f"{self.run_dir} was trained with data.workers={saved_workers}; resume it with the same "
                              f"value (got {cfg.data.workers}) so the data iterator continues where it stopped.")
        fixed = fixed_differences(saved_run, cfg.to_dict(), saved_model, self.model_config.to_dict())
        if fixed:
            raise ConfigError(f"this config differs from the run in {where}: {describe(fixed, 'there', 'here')}; "
                              f"nothing was changed; {remedy}.")
        return saved_run, remedy

    def _resume_or_initialise(self, checkpoints, iterator):
        """(start step, params, opt_state): restored from the run's checkpoints, or fresh if there are none.

        Checkpoints that do not fit this config, or of which none can be read, are refused with a sentence and
        left as they are: training afresh would push them out of `keep`.
        """
        from phi2_jax.training.resume import describe, run_time_differences

        cfg = self.config
        steps = checkpoints.steps()
        if not steps:
            stale = self.run_dir / "metrics.jsonl"
            if stale.exists() and self.is_main:  # an earlier start that saved no checkpoint: kept, out of the way
                kept = stale.with_name(time.strftime("metrics-unsaved-%Y%m%d-%H%M%S.jsonl", time.gmtime()))
                stale.rename(kept)
                log.warning("%s: no checkpoint to resume from; the earlier start's metrics were moved to %s",
                            self.run_dir, kept.name)
            params = self._initial_params()
            return 0, params, self.steps.init_opt(params)
        saved_run, remedy = self._refuse_other_run(checkpoints)
        restored = checkpoints.restore_latest(self.steps.abstract_params, self.steps.abstract_opt_state)
        if restored is None:
            raise ConfigError(f"none of the checkpoints in {checkpoints.directory} (steps "
                              f"{', '.join(map(str, steps))}) could be restored (the warnings above say why); "
                              f"nothing was changed; {remedy}.")
        start, params, opt_state, data_state, _ = restored
        try:
            iterator.set_state(data_state)
        except Exception as error:  # Grain raises several types for a state that is not its own
            raise ConfigError(f"the data iterator state in {checkpoints.directory / str(start)} does not fit this "
                              f"data pipeline ({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''});"
                              f" was data.sources or data.seq_len changed?") from None
        self.run_log.say(f"resumed from step {start} in {checkpoints.directory}")
        changed = run_time_differences(saved_run, cfg.to_dict())
        if changed and start < cfg.train.steps:
            self.run_log.say(f"applying settings that differ from the run's: {describe(changed)}")
            if any(key in ("train.steps", "optim.warmup_steps") for key, _, _ in changed):
                self.run_log.say(f"the learning-rate schedule now spans {cfg.train.steps} steps, "
                          f"{cfg.optim.warmup_steps} of warmup (lr {float(self.schedule(start)):.3e} at step {start})")
        elif changed:
            self.run_log.say(f"not applied (nothing to train): {describe(changed)}")
        return start, params, opt_state

    def _train(self, checkpoints, iterator, start, params, opt_state) -> dict:
        from phi2_jax.training.metrics import EventWriter, device_peak_flops, plot_loss_curve, progress_line

        jax, cfg, t = self.jax, self.config, self.config.train
        if self.is_main:
            (self.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        meta = {"model_config": self.model_config.to_dict(), "run_config": cfg.to_dict(),
                "tokenizer": self.splits.tokenizer.source}
        template = getattr(self.splits, "template", None) or self._carried_chat_template()
        if template is not None:  # exports write it, so apply_chat_template gives the text trained on
            meta["chat_template"] = template.template
            if self.is_main:
                from phi2_jax.data.chat import save_chat_template

                save_chat_template(template, self.run_dir)
        events = EventWriter(self.run_dir, self.is_main)
        history = self.run_log.history(start)
        peak, peak_source = device_peak_flops(self.model_config.compute_dtype)
        flops_per_step = self._model_flops_per_step()
        row = row_length(cfg)  # tokens/s counts every token of a row
        self.run_log.say(f"model {self.model_config.num_params():,} params | mesh {dict(self.mesh.shape)} | "
                  f"{jax.device_count()} devices, {jax.process_count()} processes | peak {peak / 1e9:,.1f} GFLOP/s "
                  f"per device ({peak_source})")

        if self.objective == "grpo" and start == 0:  # the reward curve's starting point
            self.run_log.held_out(0, self.evaluate(params) or {}, events, history)
        step, window_start, window_steps = start, time.perf_counter(), 0
        run_start = time.perf_counter()
        stop_vote, stopping = None, False
        try:
            while step < t.steps:
                if self.objective == "grpo":
                    params, opt_state, metrics, rollout = self._grpo_step(params, opt_state, next(iterator), step)
                else:
                    batch = self._global_batch(next(iterator))
                    params, opt_state, metrics = self.steps.train_step(params, opt_state, batch, step)
                    rollout = {}
                step += 1
                window_steps += 1
                if step % t.log_every == 0 or step == t.steps:
                    metrics = jax.device_get(metrics)
                    self._refuse_non_finite(metrics, step, checkpoints)
                    elapsed = time.perf_counter() - window_start
                    tokens_per_s = window_steps * t.batch_size * row / elapsed
                    mfu = window_steps * flops_per_step / elapsed / (peak * jax.device_count())
                    eta = (t.steps - step) * elapsed / window_steps
                    # Post-training's own metrics, named as TRL logs them (rewards/margins, logps/chosen, ...).
                    extra = {k: float(v) for k, v in metrics.items() if "/" in k}
                    if self.objective == "grpo":
                        from phi2_jax.training.grpo import grpo_metrics

                        extra = {**grpo_metrics(self.jax.device_get(metrics)), **rollout}
                    self.run_log.say(progress_line(step, t.steps, float(metrics["loss"]), float(metrics["lr"]),
                                            float(metrics["grad_norm"]), tokens_per_s, mfu, eta) + reward_summary(extra))
                    values = {"train/loss": float(metrics["loss"]), "train/lr": float(metrics["lr"]),
                              "train/grad_norm": float(metrics["grad_norm"]), "perf/tokens_per_s": tokens_per_s,
                              "perf/mfu": mfu, **{f"train/{k}": v for k, v in extra.items()}}
                    events.scalars(step, values)
                    history["train"].append((step, float(metrics["loss"])))
                    for key in PLOTTED_REWARDS:
                        if key in extra:
                            history.setdefault(key, []).append((step, extra[key]))
                    self.run_log.append({"step": step, **values})
                    window_start, window_steps = time.perf_counter(), 0
                if step % t.eval_every == 0 or step == t.steps:
                    held_out = self.evaluate(params)
                    if held_out is not None:
                        self.run_log.held_out(step, held_out, events, history)
                # Every process reads the vote cast one step earlier, so all stop after the same step; reading
                # last step's (not this step's) vote keeps the host a step ahead of the device.
                if self.agreement.multi and jax.default_backend() == "cpu":
                    # gloo: the vote's all-reduce, in flight beside the step's collectives, can pair with them in
                    # another order on each process ("Received data size doesn't match"): vote after the step.
                    jax.block_until_ready(metrics)
                    stopping = self.agreement.any(self.stop.requested)
                else:
                    stopping = self.stop.requested if not self.agreement.multi else (
                        stop_vote is not None and self.agreement.read(stop_vote))
                    if self.agreement.multi and not stopping:
                        stop_vote = self.agreement.cast(self.stop.requested)
                if step % cfg.checkpoint.every == 0 or step == t.steps or stopping:
                    self._refuse_non_finite(metrics, step, checkpoints)
                    checkpoints.save(step, params, opt_state, iterator.get_state(), {**meta, "step": step})
                if stopping:
                    break
            if stopping:
                self.run_log.say(f"SIGTERM: saved a checkpoint at step {step}; exiting")
            checkpoints.wait()
        finally:
            events.close()
        result = {"step": step, "seconds": time.perf_counter() - run_start, "steps_run": step - start,
                  "final_loss": history["train"][-1][1] if history["train"] else None}
        if step >= t.steps:
            if self.is_main:
                plot_loss_curve(history, self.run_dir / "loss_curve.png", self.objective)
                self.run_log.say(f"loss curve: {self.run_dir / 'loss_curve.png'}")
            if t.samples:
                host_params = self._fetch(params)  # every process takes part in gathering a global array
                if self.is_main:
                    self._print_samples(host_params)
        return result

    def _grpo_step(self, params, opt_state, prompts: dict, step: int):
        """One rollout batch and grpo.num_iterations updates on it: (params, opt_state, metrics, rollout info)."""
        batch, rollout = self.rollouts.batch(params, prompts["index"], step, self._global_batch)
        passes = []
        for _ in range(self.config.grpo.num_iterations):
            params, opt_state, metrics = self.steps.train_step(params, opt_state, batch, step)
            passes.append(metrics)
        if len(passes) > 1:  # the mean over the passes, as TRL's logs average its steps; finite only if all were
            finite = passes[0]["finite"]
            for m in passes[1:]:
                finite = finite & m["finite"]
            metrics = self.jax.tree.map(lambda *values: sum(values) / len(values),
                                        *[{k: v for k, v in m.items() if k != "finite"} for m in passes])
            metrics["finite"] = finite
        return params, opt_state, metrics, rollout

    def _refuse_non_finite(self, metrics: dict, step: int, checkpoints) -> None:
        """Stops before a non-finite step can be logged or saved: the newest checkpoint stays the last finite one."""
        if bool(self.jax.device_get(metrics["finite"])):
            return
        checkpoints.wait()
        saved = checkpoints.steps()
        values = self.jax.device_get(metrics)
        raise TrainingDiverged(
            f"training diverged at step {step}: loss {float(values['loss'])}, gradient norm "
            f"{float(values['grad_norm'])} (lr {float(values['lr']):.3e}); stopped without saving it, so the newest "
            f"checkpoint is {'step ' + str(saved[-1]) if saved else 'none'}; lower optim.lr (now "
            f"{self.config.optim.lr}) or lengthen optim.warmup_steps, and resume.")

    def _fetch(self, params):
        """Host copies of the (possibly multi-process, sharded) parameters, one leaf replicated at a time."""
        import numpy as np

        jax = self.jax
        if jax.process_count() == 1:
            return jax.device_get(params)
        from jax.sharding import NamedSharding, PartitionSpec

        replicate = jax.jit(lambda x: x, out_shardings=NamedSharding(self.mesh, PartitionSpec()))
        return jax.tree.map(lambda x: np.asarray(replicate(x)), params)

    def _print_samples(self, params) -> None:
        from flax import nnx

        from phi2_jax.inference.greedy import greedy_complete

        model = nnx.merge(self.steps.graphdef, params)
        tok = self.splits.tokenizer
        # Post-training shows what it was taught: held-out prompts as the chat template renders them.
        prompts = getattr(self.splits, "sample_prompts", None) or [tok.encode(p) for p in SAMPLE_PROMPTS]
        print("samples (greedy):", flush=True)
        for prompt in prompts:
            ids = greedy_complete(model, prompt, 48, tok.eos_id)
            print("-" * 60 + "\n" + tok.decode(prompt) + tok.decode(ids), flush=True)
