"""Benchmark task files (local JSONL in the public datasets' field layouts) -> evaluation items.

Families, as Phi-2's release reports them:
  multiple choice, scored by log-likelihood: piqa, arc (arc_easy / arc_challenge),
    hellaswag, winogrande, boolq, mmlu, siqa, openbookqa
  generation with an extracted answer: gsm8k, bbh (a folder of tasks with chain-of-thought prompts: `bbh.py`)
  code run against unit tests: humaneval, mbpp
Prompts follow lm-evaluation-harness' formats. Small sample files for each
family ship in `phi2_jax/evaluation/samples/` (`--task piqa` uses the sample).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from phi2_jax.errors import UserInputError
from phi2_jax.util.jsonl import jsonl_objects

SAMPLES = Path(__file__).parent / "samples"


@dataclasses.dataclass(frozen=True)
class MultipleChoice:
    options: list[tuple[str, str]]   # (context, continuation) per choice
    gold: int


@dataclasses.dataclass(frozen=True)
class Generation:
    prompt: str
    answer: str


@dataclasses.dataclass(frozen=True)
class CodeTask:
    task_id: str
    prompt: str
    test_suffix: str                 # appended after prompt + completion to make the test program
    stop: tuple[str, ...]


STRINGS = "list of strings"  # a field type: a JSON list whose items are all strings
# Each family's fields and their JSON types: (required, optional). A type is a Python type, a tuple of
# them, or STRINGS.
FIELDS = {
    "piqa": ({"goal": str, "sol1": str, "sol2": str, "label": (int, str)}, {}),
    "arc": ({"question": (str, dict), "answerKey": (str, int)}, {"choices": dict}),
    "hellaswag": ({"endings": STRINGS, "label": (int, str)}, {"ctx": str, "ctx_a": str, "ctx_b": str}),
    "winogrande": ({"sentence": str, "option1": str, "option2": str, "answer": (str, int)}, {}),
    "boolq": ({"question": str, "passage": str}, {"answer": (bool, str, int), "label": (bool, str, int)}),
    "mmlu": ({"question": str, "choices": STRINGS, "answer": (int, str)}, {}),
    "siqa": ({"context": str, "question": str, "answerA": str, "answerB": str, "answerC": str, "label": (str, int)}, {}),
    "openbookqa": ({"question_stem": str, "choices": dict, "answerKey": str}, {}),
    "gsm8k": ({"question": str, "answer": str}, {}),
    "humaneval": ({"task_id": str, "prompt": str, "test": str, "entry_point": str}, {}),
    "mbpp": ({"task_id": (int, str), "text": str, "test_list": STRINGS}, {"test_setup_code": (str, type(None))}),
}
REQUIRED = {name: tuple(required) for name, (required, _) in FIELDS.items()}
_NAMES = {str: "a string", int: "an integer", bool: "true or false", dict: "an object", list: "a list",
          float: "a number", type(None): "null"}


def _kind_of(value) -> str:
    """How a JSON value reads in a sentence: 'a string', 'a list', ..."""
    return _NAMES.get(type(value), type(value).__name__)


def _has_type(value, expected) -> bool:
    if expected == STRINGS:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    expected = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool):  # JSON true/false is not an integer here
        return bool in expected
    return isinstance(value, expected)


def _describe(expected) -> str:
    if expected == STRINGS:
        return "a list of strings"
    expected = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(_NAMES[t] for t in expected)


def check_field(value, expected, where: str, field: str) -> None:
    """Raises one sentence if `value` (field `field` of the record at `where`) is not of the `expected` type."""
    if not _has_type(value, expected):
        raise UserInputError(f"{where} field '{field}' is {_kind_of(value)}; expected {_describe(expected)}.")


KIND = {"piqa": "multiple_choice", "arc": "multiple_choice", "hellaswag": "multiple_choice",
        "winogrande": "multiple_choice", "boolq": "multiple_choice", "mmlu": "multiple_choice",
        "siqa": "multiple_choice", "openbookqa": "multiple_choice",
        "gsm8k": "generation", "humaneval": "code", "mbpp": "code", "bbh": "bbh"}
ALIASES = {"arc_easy": "arc", "arc_challenge": "arc"}


def family(name: str) -> str:
    """The task family of a task name ('arc_easy' -> 'arc'), or a clear error."""
    base = ALIASES.get(name, name)
    if base not in KIND:
        raise UserInputError(f"unknown task '{name}'; expected one of {', '.join(sorted([*KIND, *ALIASES]))}.")
    return base


def read_jsonl(path: Path, base: str) -> list[tuple[str, dict]]:
    """(where, record) for each record of a task file, where = '<path> line <n>'; a missing field or one of
    the wrong type is reported with its line number."""
    if not path.is_file():
        raise UserInputError(f"task file {path} does not exist.")
    required, optional = FIELDS[base]
    records = []
    for n, record in jsonl_objects(path):
        where = f"{path} line {n}"
        for field, expected in required.items():
            if field not in record:
                raise UserInputError(f"{where} has no field '{field}'; this task needs {', '.join(required)}.")
            check_field(record[field], expected, where, field)
        for field, expected in optional.items():
            if field in record:
                check_field(record[field], expected, where, field)
        records.append((where, record))
    if not records:
        raise UserInputError(f"task file {path} holds no records.")
    return records


# ----------------------------------------------------------------------------- multiple choice
def _check_keys(value: dict, fields: dict, where: str, name: str) -> None:
    for key, expected in fields.items():
        if key not in value:
            raise UserInputError(f"{where} field '{name}' has no '{key}'; expected {', '.join(fields)}.")
        check_field(value[key], expected, where, f"{name}.{key}")


def _label_index(value, labels: list[str], where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        index = value
    elif str(value).strip().isdigit() and str(value).strip() not in labels:
        index = int(str(value).strip())
    else:
        if str(value) not in labels:
            raise UserInputError(f"{where}: answer {value!r} is not one of the choice labels {labels}.")
        index = labels.index(str(value))
    if not 0 <= index < len(labels):
        raise UserInputError(f"{where}: answer index {index} is outside the {len(labels)} choices.")
    return index


def multiple_choice(base: str, record: dict, where: str) -> MultipleChoice:
    """One record of a multiple-choice family as (context, continuation) options and the gold index."""
    if base == "piqa":
        context = f"Question: {record['goal']}\nAnswer:"
        return MultipleChoice([(context, " " + record["sol1"]), (context, " " + record["sol2"])],
                              _label_index(record["label"], ["0", "1"], where))
    if base == "arc":
        question = record["question"]
        if isinstance(question, dict):  # the original AI2 layout: {"stem", "choices": [{"text", "label"}]}
            _check_keys(question, {"stem": str, "choices": list}, where, "question")
            for n, choice in enumerate(question["choices"]):
                check_field(choice, dict, where, f"question.choices[{n}]")
                _check_keys(choice, {"text": str, "label": (str, int)}, where, f"question.choices[{n}]")
            texts = [c["text"] for c in question["choices"]]
            labels = [str(c["label"]) for c in question["choices"]]
            question = question["stem"]
        else:                           # the Hugging Face layout: "choices": {"text": [...], "label": [...]}
            if "choices" not in record:
                raise UserInputError(f"{where} has no field 'choices'; this task needs question, choices, answerKey.")
            _check_keys(record["choices"], {"text": STRINGS, "label": STRINGS}, where, "choices")
            texts, labels = record["choices"]["text"], record["choices"]["label"]
        if len(texts) != len(labels) or not texts:
            raise UserInputError(f"{where}: the choices have {len(texts)} texts and {len(labels)} labels; "
                                 f"expected the same number, at least one.")
        context = f"Question: {question}\nAnswer:"
        return MultipleChoice([(context, " " + t) for t in texts], _label_index(record["answerKey"], labels, where))
    if base == "hellaswag":
        context = record.get("ctx") or f"{record.get('ctx_a', '')} {record.get('ctx_b', '')}".strip()
        if not context:
            raise UserInputError(f"{where} has no field 'ctx'; this task needs ctx, endings, label.")
        labels = [str(i) for i in range(len(record["endings"]))]
        return MultipleChoice([(context, " " + e) for e in record["endings"]],
                              _label_index(record["label"], labels, where))
    if base == "winogrande":
        sentence = record["sentence"]
        if "_" not in sentence:
            raise UserInputError(f"{where}: sentence has no '_' blank to fill.")
        blank = sentence.index("_")
        rest = " " + sentence[blank + 1:].strip()
        # Partial scoring: each option fills the blank in the context; the shared rest is scored.
        options = [(sentence[:blank] + record["option1"], rest), (sentence[:blank] + record["option2"], rest)]
        return MultipleChoice(options, _label_index(str(record["answer"]), ["1", "2"], where))
    if base == "boolq":
        answer = record.get("answer", record.get("label"))
        if answer is None:
            raise UserInputError(f"{where} has no field 'answer'; this task needs question, passage, answer.")
        context = f"{record['passage']}\nQuestion: {record['question']}?\nAnswer:"
        if isinstance(answer, str) and answer.lower() not in ("false", "true"):
            raise UserInputError(f"{where} field 'answer' is {answer!r}; expected true or false.")
        gold = int(answer) if isinstance(answer, (bool, int)) else ["false", "true"].index(answer.lower())
        if gold not in (0, 1):
            raise UserInputError(f"{where} field 'answer' is {answer!r}; expected true or false.")
        return MultipleChoice([(context, " no"), (context, " yes")], gold)
    if base == "mmlu":
        if not 1 <= len(record["choices"]) <= 10:
            raise UserInputError(f"{where} field 'choices' has {len(record['choices'])} choices; expected 1 to 10.")
        letters = "ABCDEFGHIJ"[: len(record["choices"])]
        lines = [record["question"].strip()] + [f"{l}. {c}" for l, c in zip(letters, record["choices"])]
        context = "\n".join(lines) + "\nAnswer:"
        return MultipleChoice([(context, f" {l}") for l in letters], _label_index(record["answer"], list(letters), where))
    if base == "siqa":
        context = f"Q: {record['context']} {record['question']}\nA:"
        options = [(context, " " + record[key]) for key in ("answerA", "answerB", "answerC")]
        return MultipleChoice(options, _label_index(str(record["label"]), ["1", "2", "3"], where))
    if base == "openbookqa":
        _check_keys(record["choices"], {"text": STRINGS, "label": STRINGS}, where, "choices")
        texts, labels = record["choices"]["text"], record["choices"]["label"]
        if len(texts) != len(labels) or not texts:
            raise UserInputError(f"{where}: the choices have {len(texts)} texts and {len(labels)} labels; "
                                 f"expected the same number, at least one.")
        return MultipleChoice([(record["question_stem"], " " + t) for t in texts],
                              _label_index(record["answerKey"], labels, where))
    raise AssertionError(base)


# ----------------------------------------------------------------------------- generation
_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def gsm8k_gold(answer: str) -> str:
    return normalise_number(answer.split("####")[-1])


def normalise_number(text: str) -> str:
    """'1,234.50' -> '1234.5'; the last number in `text`, or '' if none."""
    numbers = _NUMBER.findall(text.replace("$", ""))
    if not numbers:
        return ""
    value = numbers[-1].replace(",", "")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value


def extract_answer(completion: str) -> str:
    """The model's final answer: after '####' / 'answer is' if present, else the last number it wrote."""
    for marker in ("####", "answer is"):
        if marker in completion:
            return normalise_number(completion.split(marker)[-1].split("\n")[0]) or normalise_number(completion)
    return normalise_number(completion)


