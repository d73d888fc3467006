"""GRPO reward functions on hand-written completions, their failure handling, specs and prompt files."""

import json
import logging
import time

import numpy as np
import pytest

from phi2_jax.errors import ConfigError, UserInputError
from phi2_jax.evaluation.sandbox import Limits
from phi2_jax.evaluation.tasks import SAMPLES
from phi2_jax.training import rewards
from phi2_jax.training.rewards import RewardSet, read_prompts

FAST = Limits(seconds=3.0)  # generous for a loaded machine, short enough for the hanging program


# ----------------------------------------------------------------------------- built-ins
def test_math_answer_compares_the_extracted_number_with_the_gold():
    completions = ["3 * 4 = 12, minus 2 is 10. The answer is 10.", "I think it is 12.\n#### 12",
                   "Half of 1,200 is 600, so 600 take the bus", "no number at all", "#### 7"]
    answers = ["Tom starts with 12.\n#### 10", "10", 600, "", "7.0"]
    assert rewards.math_answer([""] * 5, completions, answer=answers) == [1.0, 0.0, 1.0, 0.0, 1.0]


def test_code_tests_run_prompt_completion_and_tests_in_the_sandbox():
    prompt = "def add(a, b):\n"
    tests = "\n\nassert add(1, 2) == 3\n"
    completions = ["    return a + b\n",                              # right
                   "    return a - b\n",                              # wrong
                   "    while True:\n        pass\n",                  # hangs: the tests never finish
                   "    return a + b\nassert False, 'cut at the stop string'\n"]  # right once cut at "\nassert"
    score = rewards.CodeTests(FAST, workers=4)
    start = time.monotonic()
    got = score([prompt] * 4, completions, tests=[tests] * 4, stop=[["\nassert"]] * 4)
    assert got == [1.0, 0.0, 0.0, 1.0]
    assert time.monotonic() - start < 2 * FAST.seconds + 5  # the programs ran side by side
    assert score([prompt], completions[3:], tests=[tests]) == [0.0]  # without the stop string the assert runs


def test_code_tests_on_mbpp_prompts_with_the_reference_solutions():
    records = read_prompts(None, "mbpp")
    lines = [json.loads(line) for line in (SAMPLES / "mbpp.jsonl").read_text().splitlines() if line.strip()]
    prompts, _, columns = rewards.gather_columns(records)
    right = [line["code"] + "\n" for line in lines]
    wrong = ["def unrelated():\n    pass\n"] * len(lines)
    got = rewards.CodeTests(FAST)(prompts * 2, right + wrong, **{k: v * 2 for k, v in columns.items()})
    assert got == [1.0] * len(lines) + [0.0] * len(lines)


def test_format_regex_matches_from_the_start_across_lines():
    fn = rewards.FormatRegex(r"<think>.*?</think>\s*<answer>.*?</answer>$")
    completions = ["<think>a\nb</think>\n<answer>4</answer>", "<answer>4</answer>",
                   "so: <think>x</think><answer>4</answer>", "<think>x</think><answer>4</answer> trailing"]
    assert fn([""] * 4, completions) == [1.0, 0.0, 0.0, 0.0]


# ----------------------------------------------------------------------------- failures
def broken(prompts, completions, **_):
    raise ValueError("boom")


def sleepy(prompts, completions, **_):
    time.sleep(3)
    return [1.0] * len(completions)


def stringly(prompts, completions, **_):
    return "x"


def short(prompts, completions, **_):
    return [1.0]


def letters(prompts, completions, **_):
    return ["x"] * len(completions)


def length(prompts, completions, **_):
    return [float(len(c)) for c in completions]


def partial(prompts, completions, **_):
    return [None, 2.0]


ABANDONED = "ran past its 0.3 s timeout (abandoned)"
STILL_RUNNING = "is still running an earlier call that passed its timeout (not called again)"


