"""`python -m phi2_jax.evaluate`: perplexity and the benchmark families Phi-2 reports.

    python -m phi2_jax.evaluate --model PATH --task piqa --task gsm8k=data/gsm8k.jsonl \
        --task humaneval --ppl notes.txt --output results.json

Multiple choice: acc (highest summed log-likelihood) and acc_norm (per byte of
the continuation), as lm-evaluation-harness scores PIQA, ARC, HellaSwag,
WinoGrande, BoolQ and MMLU. GSM8K: greedy few-shot generation, the final
number extracted and compared exactly. BBH (`--task bbh=FOLDER`): chain-of-thought
few-shot prompts from a prompt file per task, the answer after "So the answer is"
(`bbh.py`). Code: completions run against the
task's tests in the sandbox (`sandbox.py`), scored pass@k.

What post-training changed: `--safety [FILE]`, a ToxiGen-style safety score per target group
(`safety.py`); `--heldout FILE`, held-out prompt-completion pairs in TRL's conventions, scored by
completion log-likelihood and exact match of the greedy answer (`heldout.py`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from phi2_jax.errors import UserInputError, exit_on_user_error
from phi2_jax.util.progress import Progress
from phi2_jax.evaluation.sandbox import Limits, run_programs
from phi2_jax.inference.scoring import loglikelihood, rolling_loglikelihood
from phi2_jax.evaluation.bbh import score_bbh
from phi2_jax.evaluation.heldout import HeldoutPair, read_pairs, score_heldout
from phi2_jax.evaluation.safety import SAMPLE as SAFETY_SAMPLE, Statement, read_statements, score_safety
from phi2_jax.evaluation.tasks import extract_answer, load_task


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed (Chen et al., 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def score_multiple_choice(model, tokenizer, items, batch_size: int) -> dict:
    """acc / acc_norm over `MultipleChoice` items, with each option's log-likelihood per item."""
    requests, owners = [], []
    for n, item in enumerate(items):
        for context, continuation in item.options:
            requests.append((tokenizer.encode(context), tokenizer.encode(continuation)))
            owners.append(n)
    progress = Progress("  scoring choices", len(requests))
    scores = loglikelihood(model, requests, eos_id=tokenizer.eos_id, batch_size=batch_size,
                           progress=lambda k: progress.advance(k))
    progress.close()
    correct = correct_norm = 0
    per_item = []
    for n, item in enumerate(items):
        logliks = [s for (s, _), o in zip(scores, owners) if o == n]
        norm = [ll / max(len(cont.encode()), 1) for ll, (_, cont) in zip(logliks, item.options)]
        correct += int(np.argmax(logliks) == item.gold)
        correct_norm += int(np.argmax(norm) == item.gold)
        per_item.append({"logliks": logliks, "gold": item.gold})
    return {"acc": correct / len(items), "acc_norm": correct_norm / len(items), "n": len(items), "items": per_item}


def score_generation(model, tokenizer, items, max_new_tokens: int, batch_size: int) -> dict:
    """Exact match of the extracted final answer of greedy completions (GSM8K style)."""
    from phi2_jax.inference.generate import generate_text

    progress = Progress("  generating", len(items))
    completions = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        completions += generate_text(model, tokenizer, [i.prompt for i in chunk], max_new_tokens=max_new_tokens,
                                     stop=["\n\nQuestion:", "Question:"])
        progress.advance(len(chunk))
    progress.close()
    answers = [extract_answer(c) for c in completions]
    correct = [a == i.answer for a, i in zip(answers, items)]
    return {"exact_match": sum(correct) / len(items), "n": len(items),
            "items": [{"answer": a, "gold": i.answer, "completion": c} for a, i, c in zip(answers, items, completions)]}


