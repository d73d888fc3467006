"""What a resumed run may change, and the sentence that refuses what it may not.

A run folder's checkpoints record the model config and the run config they were
trained with (their `meta` item). Resuming continues that run, so anything that
decides what the weights are (the architecture, the data, the optimiser, the
batch) must stay as it was; only how the run is carried out (its length, its
logging and saving cadence, its mesh) may change between sessions, and each
such change is said.
"""

from __future__ import annotations

import json
from typing import Any

from phi2_jax.training.run_config import ignored_by

UNSET = object()  # a key one of the two configs does not have

# Run-config keys one session of a run may change for the next.
# The learning-rate schedule's length and warmup follow the run's length (a warmup as long as the run is
# shortened to a tenth of it), so they change with it.
RUN_TIME_KEYS = ("run_dir", "train.steps", "optim.warmup_steps", "train.log_every", "train.eval_every", "train.eval_batches",
                 "train.samples", "checkpoint.every", "checkpoint.keep", "checkpoint.async_save",
                 "checkpoint.init_from", "checkpoint.restart", "data.workers", "grpo.reward_timeout")
RUN_TIME_SECTIONS = ("mesh", "distributed", "model")  # the model is compared through its PhiConfig instead
# PhiConfig fields that change how the step computes, not what the parameters are.
MODEL_RUN_TIME_FIELDS = ("compute_dtype", "remat", "attention_backend", "resid_pdrop", "embd_pdrop",
                         "attention_dropout")


# Settings whose value is a user's mapping, compared whole: {} -> {'prompt': 'question'} is one change.
WHOLE_MAPPINGS = ("overrides", "fields")


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 1}} -> {'optim.lr': 1}; lists (data.sources) and WHOLE_MAPPINGS stay whole."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value and key not in WHOLE_MAPPINGS:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differences(saved: dict, current: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for every key whose values differ, sorted by key."""
    current = json.loads(json.dumps(current))  # as a checkpoint's JSON holds it: tuples become lists
    a, b = flatten(saved, prefix), flatten(current, prefix)
    return [(k, a.get(k, UNSET), b.get(k, UNSET)) for k in sorted(set(a) | set(b)) if a.get(k, UNSET) != b.get(k, UNSET)]


def _is_run_time(key: str) -> bool:
    return key in RUN_TIME_KEYS or key.split(".")[0] in RUN_TIME_SECTIONS


def fixed_differences(saved_run: dict, current_run: dict, saved_model: dict, current_model: dict
                      ) -> list[tuple[str, Any, Any]]:
    """Differences a resume may not make: the model's parameters and everything that trains them."""
    model = [d for d in differences(saved_model, current_model, "model.")
             if d[0].removeprefix("model.") not in MODEL_RUN_TIME_FIELDS]
    objective = current_run.get("train", {}).get("objective", "lm")
    # Settings this objective never reads (a shared config's dpo.* in an SFT run) are named by validate's
    # warning; changing them changes nothing here.
    fixed = model + [d for d in differences(saved_run, current_run)
                     if not _is_run_time(d[0]) and not ignored_by(objective, d[0])]
    # A key the run's config lacks is newer than the trainer that wrote it; its default keeps the old behaviour.
    return [d for d in fixed if d[1] is not UNSET]


def run_time_differences(saved_run: dict, current_run: dict) -> list[tuple[str, Any, Any]]:
    """Differences a resume applies (how long, how often to log and save, the mesh)."""
    return [d for d in differences(saved_run, current_run) if _is_run_time(d[0]) and not d[0].startswith("model.")
            and d[0] not in ("run_dir", "checkpoint.restart")]


def describe(diffs: list[tuple[str, Any, Any]], then: str = "", now: str = "") -> str:
    """'optim.lr 0.003 -> 0.001, ...', or with labels 'optim.lr (0.003 in the run, 0.001 now), ...'."""
    if then:
        return ", ".join(f"{key} ({_show(old)} {then}, {_show(new)} {now})" for key, old, new in diffs)
    return ", ".join(f"{key} {_show(old)} -> {_show(new)}" for key, old, new in diffs)


def _show(value: Any) -> str:
    if value is UNSET:
        return "(unset)"
    return repr(value) if isinstance(value, str) else str(value)