@pytest.mark.parametrize("function,why,why_again", [
    (broken, "raised ValueError: boom", None),
    # A hung function is not called again while its abandoned call runs: one stuck thread, not one per batch.
    (sleepy, ABANDONED, STILL_RUNNING),
    (stringly, "returned str, not a list of 2 numbers", None),
    (short, "returned 1 rewards for 2 completions", None),
    (letters, "returned 'x' at index 0, not a finite number or None", None),
])
def test_a_failing_function_scores_zero_with_one_warning_and_a_count(caplog, function, why, why_again):
    scorer = RewardSet([length, function], weights=[0.5, 2.0], timeout_s=0.3)
    with caplog.at_level(logging.WARNING, logger="phi2_jax.training.rewards"):
        first = scorer(["p", "q"], ["ab", "abcd"])
        second = scorer(["p", "q"], ["ab", "abcd"])
    name = function.__name__
    assert [r.getMessage() for r in caplog.records] == [
        f"reward function {name} {w}; its rewards for this batch are 0." for w in (why, why_again or why)]
    np.testing.assert_array_equal(first.per_function, [[2.0, 4.0], [0.0, 0.0]])
    np.testing.assert_array_equal(first.total, [1.0, 2.0])  # the other function still counts
    assert first.failed == second.failed == (name,)
    assert scorer.failures == {"length": 0, name: 2}


def test_a_hung_function_is_called_again_once_its_abandoned_call_ends():
    calls = []

    def slow(prompts, completions, **_):
        calls.append(1)
        time.sleep(0.6)
        return [1.0] * len(completions)

    scorer = RewardSet([slow], timeout_s=0.2)
    assert scorer(["p"], ["a"]).failed == ("slow",) and scorer(["p"], ["a"]).failed == ("slow",)
    assert len(calls) == 1  # the second batch did not start another call beside the hung one
    time.sleep(0.8)  # the abandoned call has ended: the function is tried again
    scorer(["p"], ["a"])
    assert len(calls) == 2


def test_none_is_left_out_and_all_none_is_unscorable():
    scorer = RewardSet([length, partial], weights=[1.0, 3.0])
    result = scorer(["p", "q"], ["ab", "abcd"])
    np.testing.assert_array_equal(result.total, [2.0, 10.0])
    assert np.isnan(result.per_function[1, 0])
    nothing = RewardSet([partial])(["p", "q"], ["a", "b"])
    assert np.isnan(nothing.total[0]) and nothing.total[1] == 2.0
    assert nothing.failed == ()


# ----------------------------------------------------------------------------- specs
def test_specs_build_builtins_and_user_functions(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def brevity(prompts, completions, **columns):\n"
                                            "    return [-float(len(c)) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    scorer = RewardSet.from_specs(["math_answer", {"name": "my_rewards:brevity", "weight": 0.5},
                                   {"name": "format_regex", "pattern": r"\d", "weight": 2}])
    assert scorer.names == ["math_answer", "brevity", "format_regex('\\\\d')"]
    result = scorer(["q", "q"], ["#### 42", "it is 41"], answer=["42", "42"])
    np.testing.assert_array_equal(result.per_function, [[1.0, 0.0], [-7.0, -8.0], [0.0, 0.0]])
    np.testing.assert_array_equal(result.total, [1.0 - 3.5, -4.0])


