"""BIG-Bench Hard: few-shot chain-of-thought generation, the answer after "So the answer is", exact match.

A BBH folder holds, per task, `<task>.jsonl` (one `{"input": ..., "target": ...}` per line, the public
dataset's layout) and the task's few-shot chain-of-thought prompt as text, `<task>.txt` beside it or
`cot-prompts/<task>.txt` (the layout of the BIG-Bench-Hard repository). The prompt file is the task
description and worked examples, each "Q: ...\\nA: Let's think step by step.\\n... So the answer is X."
and separated by a blank line; a leading canary block ending in a line "-----" is dropped. Each item
is asked as

    <prompt file>\\n\\nQ: <input>\\nA: Let's think step by step.\\n

which is the string lm-evaluation-harness' `bbh_cot_fewshot` tasks build from the same examples.
Completions stop at a blank line (the end of one worked example). The answer is the text after the
first "the answer is " up to the end of its line, without its final period, read per target kind:

  multiple_choice  "(A)" .. "(R)":      the first "(X)" in it, or a bare letter "X"
  binary           True/False, Yes/No, valid/invalid: the first of the pair's words, case as in the target
  integer          "-42":               the first integer
  free_form        anything else:       the text itself, whitespace collapsed

and an item is correct when that equals its target exactly. The task's score is the mean over its
items; BBH's score is the mean of its tasks' scores (each task counts once, as the release averages).
Small self-written samples ship in `samples/bbh/` (not the official prompts).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from phi2_jax.errors import UserInputError
from phi2_jax.evaluation.tasks import SAMPLES, check_field
from phi2_jax.util.jsonl import jsonl_objects

BBH_SAMPLES = SAMPLES / "bbh"
QUESTION = "Q: {input}\nA: Let's think step by step.\n"
STOP = ("\n\n",)
MARKER = "the answer is "
BINARY = ({"True", "False"}, {"Yes", "No"}, {"valid", "invalid"})


@dataclasses.dataclass(frozen=True)
class BbhItem:
    task: str
    prompt: str
    target: str
    kind: str


def target_kind(target: str) -> str:
    """multiple_choice, binary, integer or free_form: how an answer to this target is read."""
    if re.fullmatch(r"\([A-R]\)", target):
        return "multiple_choice"
    if any(target in pair for pair in BINARY):
        return "binary"
    if re.fullmatch(r"-?\d+", target):
        return "integer"
    return "free_form"


def answer_span(completion: str) -> str | None:
    """The text after the first 'the answer is ' to the end of its line, final period dropped; None if absent."""
    at = completion.find(MARKER)
    if at < 0:
        return None
    span = completion[at + len(MARKER):].split("\n")[0].strip()
    return span[:-1].rstrip() if span.endswith(".") else span


def extract_bbh_answer(completion: str, kind: str) -> str:
    """The model's answer in a completion, read as `kind` (see `target_kind`); '' when there is none."""
    span = answer_span(completion)
    if span is None:
        return ""
    if kind == "multiple_choice":
        found = re.search(r"\(([A-R])\)", span) or re.fullmatch(r"([A-R])", span)
        return f"({found.group(1)})" if found else ""
    if kind == "binary":
        for word in re.findall(r"[A-Za-z]+", span):
            for pair in BINARY:
                canonical = {w.lower(): w for w in pair}
                if word.lower() in canonical:
                    return canonical[word.lower()]
        return ""
    if kind == "integer":
        found = re.search(r"-?\d+", span.replace(",", ""))
        return found.group(0) if found else ""
    return " ".join(span.split())


def read_prompt(path: Path) -> str:
    """A chain-of-thought prompt file without its canary block (everything up to a line '-----')."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    if "-----" in lines[:5]:  # the BIG-Bench-Hard repository's files open with a canary string and '-----'
        text = "\n".join(lines[lines.index("-----") + 1:])
    text = text.strip()
    if not text:
        raise UserInputError(f"prompt file {path} is empty; expected the task's few-shot examples.")
    return text


def prompt_file(data: Path) -> Path:
    """`<task>.txt` beside the task file, or `cot-prompts/<task>.txt`; a missing one is refused in one sentence."""
    for candidate in (data.with_suffix(".txt"), data.parent / "cot-prompts" / (data.stem + ".txt")):
        if candidate.is_file():
            return candidate
    raise UserInputError(f"BBH task {data} has no prompt file; expected {data.with_suffix('.txt')} or "
                         f"{data.parent / 'cot-prompts' / (data.stem + '.txt')}.")


def task_files(folder: Path) -> list[Path]:
    """The task files (`*.jsonl`) of a BBH folder, sorted by name."""
    if not folder.is_dir():
        raise UserInputError(f"BBH folder {folder} does not exist; expected a folder of <task>.jsonl files.")
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise UserInputError(f"BBH folder {folder} holds no <task>.jsonl files.")
    return files


def load_bbh_task(data: Path) -> list[BbhItem]:
    """The items of one BBH task file, each with its full few-shot prompt."""
    if not data.is_file():
        raise UserInputError(f"task file {data} does not exist.")
    prefix = read_prompt(prompt_file(data))
    items = []
    for n, record in jsonl_objects(data):
        where = f"{data} line {n}"
        for field in ("input", "target"):
            if field not in record:
                raise UserInputError(f"{where} has no field '{field}'; a BBH task needs input, target.")
            check_field(record[field], str, where, field)
        target = record["target"].strip()
        if not target:
            raise UserInputError(f"{where} field 'target' is empty; expected the answer.")
        items.append(BbhItem(data.stem, f"{prefix}\n\n" + QUESTION.format(input=record["input"]), target,
                             target_kind(target)))
    if not items:
        raise UserInputError(f"task file {data} holds no records.")
    return items


def load_bbh(path: Path | None) -> list[BbhItem]:
    """Every task of a BBH folder (the shipped samples when `path` is None), or one task file."""
    path = BBH_SAMPLES if path is None else path
    if path.suffix == ".jsonl":
        return load_bbh_task(path)
    return [item for data in task_files(path) for item in load_bbh_task(data)]


def score_bbh(model, tokenizer, items: list[BbhItem], max_new_tokens: int, batch_size: int) -> dict:
    """Exact match per task and its mean over tasks, from greedy completions generated `batch_size` at a time."""
    from phi2_jax.inference.generate import generate_text
    from phi2_jax.util.progress import Progress

    progress = Progress("  generating", len(items))
    completions = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        completions += generate_text(model, tokenizer, [i.prompt for i in chunk], max_new_tokens=max_new_tokens,
                                     stop=STOP)
        progress.advance(len(chunk))
    progress.close()
    return bbh_scores(items, completions)


def bbh_scores(items: list[BbhItem], completions: list[str]) -> dict:
    """{'exact_match': mean of the tasks' exact match, 'tasks': {task: {exact_match, n}}, 'n', 'items'}."""
    per_item, tasks = [], {}
    for item, completion in zip(items, completions):
        answer = extract_bbh_answer(completion, item.kind)
        per_item.append({"task": item.task, "answer": answer, "target": item.target, "kind": item.kind,
                         "correct": answer == item.target, "completion": completion})
        tasks.setdefault(item.task, []).append(answer == item.target)
    scores = {task: {"exact_match": sum(c) / len(c), "n": len(c)} for task, c in tasks.items()}
    mean = sum(s["exact_match"] for s in scores.values()) / len(scores)
    return {"exact_match": mean, "n": len(items), "tasks": scores, "items": per_item}
