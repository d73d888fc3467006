"""A run's record of itself: metrics.jsonl, the progress and held-out lines, and the history the plot draws.

metrics.jsonl is appended one JSON record per logged step (process 0 only); a resumed run reads back
the history up to its start so `loss_curve.png` covers the whole run. Post-training adds its own
series, named as TRL logs them: DPO's rewards/margins and rewards/accuracies, GRPO's reward.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger("phi2_jax.training.trainer")

# Reward curves drawn beside the loss (training/metrics.plot_loss_curve's second panel): DPO's, GRPO's.
PLOTTED_REWARDS = ("rewards/margins", "rewards/accuracies", "reward")
HELD_OUT_PLOTTED = ("rewards/accuracies", "reward")


def reward_summary(metrics: dict[str, float]) -> str:
    """The progress line's tail: '  acc 0.75  margin 0.123' (DPO), '  reward 0.42  kl 0.001' (GRPO), or ''."""
    if "rewards/accuracies" in metrics:
        return f"  acc {metrics['rewards/accuracies']:.2f}  margin {metrics['rewards/margins']:.3f}"
    if "reward" in metrics:
        kl = f"  kl {metrics['kl']:.4f}" if "kl" in metrics else ""
        length = (f"  length {metrics['completions/mean_length']:.1f}" if "completions/mean_length" in metrics else "")
        return f"  reward {metrics['reward']:.3f}{kl}{length}"
    return ""


class RunLog:
    """metrics.jsonl, stdout lines and plot history of one run; writes happen on process 0 (`is_main`) only."""

    def __init__(self, run_dir: Path, is_main: bool, objective: str = "lm"):
        self.path, self.is_main, self.objective = Path(run_dir) / "metrics.jsonl", is_main, objective

    def say(self, line: str) -> None:
        if self.is_main:
            print(line, flush=True)

    def append(self, record: dict) -> None:
        if self.is_main:
            with open(self.path, "ab+") as f:
                f.seek(0, os.SEEK_END)
                if f.tell():  # a line cut short by a crash must not swallow this record
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        f.write(b"\n")
                f.write((json.dumps(record) + "\n").encode())

    def history(self, start: int) -> dict:
        """Loss (and reward) history up to `start` from metrics.jsonl, so a resumed run's plot covers the whole run.

        Records after `start` (logged before a crash, trained again now) are left out, and so is a line that a
        crash cut short.
        """
        history = {"train": [], "validation": []}
        if not self.path.is_file():
            return history
        unreadable = 0
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
                step = int(record["step"])
            except (ValueError, KeyError, TypeError):
                unreadable += 1
                continue
            if step > start:
                continue
            if "train/loss" in record:
                history["train"].append((step, record["train/loss"]))
            if "val/loss" in record:
                history["validation"].append((step, record["val/loss"]))
            for key in PLOTTED_REWARDS:
                if f"train/{key}" in record:
                    history.setdefault(key, []).append((step, record[f"train/{key}"]))
            for key in HELD_OUT_PLOTTED:
                if f"val/{key}" in record:
                    history.setdefault(f"validation {key}", []).append((step, record[f"val/{key}"]))
        if unreadable:
            log.warning("%s: skipped %d line(s) that are not JSON records (cut short by a crash?)", self.path,
                        unreadable)
        return history

    def held_out(self, step: int, results: dict, events, history: dict) -> None:
        """The held-out line, TensorBoard scalars, metrics.jsonl record and plot points of one evaluation."""
        import numpy as np

        if not results:
            return
        values = {f"val/{k}": v for k, v in results.items()}
        if "loss" in results:
            val = results["loss"]
            # A perplexity of the DPO loss would mean nothing.
            ppl = f"  val_ppl {np.exp(val):.2f}" if self.objective != "dpo" else ""
            self.say(f"step {step}  val_loss {val:.4f}{ppl}" + reward_summary(results))
            events.scalars(step, {**values, **({"val/perplexity": float(np.exp(val))} if ppl else {})})
            history["validation"].append((step, val))
        else:
            self.say(f"step {step}  held-out" + reward_summary(results))
            events.scalars(step, values)
        for key in HELD_OUT_PLOTTED:
            if key in results:
                history.setdefault(f"validation {key}", []).append((step, results[key]))
        self.append({"step": step, **values})