def score_code(model, tokenizer, items, samples: int, temperature: float, max_new_tokens: int,
               limits: Limits, workers: int | None = None, batch_size: int = 8) -> dict:
    """pass@k (k <= samples) of completions run against each task's tests in the sandbox.

    All completions are generated first, `batch_size` prompts at a time, then run `workers` at a time
    (`run_programs`).
    """
    from phi2_jax.inference.generate import generate_text

    progress = Progress("  generating", len(items) * samples)
    completions = [[""] * samples for _ in items]
    for s in range(samples):
        # `batch_size` prompts at a time, left-padded by generate_text; a task's items share their stop strings.
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            texts = generate_text(model, tokenizer, [i.prompt for i in chunk], max_new_tokens=max_new_tokens,
                                  stop=chunk[0].stop, temperature=temperature if samples > 1 else 0.0, seed=s)
            for n, text in enumerate(texts):
                completions[start + n][s] = text
            progress.advance(len(chunk))
    progress.close()
    programs = [item.prompt + c + item.test_suffix for item, mine in zip(items, completions) for c in mine]
    outcomes = run_programs(programs, limits, workers)
    results = []
    for n, item in enumerate(items):
        mine = outcomes[n * samples:(n + 1) * samples]
        results.append({"task_id": item.task_id, "passed": sum(o.passed for o in mine), "n": samples,
                        "statuses": [o.status for o in mine], "completions": completions[n]})
    scores = {f"pass@{k}": float(np.mean([pass_at_k(r["n"], r["passed"], k) for r in results]))
              for k in (1, 5, 10) if k <= samples}
    return {**scores, "n": len(items), "items": results}


def perplexity(model, tokenizer, files: list[Path], batch_size: int) -> dict:
    """Token perplexity over text files: every token predicted, the first of each file from end-of-text."""
    total_logprob, total_tokens = 0.0, 0
    for file in files:
        if not file.is_file():
            raise UserInputError(f"perplexity file {file} does not exist.")
        ids = tokenizer.encode(file.read_text(encoding="utf-8"))
        if not ids:
            raise UserInputError(f"perplexity file {file} is empty.")
        total_logprob += rolling_loglikelihood(model, ids, eos_id=tokenizer.eos_id, batch_size=batch_size)
        total_tokens += len(ids)
    return {"perplexity": math.exp(-total_logprob / total_tokens), "tokens": total_tokens,
            "nll_per_token": -total_logprob / total_tokens}


def first_items(kind: str, items: list, limit: int | None) -> list:
    """The first `limit` items (of each BBH task for BBH), or all of them."""
    if not limit:
        return items
    if kind != "bbh":
        return items[:limit]
    kept, seen = [], {}
    for item in items:
        seen[item.task] = seen.get(item.task, 0) + 1
        if seen[item.task] <= limit:
            kept.append(item)
    return kept


def evaluate(model, tokenizer, tasks: dict[str, Path | None], *, ppl_files: list[Path] = (), num_fewshot=None,
             limit: int | None = None, batch_size: int = 8, max_new_tokens: int = 256, code_samples: int = 1,
             code_temperature: float = 0.8, limits: Limits = Limits(), sandbox_workers: int | None = None,
             safety: list[Statement] | None = None, heldout: dict[str, list[HeldoutPair]] | None = None,
             on_result: Callable[[dict], None] | None = None) -> dict:
    """Scores `model` on each task ({name: JSONL path or None for the shipped sample}), on `ppl_files`, on the
    `safety` statements (results key 'safety') and on each set of held-out pairs ({results key: pairs}).

    on_result(results so far) is called after each task, so that a caller can keep finished tasks' results
    when a later one fails.
    """
    results = {}
    for name, path in tasks.items():
        kind, items = load_task(name, path, num_fewshot)
        items = first_items(kind, items, limit)
        print(f"{name}: {len(items)} {kind.replace('_', ' ')} items", file=sys.stderr)
        if kind == "bbh":
            results[name] = score_bbh(model, tokenizer, items, max_new_tokens, batch_size)
        elif kind == "multiple_choice":
            results[name] = score_multiple_choice(model, tokenizer, items, batch_size)
        elif kind == "generation":
            results[name] = score_generation(model, tokenizer, items, max_new_tokens, batch_size)
        else:
            results[name] = score_code(model, tokenizer, items, code_samples, code_temperature, max_new_tokens, limits,
                                       sandbox_workers, batch_size)
        if on_result:
            on_result(dict(results))
    if ppl_files:
        results["perplexity"] = perplexity(model, tokenizer, list(ppl_files), batch_size)
        if on_result:
            on_result(dict(results))
    if safety:
        print(f"safety: {len(safety)} statements", file=sys.stderr)
        results["safety"] = score_safety(model, tokenizer, safety, batch_size)
        if on_result:
            on_result(dict(results))
    for name, pairs in (heldout or {}).items():
        pairs = pairs[:limit] if limit else pairs
        print(f"{name}: {len(pairs)} held-out pairs", file=sys.stderr)
        results[name] = score_heldout(model, tokenizer, pairs, max_new_tokens, batch_size)
        if on_result:
            on_result(dict(results))
    return results