@pytest.mark.parametrize("specs,message", [
    (["math_answr"], "grpo.rewards[0] 'math_answr' is not a built-in reward (math_answer, code_tests, format_regex) "
                     "nor 'module:function'. Did you mean 'math_answer'?"),
    (["no_such_module_xyz:fn"], "grpo.rewards[0] 'no_such_module_xyz:fn' does not import (ModuleNotFoundError: No "
                                "module named 'no_such_module_xyz')."),
    (["math_answer", "json:nope"], "grpo.rewards[1] 'json:nope': module json has no attribute 'nope'."),
    (["json:decoder"], "grpo.rewards[0] 'json:decoder' is a module, not a function."),
    ([{"name": "math_answer", "weight": 0}], "grpo.rewards[0] weight is 0; expected a positive number."),
    ([{"name": "math_answer", "weight": -1.5}], "grpo.rewards[0] weight is -1.5; expected a positive number."),
    ([{"name": "math_answer", "weight": "1"}], "grpo.rewards[0] weight is '1'; expected a positive number."),
    ([{"name": "format_regex"}], "grpo.rewards[0] format_regex needs a pattern."),
    ([{"name": "format_regex", "pattern": "("}], "grpo.rewards[0] pattern '(' is not a regular expression "
                                                 "(missing ), unterminated subpattern at position 0)."),
    ([{"name": "math_answer", "wieght": 2}], "grpo.rewards[0] has unknown key(s) wieght; expected name, weight, "
                                             "pattern."),
    ([], "grpo.rewards is []; expected a non-empty list of reward functions."),
])
def test_bad_specs_are_refused_in_one_sentence(specs, message):
    with pytest.raises(ConfigError) as error:
        RewardSet.from_specs(specs)
    assert str(error.value) == message


# ----------------------------------------------------------------------------- prompts
def test_read_prompts_from_task_files():
    gsm8k = read_prompts(None, "gsm8k")
    assert [r.columns for r in gsm8k] == [{"answer": "10"}, {"answer": "36"}, {"answer": "600"}]
    assert gsm8k[0].text == ("Question: Tom has 3 boxes with 4 apples in each box. He eats 2 apples. How many "
                             "apples are left?\nAnswer:")
    mbpp = read_prompts(None, "mbpp")
    assert mbpp[0].columns["tests"].strip().startswith("assert max_of_three(1, 5, 3) == 5")
    assert mbpp[0].columns["stop"] == ['\n"""', "\nassert", "\n\n\n"]
    humaneval = read_prompts(None, "humaneval")
    assert humaneval[0].columns["tests"].rstrip().endswith(")")  # check(entry_point)
    prompts, messages, columns = rewards.gather_columns(gsm8k[:2], repeat=3)
    assert messages is None  # text prompts
    assert prompts == [gsm8k[0].text] * 3 + [gsm8k[1].text] * 3
    assert columns == {"answer": ["10"] * 3 + ["36"] * 3}


def test_read_prompts_from_a_prompt_jsonl(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"question": "2+2?", "gold": 4, "source": "a"}\n\n{"question": "3+3?", "gold": "6"}\n')
    records = read_prompts(path, "jsonl", prompt_field="question", answer_field="gold")
    assert [(r.text, r.columns) for r in records] == [("2+2?", {"gold": 4, "source": "a"}),
                                                      ("3+3?", {"gold": "6", "source": None})]


def test_conversational_prompts_render_with_the_template_and_reach_user_functions_as_trl_passes_them(tmp_path):
    """TRL's GRPOTrainer on a conversational dataset: the prompt is rendered with the chat template and a generation
    prompt; reward functions get the prompts' message lists and each completion as [{"role": "assistant", "content":
    text}]. Our built-ins read text, so they get the rendered prompt and the completion's text."""
    from phi2_jax.data.chat import load_chat_template

    path = tmp_path / "p.jsonl"
    conversations = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
                     [{"role": "user", "content": "3+3?"}]]
    path.write_text("".join(json.dumps({"prompt": c, "answer": a}) + "\n" for c, a in zip(conversations, "46")))
    records = rewards.render_prompts(read_prompts(path, "jsonl"), load_chat_template(None))
    # The built-in template is Phi-2's model-card QA format, a system turn on its own line before it.
    assert [r.text for r in records] == ["Be brief.\nInstruct: 2+2?\nOutput:", "Instruct: 3+3?\nOutput:"]
    assert [r.messages for r in records] == conversations
    seen = {}

    def spy(prompts, completions, **columns):
        seen.update(prompts=prompts, completions=completions, columns=columns)
        return [1.0] * len(completions)

    prompts, messages, columns = rewards.gather_columns(records, repeat=2)
    result = RewardSet([rewards.math_answer, spy])(prompts, [" 4", " 5", " 6", " 6"], messages, **columns)
    np.testing.assert_array_equal(result.per_function[0], [1.0, 0.0, 1.0, 1.0])  # text, as before
    assert seen["prompts"] == [conversations[0]] * 2 + [conversations[1]] * 2
    assert seen["completions"] == [[{"role": "assistant", "content": c}] for c in (" 4", " 5", " 6", " 6")]
    assert seen["columns"] == {"answer": ["4", "4", "6", "6"]}


