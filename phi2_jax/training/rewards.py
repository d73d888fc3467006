"""GRPO reward functions, called as TRL calls them, and the prompts they score.

A reward function is `fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]`:
one reward per completion, where `columns` are the prompt records' other fields, each a list aligned
with `completions` (e.g. answer=[...], tests=[...]). None means "does not apply to this completion"
(TRL's convention): it is left out of the weighted sum, not counted as 0 or as a failure.

Built-ins:
    math_answer         1.0 if `evaluation.tasks.extract_answer(completion)` equals the record's `answer`
                        normalised the same way (a bare '42' and GSM8K's '... #### 42' both work), else 0.0.
    code_tests          1.0 if prompt + completion (cut at the record's `stop` strings) + `tests` exits 0
                        in the sandbox, the program `evaluation.harness.score_code` builds, else 0.0.
    format_regex        1.0 if `re.match(pattern, completion, re.DOTALL)` matches (anchored at the start,
                        as TRL's examples; end the pattern with $ to anchor the end too), else 0.0.
    module:function     a user function, imported with importlib, with the signature above.

Conversational prompts (a prompt given as a list of {role, content} messages, rendered with the chat
template and a generation prompt) are passed as TRL passes them: to user functions, `prompts` are the
message lists and each completion is [{"role": "assistant", "content": text}]; the built-ins, which read
text (`reads_text`), get the rendered prompt and the completion's text either way.

Failures never stop training: a function that raises, runs past `timeout_s` (it runs in a daemon worker
thread that is abandoned, since Python threads cannot be killed; until that thread ends the function is not
called again, so a hung function holds one thread, not one per batch), or returns something other than a list of
len(completions) numbers or None gets 0.0 for every completion of that call, one warning naming the function
and why, and one more in `RewardSet.failures[name]`. A rollout batch then still trains on the other
functions' rewards, and the failure count is there to be logged. 0 rather than None: a failing
function must not make completions unscorable (all None is NaN, which drops them from the advantages).
Bad specs (unknown built-in, a `module:function` that does not import, a weight that is not a positive
number, a pattern that does not compile) are refused up front with a ConfigError of one sentence.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import logging
import math
import numbers
import re
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from phi2_jax.data.formats import check_messages
from phi2_jax.errors import ConfigError, UserInputError, did_you_mean
from phi2_jax.evaluation.sandbox import Limits, run_programs
from phi2_jax.evaluation.tasks import (CodeTask, Generation, check_field, extract_answer, gsm8k_gold, load_task)
from phi2_jax.inference.generate import cut_at_stop
from phi2_jax.util.jsonl import jsonl_objects

log = logging.getLogger(__name__)

RewardFn = Callable[..., Sequence]
BUILTINS = ("math_answer", "code_tests", "format_regex")
DEFAULT_TIMEOUT_S = 300.0  # per function and call: a batch of sandboxed programs takes ~ N / workers x their limit


# ----------------------------------------------------------------------------- built-in functions
def _gold_number(answer) -> str:
    # gsm8k_gold reads both '42' and GSM8K's worked answer ending in '#### 42'.
    return gsm8k_gold(str(answer))


def math_answer(prompts: list[str], completions: list[str], answer: Sequence, **_) -> list[float]:
    """1.0 where the completion's extracted final number equals the record's `answer`, else 0.0."""
    rewards = []
    for completion, gold in zip(completions, answer, strict=True):
        gold = _gold_number(gold)
        rewards.append(1.0 if gold and extract_answer(completion) == gold else 0.0)
    return rewards


math_answer.reads_text = True


class CodeTests:
    """`code_tests`: 1.0 where prompt + completion + tests passes in the sandbox, else 0.0.

    Columns: `tests` (the test program appended after the completion, `CodeTask.test_suffix`) and optionally
    `stop` (strings the completion is cut at, as harness.score_code's generation cuts it). The programs of
    one call run concurrently, `workers` at a time (`run_programs`), each under `limits`.
    """

    __name__ = "code_tests"
    reads_text = True

    def __init__(self, limits: Limits = Limits(), workers: int | None = None):
        self.limits, self.workers = limits, workers

    def __call__(self, prompts: list[str], completions: list[str], tests: Sequence[str], stop: Sequence | None = None,
                 **_) -> list[float]:
        stops = stop if stop is not None else [()] * len(completions)
        programs = [prompt + cut_at_stop(completion, tuple(s or ())) + suffix
                    for prompt, completion, suffix, s in zip(prompts, completions, tests, stops, strict=True)]
        return [1.0 if result.passed else 0.0 for result in run_programs(programs, self.limits, self.workers)]


class FormatRegex:
    """`format_regex`: 1.0 where `re.match(pattern, completion, re.DOTALL)` matches, else 0.0."""

    reads_text = True

    def __init__(self, pattern: str, where: str = "format_regex"):
        try:
            self.regex = re.compile(pattern, re.DOTALL)
        except (re.error, TypeError) as error:
            raise ConfigError(f"{where} pattern {pattern!r} is not a regular expression ({error}).") from None
        self.__name__ = f"format_regex({pattern!r})"

    def __call__(self, prompts: list[str], completions: list[str], **_) -> list[float]:
        return [1.0 if self.regex.match(c) else 0.0 for c in completions]


# ----------------------------------------------------------------------------- specs
@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """One configured reward: a built-in name or 'module:function', its weight and (format_regex) pattern."""

    name: str
    weight: float = 1.0
    pattern: str | None = None


def import_function(path: str, where: str) -> RewardFn:
    """The callable at 'module:function' (the function part may be dotted: 'module:Class.method')."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"{where} {path!r} is not 'module:function'.")
    try:
        target = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 - any import failure is the user's file, said in one sentence
        raise ConfigError(f"{where} {path!r} does not import ({type(error).__name__}: {error}).") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"{where} {path!r}: module {module_name} has no attribute {attribute!r}.")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{where} {path!r} is a {type(target).__name__}, not a function.")
    return target