def table(results: dict) -> str:
    lines = ["| task | metric | value | n |", "|---|---|---|---|"]
    for task, metrics in results.items():
        n = metrics.get("n", metrics.get("tokens", ""))
        for key, value in metrics.items():
            if key in ("n", "items", "tokens", "tasks", "groups"):
                continue
            lines.append(f"| {task} | {key} | {value:.4f} | {n} |")
        for sub, scores in metrics.get("tasks", {}).items():  # BBH's tasks, each scored on its own
            lines.append(f"| {task}/{sub} | exact_match | {scores['exact_match']:.4f} | {scores['n']} |")
        for group, scores in metrics.get("groups", {}).items():  # the safety score's target groups
            lines.append(f"| {task}/{group} | score | {scores['score']:.4f} | {scores['n']} |")
    return "\n".join(lines)


def parse_task(spec: str) -> tuple[str, Path | None]:
    name, _, path = spec.partition("=")
    return name.strip(), Path(path) if path else None


def parse_tasks(specs: list[str]) -> dict[str, Path | None]:
    """{name: file or None} from --task values; a name given twice is refused (its results would collide)."""
    tasks = {}
    for spec in specs:
        name, path = parse_task(spec)
        if name in tasks:
            raise UserInputError(f"--task {name} is given twice; name each task once.")
        tasks[name] = path
    return tasks