def test_conversational_prompts_render_with_the_template_the_run_started_from_trained_with(tmp_path):
    """SFT with data.chat_template=chatml.jinja, then GRPO from that run: the run records its tokenizer, whose folder
    has no template, and carries chatml in chat_template.jinja. The prompts were rendered with Phi-2's built-in
    template, a format the model never saw (and the GRPO run then saved that one for its exports)."""
    from phi2_jax.data.tokenizer import HFTokenizer, train_byte_level_bpe
    from phi2_jax.training.rollouts import grpo_splits
    from phi2_jax.training.run_config import load_run_config

    tokenizer = HFTokenizer(train_byte_level_bpe(["user: 2+2? assistant: 4"] * 8, 300, tmp_path / "tok"))
    sft_run = tmp_path / "sft"
    sft_run.mkdir()
    chatml = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
              "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (sft_run / "chat_template.jinja").write_text(chatml)
    prompts = tmp_path / "chat.jsonl"
    prompts.write_text(json.dumps({"prompt": [{"role": "user", "content": "2+2?"}], "answer": "4"}) + "\n")
    config = load_run_config(None, ["train.objective=grpo", f"checkpoint.init_from={sft_run}",
                                    f"data.sources=[{{path: {prompts}}}]", "data.val_fraction=0"])
    splits, records, _ = grpo_splits(config, tokenizer)
    assert [r.text for r in records] == ["<|user|>2+2?\n<|assistant|>"]
    assert splits.template.template == chatml and splits.template.source == str(sft_run / "chat_template.jinja")
    # data.chat_template still names another.
    (tmp_path / "plain.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    config.data.chat_template = str(tmp_path / "plain.jinja")
    assert [r.text for r in grpo_splits(config, tokenizer)[1]] == ["2+2?"]


def test_a_function_that_extends_its_prompts_changes_no_other_call(tmp_path):
    """TRL's idiom `prompt + completion` copies; `prompt.extend(completion)` changed the record's own messages,
    shared by its whole group and by every later batch."""
    from phi2_jax.data.chat import load_chat_template

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": "2+2?"}]}) + "\n")
    records = rewards.render_prompts(read_prompts(path, "jsonl", answer_field=None), load_chat_template(None))
    lengths = []

    def judge(prompts, completions, **_):
        for prompt, completion in zip(prompts, completions):
            lengths.append(len(prompt))
            prompt.extend(completion)
        return [1.0] * len(completions)

    scorer = RewardSet([judge])
    for _ in range(2):
        prompts, messages, columns = rewards.gather_columns(records, repeat=2)
        scorer(prompts, [" 4", " 5"], messages, **columns)
    assert lengths == [1, 1, 1, 1]
    assert records[0].messages == [{"role": "user", "content": "2+2?"}]


@pytest.mark.parametrize("conversational", [False, True])
def test_a_column_named_like_an_argument_reaches_user_functions_as_it_is(tmp_path, conversational):
    """The prompts' message lists went to RewardSet in a column called prompt_messages: a prompt file's own
    field of that name replaced a text run's prompts (and turned its completions into messages), or was
    overwritten by the messages in a conversational run; either way the function never saw the field."""
    from phi2_jax.data.chat import load_chat_template

    path = tmp_path / "p.jsonl"
    prompt = [{"role": "user", "content": "2+2?"}] if conversational else "2+2?"
    path.write_text(json.dumps({"prompt": prompt, "answer": "4", "prompt_messages": "the file's own"}) + "\n")
    seen = {}

    def spy(prompts, completions, **columns):
        seen.update(prompts=prompts, completions=completions, columns=columns)
        return [1.0] * len(completions)

    records = rewards.render_prompts(read_prompts(path, "jsonl"), load_chat_template(None))
    prompts, messages, columns = rewards.gather_columns(records)
    assert RewardSet([spy])(prompts, [" 4"], messages, **columns).failed == ()
    assert seen["prompts"] == [prompt]
    assert seen["completions"] == ([[{"role": "assistant", "content": " 4"}]] if conversational else [" 4"])
    assert seen["columns"] == {"answer": ["4"], "prompt_messages": ["the file's own"]}


@pytest.mark.parametrize("content,why", [
    (5, 'can only concatenate str (not "int") to str'),
    (None, "'dict object' has no attribute 'content'"),  # transformers drops None-valued keys before rendering
    ([{"type": "text", "text": "hi"}], 'can only concatenate str (not "list") to str'),
])
def test_a_conversational_prompt_the_template_cannot_render_is_named_by_file_and_line(tmp_path, content, why):
    """As SFT and DPO records: the sentence names the record (it named only the template)."""
    from phi2_jax.data.chat import load_chat_template

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": "fine"}], "answer": "1"}) + "\n\n"
                    + json.dumps({"prompt": [{"role": "user", "content": content}], "answer": "2"}) + "\n")
    with pytest.raises(UserInputError) as error:
        rewards.render_prompts(read_prompts(path, "jsonl"), load_chat_template(None))
    assert str(error.value) == f"{path} line 3: the chat template (built-in Phi-2) failed to render a conversation: {why}."


