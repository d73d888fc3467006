"""`--suite phi2`: every task of Phi-2's release table from a folder of task files, each finished task cached.

The data folder holds `<task>.jsonl` per task (`piqa.jsonl`, `arc_easy.jsonl`, ...) and `bbh/` (a BBH
folder, `bbh.py`); a task whose file is missing is skipped and listed. Each finished task's result
is written at once to `<output>/cache/<task>-<key>.json`, the key hashing the model path, the
task's file contents (for BBH every task and prompt file) and the settings that change its score,
so a rerun, or a run after a crash, recomputes only what is not there yet.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from phi2_jax.errors import UserInputError
from phi2_jax.evaluation.tasks import KIND, family
from phi2_jax.util.progress import format_eta

# Bump when a change to scoring changes results: old cache entries then no longer match.
SCORING_VERSION = 1


@dataclasses.dataclass(frozen=True)
class SuiteTask:
    name: str            # the result's name, as report.GROUPS uses it
    file: str            # under the data folder
    num_fewshot: int | None


# The release's shots where this harness can follow them (report.py has the source); BBH's shots are
# its prompt files' examples. MBPP is run 0-shot (its 3-shot prompt is not built here).
PHI2 = [
    SuiteTask("bbh", "bbh", None),
    SuiteTask("piqa", "piqa.jsonl", 0), SuiteTask("winogrande", "winogrande.jsonl", 0),
    SuiteTask("arc_easy", "arc_easy.jsonl", 0), SuiteTask("arc_challenge", "arc_challenge.jsonl", 0),
    SuiteTask("siqa", "siqa.jsonl", 0),
    SuiteTask("hellaswag", "hellaswag.jsonl", 0), SuiteTask("openbookqa", "openbookqa.jsonl", 0),
    SuiteTask("mmlu", "mmlu.jsonl", 5), SuiteTask("boolq", "boolq.jsonl", 0),
    SuiteTask("gsm8k", "gsm8k.jsonl", 8),
    SuiteTask("humaneval", "humaneval.jsonl", None), SuiteTask("mbpp", "mbpp.jsonl", None),
]
SUITES = {"phi2": PHI2}
UNSUPPORTED = {"squadv2": "no SQuADv2 scorer in phi2_jax yet"}


def suite_tasks(suite: str, data: Path) -> tuple[list[SuiteTask], dict[str, str]]:
    """(tasks whose files are in `data`, {skipped task: why})."""
    if suite not in SUITES:
        raise UserInputError(f"unknown suite '{suite}'; expected one of {', '.join(SUITES)}.")
    if not data.is_dir():
        raise UserInputError(f"--data {data} is not a folder; expected a folder of <task>.jsonl files.")
    present, skipped = [], dict(UNSUPPORTED)
    for task in SUITES[suite]:
        if (data / task.file).exists():
            present.append(task)
        else:
            skipped[task.name] = f"{data / task.file} not found"
    if not present:
        raise UserInputError(f"--data {data} holds none of the suite's task files ({', '.join(t.file for t in SUITES[suite])}).")
    return present, skipped


def content_hash(path: Path) -> str:
    """sha256 over a file's bytes, or over every file of a folder (relative names and bytes, sorted)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode() + b"\0")
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


# The settings each kind of task reads (batch size is left out: it changes how items are grouped, not
# what is computed); a setting a task does not read does not make it run again.
READS = {"multiple_choice": ("limit", "num_fewshot", "tokenizer"),
         "generation": ("limit", "num_fewshot", "tokenizer", "max_new_tokens"),
         "bbh": ("limit", "tokenizer", "max_new_tokens"),
         "code": ("limit", "tokenizer", "max_new_tokens", "code_samples", "timeout")}


def cache_key(model: Path, task: SuiteTask, data: Path, settings: dict) -> tuple[str, dict]:
    """(hex key, what it hashes) for one task's result."""
    kind = KIND[family(task.name)]
    material = {"model": str(Path(model).resolve()), "task": task.name, "file": content_hash(data / task.file),
                "num_fewshot": task.num_fewshot, "settings": {k: settings.get(k) for k in READS[kind]},
                "scoring_version": SCORING_VERSION}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest(), material


def write_json(path: Path, value) -> None:
    """`value` as JSON, replaced whole: a crash leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=2, default=str))
    os.replace(partial, path)


def read_cached(path: Path, key: str) -> dict | None:
    """A cached result if the file holds one for this key (an unreadable file counts as absent)."""
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return entry["result"] if isinstance(entry, dict) and entry.get("key") == key and "result" in entry else None


def run_suite(tasks: list[SuiteTask], data: Path, model_path: Path, cache: Path, settings: dict,
              score: Callable[[SuiteTask, Path], dict], on_result: Callable[[dict], None] | None = None,
              sizes: dict[str, int] | None = None, stream=None) -> dict:
    """{task: result} for every task, read from `cache` where it is there, else `score(task, path)` and cached.

    sizes: {task: items} for the ETA (remaining items at the rate of the items scored so far).
    on_result(results so far) after each task.
    """
    sizes, stream = sizes or {}, stream or sys.stderr
    total = sum(sizes.get(t.name, 0) for t in tasks)
    results, done_items, scored_items, scored_seconds = {}, 0, 0, 0.0
    for n, task in enumerate(tasks, 1):
        key, material = cache_key(model_path, task, data, settings)
        path = cache / f"{task.name}-{key[:16]}.json"
        result = read_cached(path, key)
        if result is None:
            start = time.perf_counter()
            print(f"[{n}/{len(tasks)}] {task.name}", file=stream)
            result = score(task, data / task.file)
            write_json(path, {"key": key, "material": material, "result": result})
            scored_seconds += time.perf_counter() - start
            scored_items += sizes.get(task.name, 0)
            note = f"scored in {time.perf_counter() - start:.1f}s"
        else:
            note = "cached"
        results[task.name] = result
        done_items += sizes.get(task.name, 0)
        eta = (total - done_items) * scored_seconds / scored_items if scored_items else float("inf")
        eta_text = format_eta(eta) if done_items < total else "0m00s"
        print(f"[{n}/{len(tasks)}] {task.name} {note}; {done_items}/{total} items done, eta {eta_text}", file=stream)
        if on_result:
            on_result(dict(results))
    return results