def check_arguments(args) -> None:
    """Refuses bad numbers and a bad --output before any work is done."""
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                               ("--code-samples", args.code_samples, 1), ("--limit", args.limit, 1),
                               ("--num-fewshot", args.num_fewshot, 0), ("--sandbox-workers", args.sandbox_workers, 1)):
        if value is not None and value < least:
            raise UserInputError(f"{flag} must be at least {least}, got {value}.")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise UserInputError(f"--timeout must be a positive number of seconds, got {args.timeout}.")
    if getattr(args, "suite", None):
        if args.task or args.ppl or getattr(args, "safety", None) or getattr(args, "heldout", None):
            raise UserInputError("--suite runs its own task list; leave out --task, --ppl, --safety and --heldout.")
        if args.data is None or args.output is None:
            raise UserInputError("--suite needs --data FOLDER (the task files) and --output FOLDER (results, cache, report).")
        if args.output.exists() and not args.output.is_dir():
            raise UserInputError(f"--output {args.output} is a file; with --suite it names a folder.")
    elif args.output is not None:
        if args.output.is_dir():
            raise UserInputError(f"--output {args.output} is a folder; expected a file name for the results JSON.")
        parent = next((p for p in args.output.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise UserInputError(f"--output {args.output}: {parent} is a file, not a folder.")
    for file in args.ppl:
        if not file.is_file():
            raise UserInputError(f"perplexity file {file} does not exist.")
    heldout = getattr(args, "heldout", [])
    for file in heldout:
        if heldout.count(file) > 1:
            raise UserInputError(f"--heldout {file} is given twice; name each file once.")
    safety_fields(args)


def safety_fields(args) -> dict[str, str]:
    """read_statements' field names from --safety-fields TEXT,GROUP."""
    names = [n.strip() for n in getattr(args, "safety_fields", "text,target_group").split(",")]
    if len(names) != 2 or not all(names):
        raise UserInputError(f"--safety-fields must be two field names, TEXT,GROUP, got {args.safety_fields!r}.")
    return {"text_field": names[0], "group_field": names[1]}


def write_results(path: Path, results: dict) -> None:
    """The results as JSON, replaced whole (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(results, indent=2))
    os.replace(partial, path)


@exit_on_user_error
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m phi2_jax.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--tokenizer", type=Path, help="default: the model folder's / run's tokenizer")
    parser.add_argument("--task", action="append", default=[], help="NAME or NAME=FILE.jsonl (repeatable)")
    parser.add_argument("--ppl", action="append", default=[], type=Path, help="text file for perplexity (repeatable)")
    parser.add_argument("--safety", nargs="?", const=SAFETY_SAMPLE, type=Path, metavar="FILE",
                        help="ToxiGen-style safety score per target group and overall, from a JSONL file of statements "
                             "(without FILE: the shipped sample, phi2_jax/evaluation/samples/toxigen.jsonl)")
    parser.add_argument("--safety-fields", default="text,target_group", metavar="TEXT,GROUP",
                        help="the --safety file's statement and group fields (default: text,target_group)")
    parser.add_argument("--heldout", action="append", default=[], type=Path, metavar="FILE",
                        help="held-out prompt-completion pairs, JSONL in TRL's conventions: completion log-likelihood "
                             "and exact match of the greedy answer, which stops at end-of-text or '\\nInstruct:' "
                             "and at --max-new-tokens (repeatable)")
    parser.add_argument("--num-fewshot", type=int)
    parser.add_argument("--limit", type=int, help="first N items of each task and --heldout file (--safety scores all)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--code-samples", type=int, default=1, help="completions per code task (pass@k, k <= this)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per code test run")
    parser.add_argument("--sandbox-workers", type=int, help="code test runs at once (default: CPUs, at most 8)")
    parser.add_argument("--output", type=Path, help="write the results (with per-item details) as JSON; "
                                                    "rewritten after each task (with --suite: a folder)")
    parser.add_argument("--suite", help="run every task of a release's table: phi2")
    parser.add_argument("--data", type=Path, help="with --suite: the folder of task files")
    parser.add_argument("--label", help="with --suite: the model's name in the report (default: the model folder's)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.suite:
        from phi2_jax.evaluation.suite_command import run_suite_command

        check_arguments(args)
        return run_suite_command(args)
    if not (args.task or args.ppl or args.safety or args.heldout):
        raise UserInputError("nothing to evaluate; pass --task NAME[=FILE], --ppl FILE, --safety [FILE] "
                             "and/or --heldout FILE.")
    check_arguments(args)
    tasks = parse_tasks(args.task)
    for name, path in tasks.items():
        load_task(name, path, args.num_fewshot)  # refuse a bad file before loading the model
    statements = read_statements(args.safety, **safety_fields(args)) if args.safety else None
    if not args.model.exists():
        raise UserInputError(f"--model {args.model} does not exist.")

    from phi2_jax.hf.loading import default_tokenizer_path
    from phi2_jax.hf.loading import from_pretrained
    from phi2_jax.data.chat import load_chat_template
    from phi2_jax.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer or default_tokenizer_path(args.model))
    # Held-out pairs need the tokenizer and the chat template training used (the model folder's, else
    # Phi-2's built-in one); still read before the model, so that a bad record costs no loading.
    template = load_chat_template(args.model if args.model.is_dir() else None) if args.heldout else None
    heldout = {f"heldout:{path}": read_pairs(path, tokenizer, template) for path in args.heldout}
    model = from_pretrained(args.model)
    save = (lambda results: write_results(args.output, results)) if args.output else None
    results = evaluate(model, tokenizer, tasks, ppl_files=args.ppl, num_fewshot=args.num_fewshot, limit=args.limit,
                       batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, code_samples=args.code_samples,
                       limits=Limits(seconds=args.timeout), sandbox_workers=args.sandbox_workers, safety=statements,
                       heldout=heldout, on_result=save)
    print(table(results))


if __name__ == "__main__":
    main()
