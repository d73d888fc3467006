"""GRPO in the trainer: prompts -> groups sampled from the current policy -> rewards -> advantages -> the batch.

One trainer step (train.objective grpo):
    the step's prompts (Grain, checkpointed like any batch; every process learns the whole step's list)
      -> num_generations completions each, sampled by our decoder from the current parameters on the mesh
         (`grpo.sample_completions`), seeded by (train.seed, step): a resumed run samples what the
         uninterrupted one did
      -> each process scores its share of the completions with the reward functions (the sandbox for code),
         and every process receives all rewards, so the advantages are computed alike everywhere
      -> `grpo.rollout_batch` rows (fixed length: max_prompt_length + max_completion_length, one compile),
         with the sampling policy's per-token log-probs when num_iterations > 1 and the frozen reference's
         when beta > 0 without LoRA (with LoRA the loss turns the adapters off itself)
      -> num_iterations optimiser updates on that batch (the trainer's loop).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from phi2_jax.training.grpo import group_advantages, rollout_batch, rollout_metrics, sample_completions
from phi2_jax.training.rewards import PromptRecord, RewardSet, gather_columns
from phi2_jax.training.run_config import row_length

log = logging.getLogger(__name__)


def _all_processes(local: np.ndarray) -> np.ndarray:
    """Every process's `local` rows, concatenated in process order (the global batch's order)."""
    import jax

    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local, tiled=True))


def sampling_seed(seed: int, step: int) -> int:
    """The step's sampling seed: a function of the run's seed and the step alone, so a resume repeats it."""
    return (seed * 1_000_003 + step) % 2**31


class GRPORollouts:
    """Makes each step's rollout batch and scores held-out prompts for one run (see the module docstring)."""

    def __init__(self, config, records: list[PromptRecord], prompt_ids: list[list[int]], tokenizer, rewards: RewardSet,
                 graphdef, mesh, reference_params: dict | None = None):
        import jax

        from phi2_jax.training.grpo import completion_logps
        from phi2_jax.training.step import batch_sharding

        self.g, self.seed = config.grpo, config.train.seed
        self.records, self.prompt_ids, self.tokenizer = records, prompt_ids, tokenizer
        self.graphdef, self.reference = graphdef, reference_params
        self.rewards = rewards
        self.length = row_length(config)
        temperature = self.g.temperature

        def logps(params, batch):  # [grad_accum, micro, T] per-token log-probs at the sampling temperature
            from flax import nnx

            model = nnx.merge(graphdef, params)
            flat = {k: v.reshape(-1, v.shape[-1]) for k, v in batch.items() if v.ndim == 3}
            out = completion_logps(model, flat, None, temperature)[0]
            return out.reshape(batch["input_ids"].shape)

        self._logps = jax.jit(logps, out_shardings=batch_sharding(mesh, 3))

    # ------------------------------------------------------------------ training batches
    def batch(self, params, local_indices: np.ndarray, step: int, to_global: Callable[[dict], dict]
              ) -> tuple[dict, dict[str, float]]:
        """(the step's batch as global arrays, rollout metrics as TRL logs them) for this process's prompts."""
        import jax
        from flax import nnx

        g = self.g
        indices = _all_processes(np.asarray(local_indices, np.int64))  # the whole step's prompts, everywhere
        completions, _ = sample_completions(nnx.merge(self.graphdef, params), [self.prompt_ids[i] for i in indices],
                                            g.num_generations, g.max_completion_length, g.temperature, g.top_p,
                                            sampling_seed(self.seed, step), self.tokenizer.eos_id)
        rows = rollout_batch([self.prompt_ids[i] for i in indices for _ in range(g.num_generations)], completions,
                             self.tokenizer.eos_id, self.tokenizer.eos_id, self.length, g.mask_truncated_completions)
        truncated = rows.pop("truncated")
        share = len(completions) // jax.process_count()
        mine = slice(jax.process_index() * share, (jax.process_index() + 1) * share)
        scored = self._score([self.records[i] for i in np.asarray(local_indices)], completions[mine])
        total = _all_processes(scored.total)
        per_function = _all_processes(scored.per_function.T).T
        advantages = group_advantages(total, g.num_generations, g.scale_rewards)
        rows["advantages"] = advantages.advantages.astype(np.float32)
        batch = to_global({k: v[mine] for k, v in rows.items()})
        if g.num_iterations > 1:  # the later passes' ratios are to the policy that sampled
            batch["old_logps"] = self._logps(params, batch)
        if self.reference is not None:
            batch["ref_logps"] = self._logps(self.reference, batch)
        info = {"reward": float(np.nanmean(total)),
                "reward_std": float(np.nanmean(np.nanstd(total.reshape(-1, g.num_generations), axis=1, ddof=1))),
                "frac_reward_zero_std": advantages.frac_reward_zero_std, "tied_groups": advantages.tied_groups,
                **self._per_function(per_function), **rollout_metrics(completions, truncated)}
        info.update({f"reward_failures/{name}": float(count) for name, count in self.rewards.failures.items()})
        return batch, info

    def _score(self, records: list[PromptRecord], completions: list[list[int]]):
        """Rewards of this process's completions (each record's num_generations in a row), text without EOS."""
        prompts, messages, columns = gather_columns(records, self.g.num_generations)
        return self.rewards(prompts, self._texts(completions), messages, **columns)

    def _texts(self, completions: list[list[int]]) -> list[str]:
        """The completions as reward functions read them: decoded, without the end-of-text token."""
        eos = self.tokenizer.eos_id
        return [self.tokenizer.decode([t for t in c if t != eos]) for c in completions]

    def _per_function(self, per_function: np.ndarray) -> dict[str, float]:
        out = {}
        for name, values in zip(self.rewards.names, per_function):
            scored = values[~np.isnan(values)]
            out[f"rewards/{name}/mean"] = float(scored.mean()) if scored.size else float("nan")
            out[f"rewards/{name}/std"] = float(scored.std(ddof=1)) if scored.size > 1 else 0.0
        return out

    # ------------------------------------------------------------------ held out
    def held_out(self, params, indices: list[int]) -> dict[str, float]:
        """Mean reward (and per function) of greedy completions of held-out prompts; every process computes it."""
        from flax import nnx

        if not indices:
            return {}
        g = self.g
        completions, _ = sample_completions(nnx.merge(self.graphdef, params), [self.prompt_ids[i] for i in indices],
                                            1, g.max_completion_length, 0.0, 1.0, 0, self.tokenizer.eos_id)
        records = [self.records[i] for i in indices]
        prompts, messages, columns = gather_columns(records)
        scored = self.rewards(prompts, self._texts(completions), messages, **columns)
        return {"reward": float(np.nanmean(scored.total)), **self._per_function(scored.per_function)}