def gsm8k_prompt(record: dict, shots: list[dict]) -> str:
    examples = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
    return f"{examples}Question: {record['question']}\nAnswer:"


# ----------------------------------------------------------------------------- code
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
MBPP_STOP = ('\n"""', "\nassert", "\n\n\n")


def code_task(base: str, record: dict, where: str) -> CodeTask:
    """A HumanEval / MBPP record as prompt, test program suffix and stop strings."""
    if base == "humaneval":
        return CodeTask(record["task_id"], record["prompt"],
                        "\n\n" + record["test"] + f"\n\ncheck({record['entry_point']})\n", HUMANEVAL_STOP)
    tests = record["test_list"]
    if not tests:
        raise UserInputError(f"{where} field 'test_list' is empty; expected at least one test.")
    prompt = f'"""\n{record["text"]}\n{tests[0]}\n"""\n'
    setup = record.get("test_setup_code", "") or ""
    return CodeTask(str(record["task_id"]), prompt, "\n\n" + setup + "\n" + "\n".join(tests) + "\n", MBPP_STOP)


def _with_shots(items: list[MultipleChoice], n: int, shots: int) -> MultipleChoice:
    """Item n preceded by the first `shots` other items, each with its right answer."""
    examples = [items[m] for m in range(len(items)) if m != n][:shots]
    prefix = "".join(context + answer + "\n\n" for context, answer in (e.options[e.gold] for e in examples))
    return MultipleChoice([(prefix + c, x) for c, x in items[n].options], items[n].gold)


def load_task(name: str, path: Path | None, num_fewshot: int | None) -> tuple[str, list]:
    """(family kind, items) for a task file (or the shipped sample when `path` is None)."""
    base = family(name)
    if base == "bbh":  # a folder of tasks, each with its prompt file
        from phi2_jax.evaluation.bbh import load_bbh

        return "bbh", load_bbh(path)
    path = path or SAMPLES / f"{base}.jsonl"
    records = read_jsonl(path, base)
    kind = KIND[base]
    if kind == "multiple_choice":
        items = [multiple_choice(base, r, where) for where, r in records]
        if num_fewshot:
            items = [_with_shots(items, n, num_fewshot) for n in range(len(items))]
        return kind, items
    if kind == "generation":
        shots = 5 if num_fewshot is None else num_fewshot
        items = []
        for n, (_, r) in enumerate(records):
            others = [o for m, (_, o) in enumerate(records) if m != n][:shots]
            items.append(Generation(gsm8k_prompt(r, others), gsm8k_gold(r["answer"])))
        return kind, items
    return kind, [code_task(base, r, where) for where, r in records]