def build_function(spec: RewardSpec, where: str, code_limits: Limits = Limits(), code_workers: int | None = None
                   ) -> RewardFn:
    """The callable a spec names; `where` (e.g. 'grpo.rewards[0]') starts every complaint."""
    if not isinstance(spec.name, str) or not spec.name:
        raise ConfigError(f"{where} name is {spec.name!r}; expected a built-in ({', '.join(BUILTINS)}) "
                          f"or 'module:function'.")
    if spec.pattern is not None and spec.name != "format_regex":
        raise ConfigError(f"{where} has a pattern but {spec.name!r} takes none; expected a pattern only with "
                          f"format_regex.")
    if ":" in spec.name:
        return import_function(spec.name, where)
    if spec.name == "math_answer":
        return math_answer
    if spec.name == "code_tests":
        return CodeTests(code_limits, code_workers)
    if spec.name == "format_regex":
        if spec.pattern is None:
            raise ConfigError(f"{where} format_regex needs a pattern.")
        return FormatRegex(spec.pattern, where)
    raise ConfigError(f"{where} {spec.name!r} is not a built-in reward ({', '.join(BUILTINS)}) nor "
                      f"'module:function'.{did_you_mean(spec.name, BUILTINS)}")


def _check_weight(weight, where: str) -> float:
    if not (isinstance(weight, numbers.Real) and not isinstance(weight, bool) and math.isfinite(weight) and weight > 0):
        raise ConfigError(f"{where} weight is {weight!r}; expected a positive number.")
    return float(weight)


# ----------------------------------------------------------------------------- scoring
@dataclasses.dataclass(frozen=True)
class Rewards:
    """One call's rewards: total [N] (weighted sum, None left out; NaN where every function gave None, which
    `grpo.group_advantages` leaves out as TRL does), per_function [F, N] (NaN for None)."""

    total: np.ndarray
    per_function: np.ndarray
    failed: tuple[str, ...]  # the names of the functions that failed in this call