@pytest.mark.parametrize("text,message", [
    ('{"prompt": "x"}\n', "{path} line 1 has no field 'answer'; expected the fields prompt, answer."),
    ('{"prompt": ["x"], "answer": "1"}\n', "{path} line 1: 'prompt'[0] is not a {{'role', 'content'}} message."),
    ('{"prompt": {"x": 1}, "answer": "1"}\n', "{path} line 1 field 'prompt' is an object; expected a string or a "
                                              "list."),
    ('{"prompt": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "answer": "1"}\n',
     "{path} line 1: 'prompt' ends with an assistant turn; expected a prompt ending with a user (or system) turn for "
     "the model to answer."),
    ('{"prompt": [{"role": "user", "content": "x"}], "answer": "1"}\n{"prompt": "y", "answer": "2"}\n',
     "{path} line 2: 'prompt' is text but the file's first prompt is a message list; expected one kind of prompt "
     "per file."),
    ('{"prompt": "x", "answer": [1]}\n', "{path} line 1 field 'answer' is a list; expected a string or an integer "
                                         "or a number."),
    ('{"prompt": "", "answer": "1"}\n', "{path} line 1 field 'prompt' is empty; expected a prompt."),
    ('{"prompt": "x", "answer": "1"}\n[1]\n', "{path} line 2 is a JSON list; expected an object."),
    ("\n", "prompt file {path} holds no records."),
])
def test_bad_prompt_files_are_refused_in_one_sentence(tmp_path, text, message):
    path = tmp_path / "p.jsonl"
    path.write_text(text)
    with pytest.raises(UserInputError) as error:
        read_prompts(path, "jsonl")
    assert str(error.value) == message.format(path=path)


def test_bad_prompt_sources_are_refused_in_one_sentence(tmp_path):
    with pytest.raises(ConfigError) as error:
        read_prompts(None, "gsm8")
    assert str(error.value) == ("grpo prompt task 'gsm8' is unknown; expected one of gsm8k, mbpp, humaneval, jsonl. "
                                "Did you mean 'gsm8k'?")
    with pytest.raises(UserInputError) as error:
        read_prompts(tmp_path / "missing.jsonl", "jsonl")
    assert str(error.value) == f"prompt file {tmp_path / 'missing.jsonl'} does not exist."
    with pytest.raises(UserInputError) as error:
        read_prompts(tmp_path / "missing.jsonl", "gsm8k")
    assert str(error.value) == f"task file {tmp_path / 'missing.jsonl'} does not exist."