def grpo_splits(config, tokenizer):
    """(splits of prompt indices for Grain, records, their token ids): every source's prompts read as grpo.task,
    split train / held out by a hash of (file, record number); prompts past grpo.max_prompt_length are dropped."""
    from pathlib import Path

    from phi2_jax.data.post_data import PostSplits, RowSource
    from phi2_jax.data.sources import Document, is_validation, source_files
    from phi2_jax.errors import ConfigError
    from phi2_jax.training.rewards import read_prompts, render_prompts

    g, d = config.grpo, config.data
    records, prompt_ids, train_sets, weights, held_out, dropped = [], [], [], [], [], 0
    template, first_file = None, None
    for source in d.sources:
        train = []
        for file in source_files(source):
            if source.get("format", "auto") == "parquet" or Path(file).suffix == ".parquet":
                raise ConfigError(f"data source file {file} is Parquet; GRPO reads its prompts from JSONL files "
                                  f"(grpo.task {g.task}); expected .jsonl files.")
            found = read_prompts(Path(file), g.task, prompt_field=g.prompt_field, answer_field=g.answer_field or None)
            conversational = found[0].messages is not None
            if first_file is None:
                first_file = (file, conversational)
            elif conversational != first_file[1]:
                kinds = ("text", "message lists")
                raise ConfigError(f"GRPO prompt file {file} holds {kinds[conversational]} but {first_file[0]} holds "
                                  f"{kinds[first_file[1]]}; expected one kind of prompt in a run.")
            if conversational:  # rendered as TRL renders them: the chat template with its generation prompt
                if template is None:
                    from phi2_jax.data.post_data import chat_template

                    template = chat_template(d.chat_template, tokenizer, config.checkpoint.init_from)
                found = render_prompts(found, template)
            for n, record in enumerate(found[:d.max_documents] if d.max_documents else found):
                ids = tokenizer.encode(record.text)
                if len(ids) > g.max_prompt_length:
                    dropped += 1
                    continue
                records.append(record)
                prompt_ids.append(ids)
                index = len(records) - 1
                (held_out if is_validation(Document(f"{file}#{n}", ""), d.val_fraction) else train).append(index)
        if not train:
            raise ConfigError(f"data source '{source.get('path')}' has no training prompts left ({dropped} dropped "
                              f"as longer than grpo.max_prompt_length {g.max_prompt_length}); expected at least one.")
        train_sets.append(RowSource({"index": np.asarray(train, np.int64)}, "prompts"))
        weights.append(float(source.get("weight", 1.0)))
    log.info("GRPO prompts: %d (%d held out), %d dropped as longer than grpo.max_prompt_length %d; rewards: %s",
             len(records), len(held_out), dropped, g.max_prompt_length,
             ", ".join(str(r) for r in g.rewards))
    validation = RowSource({"index": np.asarray(held_out, np.int64)}, "prompts")
    splits = PostSplits(train_sets, weights, validation, tokenizer, template=template,
                        sample_prompts=[prompt_ids[i] for i in (held_out or [int(train_sets[0].rows["index"][0])])[:3]])
    return splits, records, prompt_ids