class RewardSet:
    """Several reward functions with weights: `rewards = reward_set(prompts, completions, **columns)`.

    total = sum over functions of weight * reward, where None rewards are left out (TRL's nansum; a
    completion no function applies to is NaN). `failures[name]` counts the calls in which that function
    failed (see the module docstring).
    """

    def __init__(self, functions: Sequence[RewardFn], weights: Sequence[float] | None = None,
                 names: Sequence[str] | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, where: str = "grpo.rewards"):
        if not functions:
            raise ConfigError(f"{where} is empty; expected at least one reward function.")
        weights = [1.0] * len(functions) if weights is None else list(weights)
        if len(weights) != len(functions):
            raise ConfigError(f"{where} has {len(functions)} functions and {len(weights)} weights; expected one "
                              f"weight per function.")
        self.weights = np.array([_check_weight(w, f"{where}[{i}]") for i, w in enumerate(weights)], np.float64)
        self.functions = list(functions)
        self.names = list(names) if names is not None else [_name_of(f) for f in functions]
        if not (isinstance(timeout_s, numbers.Real) and timeout_s > 0):
            raise ConfigError(f"{where} timeout is {timeout_s!r}; expected a positive number of seconds.")
        self.timeout_s = float(timeout_s)
        self.failures = {name: 0 for name in self.names}
        self._abandoned: dict[str, threading.Thread] = {}  # a call past its timeout, maybe still running

    @classmethod
    def from_specs(cls, specs: Sequence[str | dict | RewardSpec], *, timeout_s: float = DEFAULT_TIMEOUT_S,
                   code_limits: Limits = Limits(), code_workers: int | None = None, key: str = "grpo.rewards"
                   ) -> RewardSet:
        """From config entries: 'math_answer', 'pkg.mod:fn', or {'name', 'weight', 'pattern'} objects."""
        if isinstance(specs, (str, dict)) or not isinstance(specs, Sequence) or not specs:
            raise ConfigError(f"{key} is {specs!r}; expected a non-empty list of reward functions.")
        functions, weights, names = [], [], []
        for i, raw in enumerate(specs):
            where = f"{key}[{i}]"
            spec = _to_spec(raw, where)
            weights.append(_check_weight(spec.weight, where))
            function = build_function(spec, where, code_limits, code_workers)
            functions.append(function)
            names.append(_name_of(function))
        return cls(functions, weights, _unique(names), timeout_s, key)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 prompt_messages: Sequence[list] | None = None, /, **columns: Sequence) -> Rewards:
        """`prompts` rendered, `completions` as text; `prompt_messages`: the prompts' message lists when the
        prompts are conversational, which user functions then get with message-shaped completions (TRL's way).
        Positional only, so that a prompt file's column of any name reaches the functions as it is."""
        n = len(completions)
        per_function = np.zeros((len(self.functions), n), np.float64)
        failed = []
        for f, (function, name) in enumerate(zip(self.functions, self.names)):
            given = (list(prompts), list(completions))
            if prompt_messages is not None and not getattr(function, "reads_text", False):
                # Each call gets its own copies: a group's prompts are one record's messages, which later
                # batches and the held-out scoring read too (a function may append the completion to them).
                given = ([copy.deepcopy(m) for m in prompt_messages],
                         [[{"role": "assistant", "content": c}] for c in completions])
            stuck = self._abandoned.get(name)
            if stuck is not None and stuck.is_alive():
                # One abandoned call per function at most: a hung (or spinning) function must not pile up threads.
                values, why = None, "is still running an earlier call that passed its timeout (not called again)"
            else:
                values, why, worker = _call_with_timeout(function, *given, columns, self.timeout_s)
                if worker.is_alive():
                    self._abandoned[name] = worker
            if why is None:
                values, why = _as_rewards(values, n)
            if why is not None:
                log.warning("reward function %s %s; its rewards for this batch are 0.", name, why)
                self.failures[name] += 1
                failed.append(name)
                values = np.zeros(n)
            per_function[f] = values
        weighted = per_function * self.weights[:, None]
        total = np.where(np.isnan(weighted), 0.0, weighted).sum(axis=0)
        # TRL 1.16: a completion no function scored is NaN, left out of its group's mean and std (advantage 0).
        total[np.isnan(per_function).all(axis=0)] = np.nan
        return Rewards(total, per_function, tuple(failed))


