"""The suite's results grouped as Phi-2's release groups them: a markdown table beside the published
numbers, a bar chart and a JSON summary.

Groups (Microsoft Research blog, "Phi-2: The surprising power of small language models", Dec 2023,
"Phi-2 Evaluation"): BBH (3-shot CoT); commonsense reasoning (PIQA, WinoGrande, ARC easy and
challenge, SIQA); language understanding (HellaSwag, OpenBookQA, MMLU 5-shot, SQuADv2 2-shot,
BoolQ); math (GSM8K 8-shot); coding (HumanEval, MBPP 3-shot). A group's score is the unweighted
mean of the scores (in percent) of its tasks that were run; SQuADv2 has no scorer here yet.
"""

from __future__ import annotations

import math
from pathlib import Path

GROUPS = {
    "BBH": ["bbh"],
    "commonsense reasoning": ["piqa", "winogrande", "arc_easy", "arc_challenge", "siqa"],
    "language understanding": ["hellaswag", "openbookqa", "mmlu", "squadv2", "boolq"],
    "math": ["gsm8k"],
    "coding": ["humaneval", "mbpp"],
}
# The metric that stands for each task: lm-evaluation-harness' usual headline metric for the
# multiple-choice tasks (length-normalised where it reports acc_norm), exact match, pass@1.
PRIMARY = {"bbh": "exact_match", "piqa": "acc_norm", "winogrande": "acc", "arc_easy": "acc",
           "arc_challenge": "acc_norm", "siqa": "acc", "hellaswag": "acc_norm", "openbookqa": "acc_norm",
           "mmlu": "acc", "boolq": "acc", "gsm8k": "exact_match", "humaneval": "pass@1", "mbpp": "pass@1"}
# Averaged grouped scores of the release's Table 1 (/work/shared/PHI2_SPEC.md, "Benchmarks the release reports").
PUBLISHED = {
    "Llama-2 7B": [40.0, 62.2, 56.7, 16.5, 21.0],
    "Mistral 7B": [57.2, 66.4, 63.7, 46.4, 39.4],
    "Phi-2 2.7B": [59.2, 68.8, 62.0, 61.1, 53.7],
}


def task_scores(results: dict) -> dict[str, float]:
    """{task: primary metric in percent} for the tasks of `results` that have one."""
    return {task: 100.0 * results[task][metric] for task, metric in PRIMARY.items()
            if task in results and metric in results[task]}


def group_scores(results: dict) -> dict[str, float | None]:
    """{group: mean of its run tasks' scores in percent, or None when none of them ran}."""
    scores = task_scores(results)
    groups = {}
    for group, tasks in GROUPS.items():
        run = [scores[t] for t in tasks if t in scores]
        groups[group] = sum(run) / len(run) if run else None
    return groups


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def markdown(results: dict, label: str) -> str:
    """Grouped scores beside the published ones, then every task's score and the group it counts in."""
    groups = group_scores(results)
    scores = task_scores(results)
    lines = ["| model | " + " | ".join(GROUPS) + " |", "|---" * (len(GROUPS) + 1) + "|"]
    for model, values in PUBLISHED.items():
        lines.append(f"| {model} (published) | " + " | ".join(_cell(v) for v in values) + " |")
    lines.append(f"| {label} | " + " | ".join(_cell(groups[g]) for g in GROUPS) + " |")
    lines += ["", "| group | task | metric | score | n |", "|---|---|---|---|---|"]
    for group, tasks in GROUPS.items():
        for task in tasks:
            if task in scores:
                lines.append(f"| {group} | {task} | {PRIMARY[task]} | {scores[task]:.1f} | {results[task]['n']} |")
    for task, scores_ in results.get("bbh", {}).get("tasks", {}).items():
        lines.append(f"| BBH | bbh/{task} | exact_match | {100 * scores_['exact_match']:.1f} | {scores_['n']} |")
    return "\n".join(lines) + "\n"


def chart(results: dict, label: str, path: Path | None = None):
    """A bar chart: one group of bars per benchmark group, one bar per model (published ones and `label`).

    Built with matplotlib's Figure API (no pyplot state); saved as PNG to `path` when given. Returns the Figure.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = group_scores(results)
    rows = {**PUBLISHED, label: [math.nan if groups[g] is None else groups[g] for g in GROUPS]}
    figure = Figure(figsize=(9, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / len(rows)
    for n, (model, values) in enumerate(rows.items()):
        axes.bar([g + (n - (len(rows) - 1) / 2) * width for g in range(len(GROUPS))], values, width, label=model)
    axes.set_xticks(range(len(GROUPS)), [g.replace(" ", "\n") for g in GROUPS])  # two-word names side by side overlap
    axes.set_ylabel("score (%)")
    axes.set_ylim(0, 100)
    axes.legend(fontsize="small")
    figure.tight_layout()
    if path is not None:  # written whole or not at all
        partial = Path(path).with_name(Path(path).name + ".partial")
        figure.savefig(partial, format="png")
        partial.replace(path)
    return figure


def summary(results: dict, label: str, skipped: dict[str, str] | None = None) -> dict:
    """The JSON report: groups, task scores, published rows, what was skipped and the per-item results."""
    return {"model": label, "groups": group_scores(results), "tasks": task_scores(results),
            "group_tasks": GROUPS, "metrics": PRIMARY,
            "published": {model: dict(zip(GROUPS, values)) for model, values in PUBLISHED.items()},
            "skipped": skipped or {}, "results": results}
