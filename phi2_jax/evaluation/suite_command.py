"""`python -m phi2_jax.evaluate --suite phi2 --data DIR --output OUT`: the suite run from the command line.

Every present task file is read and checked before the model is loaded (a bad one is refused in one
sentence, exit 2, and nothing in OUT changes); the model is loaded only if some task is not cached.
OUT receives `cache/` (one JSON per finished task), `results.json` (rewritten after each task, with
per-item details), and at the end `report.md` and `report.png` (`report.py`). A failure part-way
leaves the finished tasks in the cache and in results.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

from phi2_jax.evaluation import report
from phi2_jax.evaluation.harness import evaluate, first_items
from phi2_jax.evaluation.sandbox import Limits
from phi2_jax.evaluation.suite import SuiteTask, run_suite, suite_tasks, write_json
from phi2_jax.evaluation.tasks import load_task


def run_suite_command(args) -> dict:
    """Runs the suite for parsed `python -m phi2_jax.evaluate` arguments; returns the results."""
    tasks, skipped = suite_tasks(args.suite, args.data)
    sizes = {}
    for task in tasks:  # refuse a bad file before loading the model or touching the output
        kind, items = load_task(task.name, args.data / task.file, _shots(task, args))
        sizes[task.name] = len(first_items(kind, items, args.limit)) * (args.code_samples if kind == "code" else 1)
    if not args.model.exists():
        from phi2_jax.errors import UserInputError

        raise UserInputError(f"--model {args.model} does not exist.")
    label = args.label or args.model.resolve().name
    settings = {"limit": args.limit, "max_new_tokens": args.max_new_tokens, "code_samples": args.code_samples,
                "timeout": args.timeout, "tokenizer": str(args.tokenizer.resolve()) if args.tokenizer else None,
                "num_fewshot": args.num_fewshot}
    loaded = {}

    def score(task: SuiteTask, path: Path) -> dict:
        if not loaded:  # only when some task is not cached
            from phi2_jax.data.tokenizer import load_tokenizer
            from phi2_jax.hf.loading import default_tokenizer_path, from_pretrained

            loaded["tokenizer"] = load_tokenizer(args.tokenizer or default_tokenizer_path(args.model))
            loaded["model"] = from_pretrained(args.model)
        return evaluate(loaded["model"], loaded["tokenizer"], {task.name: path}, num_fewshot=_shots(task, args),
                        limit=args.limit, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                        code_samples=args.code_samples, limits=Limits(seconds=args.timeout),
                        sandbox_workers=args.sandbox_workers)[task.name]

    def save(results: dict) -> None:
        write_json(args.output / "results.json", report.summary(results, label, skipped))

    if skipped:
        print("skipped: " + "; ".join(f"{name} ({why})" for name, why in skipped.items()), file=sys.stderr)
    results = run_suite(tasks, args.data, args.model, args.output / "cache", settings, score, on_result=save,
                        sizes=sizes)
    text = report.markdown(results, label)
    partial = args.output / "report.md.partial"
    partial.write_text(text)
    partial.replace(args.output / "report.md")
    report.chart(results, label, args.output / "report.png")
    print(text)
    return results


def _shots(task: SuiteTask, args) -> int | None:
    """--num-fewshot when given, else the release's shots for the task."""
    return args.num_fewshot if args.num_fewshot is not None else task.num_fewshot