def _to_spec(raw, where: str) -> RewardSpec:
    if isinstance(raw, RewardSpec):
        return raw
    if isinstance(raw, str):
        return RewardSpec(raw)
    if isinstance(raw, dict):
        unknown = set(raw) - {"name", "weight", "pattern"}
        if unknown:
            raise ConfigError(f"{where} has unknown key(s) {', '.join(sorted(unknown))}; expected name, weight, "
                              f"pattern.")
        if "name" not in raw:
            raise ConfigError(f"{where} has no 'name'; expected a built-in ({', '.join(BUILTINS)}) or "
                              f"'module:function'.")
        return RewardSpec(raw["name"], raw.get("weight", 1.0), raw.get("pattern"))
    raise ConfigError(f"{where} is {raw!r}; expected a name or an object with name, weight, pattern.")


def _name_of(function) -> str:
    return getattr(function, "__name__", None) or type(function).__name__


def _unique(names: list[str]) -> list[str]:
    """Names that tell repeated functions apart: f, f#2, ..."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out


def _call_with_timeout(function, prompts, completions, columns, timeout_s
                       ) -> tuple[object, str | None, threading.Thread]:
    """(the function's return value, None) or (None, why it failed), and the daemon thread the call ran in."""
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = function(prompts, completions, **columns)
        except BaseException as error:  # noqa: BLE001 - a user function's failure is reported, never raised
            outcome["error"] = error

    worker = threading.Thread(target=target, daemon=True, name="reward")
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        return None, f"ran past its {timeout_s:g} s timeout (abandoned)", worker
    if "error" in outcome:
        error = outcome["error"]
        return None, f"raised {type(error).__name__}: {error}", worker
    return outcome["value"], None, worker


def _as_rewards(values, n: int) -> tuple[np.ndarray | None, str | None]:
    """float64 [n] with NaN for None, or (None, why the value is not a list of n numbers or None)."""
    if isinstance(values, np.ndarray):
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        return None, f"returned {type(values).__name__}, not a list of {n} numbers"
    if len(values) != n:
        return None, f"returned {len(values)} rewards for {n} completions"
    out = np.empty(n, np.float64)
    for i, value in enumerate(values):
        if value is None:
            out[i] = np.nan
        elif isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isinf(value):
            out[i] = float(value)
        else:
            return None, f"returned {value!r} at index {i}, not a finite number or None"
    return out, None


# ----------------------------------------------------------------------------- prompts
@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """A prompt and the columns its reward functions read (answer, tests, stop, ...)."""

    text: str  # the prompt as the model reads it (a conversational one rendered with the chat template)
    columns: dict
    messages: list | None = None  # a conversational prompt's messages, as the file gives them
    where: str = dataclasses.field(default="", compare=False)  # "FILE line N", for a template that fails on it


PROMPT_TASKS = ("gsm8k", "mbpp", "humaneval", "jsonl")


def read_prompts(path: Path | None, task: str, *, prompt_field: str = "prompt", answer_field: str | None = "answer",
                 num_fewshot: int = 0) -> list[PromptRecord]:
    """Prompts for GRPO from a task file (None: the shipped sample) or a prompt-only JSONL.

    gsm8k -> columns {answer} (the gold number; `num_fewshot` worked examples before each question);
    mbpp, humaneval -> {task_id, tests, stop} (for `code_tests`);
    jsonl -> each record's `prompt_field` is the prompt, a string or (conversational) a list of {role, content}
    messages ending with a user or system turn (`render_prompts` renders those), `answer_field` (a string or
    number; None: not required) its answer, and every other field a column too (None where a record lacks it).
    """
    if task not in PROMPT_TASKS:
        raise ConfigError(f"grpo prompt task {task!r} is unknown; expected one of {', '.join(PROMPT_TASKS)}."
                          f"{did_you_mean(task, PROMPT_TASKS)}")
    if task == "jsonl":
        if path is None:
            raise ConfigError("grpo prompt task 'jsonl' needs a prompt file.")
        return _read_prompt_jsonl(Path(path), prompt_field, answer_field)
    _, items = load_task(task, None if path is None else Path(path), num_fewshot)
    if task == "gsm8k":
        return [PromptRecord(item.prompt, {"answer": item.answer}) for item in items if isinstance(item, Generation)]
    return [PromptRecord(item.prompt, {"task_id": item.task_id, "tests": item.test_suffix, "stop": list(item.stop)})
            for item in items if isinstance(item, CodeTask)]


def _read_prompt_jsonl(path: Path, prompt_field: str, answer_field: str | None) -> list[PromptRecord]:
    if not path.is_file():
        raise UserInputError(f"prompt file {path} does not exist.")
    records = []
    for n, record in jsonl_objects(path):
        where = f"{path} line {n}"
        for field, expected in ((prompt_field, (str, list)), (answer_field, (str, int, float))):
            if field is None:
                continue
            if field not in record:
                raise UserInputError(f"{where} has no field '{field}'; expected the fields "
                                     f"{', '.join(f for f in (prompt_field, answer_field) if f)}.")
            check_field(record[field], expected, where, field)
        prompt = record[prompt_field]
        if not prompt:
            raise UserInputError(f"{where} field '{prompt_field}' is empty; expected a prompt.")
        if isinstance(prompt, list):
            check_messages(prompt, where, prompt_field)
            if prompt[-1]["role"] == "assistant":
                raise UserInputError(f"{where}: '{prompt_field}' ends with an assistant turn; expected a prompt "
                                     f"ending with a user (or system) turn for the model to answer.")
        if records and isinstance(prompt, list) != isinstance(records[0][0], list):
            this, first = ("a message list", "text") if isinstance(prompt, list) else ("text", "a message list")
            raise UserInputError(f"{where}: '{prompt_field}' is {this} but the file's first prompt is {first}; "
                                 f"expected one kind of prompt per file.")
        records.append((prompt, {k: v for k, v in record.items() if k != prompt_field}, where))
    if not records:
        raise UserInputError(f"prompt file {path} holds no records.")
    keys = sorted({k for _, columns, _ in records for k in columns})
    return [PromptRecord("", {k: columns.get(k) for k in keys}, prompt, where) if isinstance(prompt, list)
            else PromptRecord(prompt, {k: columns.get(k) for k in keys}) for prompt, columns, where in records]


def render_prompts(records: list[PromptRecord], template) -> list[PromptRecord]:
    """The records with each conversational prompt rendered by the chat template, with its generation prompt (as
    TRL's GRPOTrainer renders them); plain-text prompts as they are."""
    return [dataclasses.replace(r, text=_render(r, template)) if r.messages is not None else r for r in records]


def _render(record: PromptRecord, template) -> str:
    try:
        return template.render(record.messages, add_generation_prompt=True)
    except UserInputError as error:  # which record: the template may fail on one conversation of many
        raise UserInputError(f"{record.where}: {error}" if record.where else str(error)) from None


def gather_columns(records: Sequence[PromptRecord], repeat: int = 1
                   ) -> tuple[list[str], list[list] | None, dict[str, list]]:
    """(prompts, prompt messages, columns) for `RewardSet`, each record repeated `repeat` times in a row (a GRPO
    group); the prompt messages are None unless the prompts are conversational. Kept apart from the columns,
    which are the file's own fields whatever their names."""
    prompts = [r.text for r in records for _ in range(repeat)]
    keys = list(records[0].columns) if records else []
    columns = {k: [r.columns.get(k) for r in records for _ in range(repeat)] for k in keys}
    messages = ([r.messages for r in records for _ in range(repeat)]
                if records and records[0].messages is not None else None)
    return prompts, messages, columns
