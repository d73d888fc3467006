"""BIG-Bench Hard: answer extraction per target kind, task files and prompts, scoring, and lm_eval's scores."""

import json

import pytest

import phi2_jax
from phi2_jax.data.tokenizer import load_tokenizer
from phi2_jax.evaluation import bbh
from phi2_jax.evaluation.bbh import BBH_SAMPLES, bbh_scores, extract_bbh_answer, load_bbh, target_kind
from phi2_jax.evaluation.harness import evaluate, main
from tests.hf_reference import train_bpe_tokenizer

TINY = dict(dialect="5.x", vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, partial_rotary_factor=0.5, max_position_embeddings=1024)

# (completion, target kind, expected answer): written by hand, one closed list per kind.
CASES = [
    ("The jar is the leftmost. So the answer is (B).", "multiple_choice", "(B)"),
    ("So the answer is (C) The vase is the leftmost.", "multiple_choice", "(C)"),
    ("So the answer is A.", "multiple_choice", "(A)"),
    ("So the answer is (D)", "multiple_choice", "(D)"),                   # cut before the period
    ("First (A) looks right, but no. So the answer is (E).\n\nQ: (F)", "multiple_choice", "(E)"),
    ("So the answer is the first one.", "multiple_choice", ""),
    ("The order is jar, cup, vase.", "multiple_choice", ""),             # no answer sentence
    ("Then not True = False. So the answer is False.", "binary", "False"),
    ("So the answer is true.", "binary", "True"),
    ("So the answer is Yes, it is plausible.", "binary", "Yes"),
    ("So the answer is invalid.", "binary", "invalid"),
    ("So the answer is maybe.", "binary", ""),
    ("Then -8 - 4 = -12. So the answer is -12.", "integer", "-12"),
    ("So the answer is 1,024.", "integer", "1024"),
    ("So the answer is 7 apples.", "integer", "7"),
    ("So the answer is seven.", "integer", ""),
    ("So the answer is ] ) }.", "free_form", "] ) }"),
    ("So the answer is apple  banana cherry.", "free_form", "apple banana cherry"),
    ("So the answer is   .", "free_form", ""),
    ("so The Answer Is 3.", "integer", ""),                               # the convention is lower case
]


@pytest.mark.parametrize("completion, kind, expected", CASES)
def test_answer_extraction_per_target_kind(completion, kind, expected):
    assert extract_bbh_answer(completion, kind) == expected


@pytest.mark.parametrize("target, kind", [("(A)", "multiple_choice"), ("(R)", "multiple_choice"), ("True", "binary"),
                                          ("No", "binary"), ("valid", "binary"), ("-42", "integer"), ("0", "integer"),
                                          ("] ) }", "free_form"), ("(A) (B)", "free_form"), ("1.5", "free_form")])
def test_target_kinds(target, kind):
    assert target_kind(target) == kind


def test_sample_prompts_have_lm_evals_layout():
    items = load_bbh(None)
    assert sorted({i.task for i in items}) == ["boolean_expressions", "logical_deduction_three_objects",
                                               "multistep_arithmetic_two"]
    first = items[0]
    prompt_text = (BBH_SAMPLES / "boolean_expressions.txt").read_text().strip()
    record = json.loads((BBH_SAMPLES / "boolean_expressions.jsonl").read_text().splitlines()[0])
    assert first.prompt == prompt_text + "\n\nQ: " + record["input"] + "\nA: Let's think step by step.\n"
    assert {i.kind for i in items} == {"binary", "integer", "multiple_choice"}
    # Every worked example in the shipped prompts ends with an answer its task's extraction reads back.
    for data in BBH_SAMPLES.glob("*.jsonl"):
        examples = (BBH_SAMPLES / f"{data.stem}.txt").read_text().split("\n\nQ: ")[1:]
        kind = target_kind(json.loads(data.read_text().splitlines()[0])["target"])
        assert len(examples) == 3 and all(extract_bbh_answer(e, kind) for e in examples), data.stem


def test_canary_block_and_cot_prompts_folder(tmp_path):
    (tmp_path / "cot-prompts").mkdir()
    (tmp_path / "cot-prompts" / "t.txt").write_text("canary GUID\n-----\nDescribe.\n\nQ: x\nA: Let's think. So the answer is 1.\n")
    (tmp_path / "t.jsonl").write_text('{"input": "y", "target": "2"}\n')
    (item,) = load_bbh(tmp_path)
    assert item.prompt == "Describe.\n\nQ: x\nA: Let's think. So the answer is 1.\n\nQ: y\nA: Let's think step by step.\n"


def test_scores_are_per_task_then_averaged_over_tasks():
    items = [bbh.BbhItem("a", "", "(A)", "multiple_choice"), bbh.BbhItem("a", "", "(B)", "multiple_choice"),
             bbh.BbhItem("a", "", "(C)", "multiple_choice"), bbh.BbhItem("a", "", "(A)", "multiple_choice"),
             bbh.BbhItem("b", "", "True", "binary")]
    completions = ["So the answer is (A).", "So the answer is (C).", "So the answer is C.", "nothing", "So the answer is True."]
    scores = bbh_scores(items, completions)
    assert scores["tasks"] == {"a": {"exact_match": 0.5, "n": 4}, "b": {"exact_match": 1.0, "n": 1}}
    assert scores["exact_match"] == pytest.approx((0.5 + 1.0) / 2)  # each task counts once, not each item
    assert [i["correct"] for i in scores["items"]] == [True, False, True, False, True]


@pytest.mark.parametrize("files, message", [
    ({"t.jsonl": '{"input": "x"}\n', "t.txt": "Q: a\nA: b"}, "t.jsonl line 1 has no field 'target'; a BBH task needs input, target."),
    ({"t.jsonl": '{"input": "x", "target": 3}\n', "t.txt": "Q: a\nA: b"}, "t.jsonl line 1 field 'target' is an integer; expected a string."),
    ({"t.jsonl": '{"input": "x", "target": "1"}\n'}, "t.jsonl has no prompt file; expected"),
    ({"t.jsonl": '{"input": "x", "target": "1"}\n', "t.txt": "\n\n"}, "t.txt is empty; expected the task's few-shot examples."),
    ({}, "holds no <task>.jsonl files."),
], ids=["no-target", "target-int", "no-prompt", "empty-prompt", "empty-folder"])
def test_bad_bbh_folders_get_one_sentence(tmp_path, capsys, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path / "no-model"), "--task", f"bbh={tmp_path}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.fixture(scope="module")
def tiny(hf_folder, tmp_path_factory):
    folder, _ = hf_folder("bbh", **TINY)
    corpus = [line for f in BBH_SAMPLES.glob("*") for line in f.read_text().splitlines()]
    tok_dir = train_bpe_tokenizer(corpus * 3, 500, tmp_path_factory.mktemp("bbh_tok"))
    return folder, phi2_jax.from_pretrained(folder), load_tokenizer(tok_dir), tok_dir


def test_bbh_generation_is_batched_and_equals_one_prompt_at_a_time(tiny, monkeypatch):
    _, model, tokenizer, _ = tiny
    from phi2_jax.inference import generate as generation

    calls = []
    real = generation.generate_text

    def spy(model, tokenizer, prompts, **kwargs):
        calls.append(len(prompts))
        return real(model, tokenizer, prompts, **kwargs)

    monkeypatch.setattr(generation, "generate_text", spy)
    batched = evaluate(model, tokenizer, {"bbh": None}, batch_size=4, max_new_tokens=6)["bbh"]
    assert calls == [4, 4]  # 8 items, 4 at a time (left-padded in one batch)
    items = load_bbh(None)
    alone = [real(model, tokenizer, [i.prompt], max_new_tokens=6, stop=bbh.STOP)[0] for i in items]
    assert [i["completion"] for i in batched["items"]] == alone


# Completions and targets for which lm_eval's bbh_cot_fewshot filter and ours must agree item by item:
# a well-formed final sentence, a wrong answer, no answer at all, an answer before a blank line.
AGREE = [
    ("A = True. So the answer is True.", "True"),
    ("So the answer is False.", "True"),
    ("We get -12. So the answer is -12.", "-12"),
    ("So the answer is 12.", "-12"),
    ("The jar is the leftmost. So the answer is (B).", "(B)"),
    ("So the answer is (C).", "(B)"),
    ("no final sentence", "(A)"),
    ("So the answer is ] ) }.", "] ) }"),
    ("So the answer is valid.\n\nQ: next", "valid"),
]
LM_EVAL_REGEX = "(?<=the answer is )(.*)(?=.)"  # lm_eval's bbh/cot_fewshot filter, as it ships


def test_lm_evals_bbh_filter_and_exact_match_agree_with_ours_item_by_item():
    pytest.importorskip("lm_eval")
    from lm_eval.filters.extraction import RegexFilter
    from lm_eval.filters.selection import TakeFirstFilter

    completions = [c for c, _ in AGREE]
    filtered = TakeFirstFilter().apply(RegexFilter(regex_pattern=LM_EVAL_REGEX).apply([[c] for c in completions], []), [])
    theirs = [answer == target for answer, (_, target) in zip(filtered, AGREE)]
    items = [bbh.BbhItem("t", "", target, target_kind(target)) for _, target in AGREE]
    ours = [i["correct"] for i in bbh_scores(items, completions)["items"]]
    assert ours == theirs == [True, False, True, False, True, False, False, True, True]


def test_lm_eval_scores_a_local_bbh_task_as_we_do(tiny, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from phi2_jax.evaluation.lm_eval_adapter import lm_eval_model

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # the task's data is a local file; nothing is fetched
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, model, tokenizer, tok_dir = tiny
    data = BBH_SAMPLES / "boolean_expressions.jsonl"
    prompt = (BBH_SAMPLES / "boolean_expressions.txt").read_text().strip()
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "local_bbh.yaml").write_text(
        "task: phi2_local_bbh\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: generate_until\n"
        f"description: {json.dumps(prompt + chr(10) + chr(10))}\n"
        'doc_to_text: "Q: {{input}}\\nA: Let\'s think step by step.\\n"\ndoc_to_target: "{{target}}"\n'
        'target_delimiter: ""\nnum_fewshot: 0\n'
        'generation_kwargs:\n  until: ["\\n\\n"]\n  max_gen_toks: 8\n  do_sample: false\n  temperature: 0.0\n'
        f"filter_list:\n  - name: get-answer\n    filter:\n      - function: regex\n        regex_pattern: {json.dumps(LM_EVAL_REGEX)}\n"
        "      - function: take_first\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    results = lm_eval.simple_evaluate(model=lm_eval_model(str(folder), str(tok_dir), batch_size=2),
                                      tasks=["phi2_local_bbh"], task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
                                      log_samples=True)
    samples = sorted(results["samples"]["phi2_local_bbh"], key=lambda s: s["doc_id"])
    ours = evaluate(model, tokenizer, {"bbh": data}, batch_size=2, max_new_tokens=8)["bbh"]
    items = load_bbh(data)
    assert len(samples) == len(items) == 3
    for sample, item, scored in zip(samples, items, ours["items"]):
        assert sample["arguments"][0][0] == item.prompt            # the same prompt string
        assert sample["resps"][0][0] == scored["completion"]       # the same greedy completion
        theirs = sample["filtered_resps"][0]
        assert (theirs == item.target) == scored["correct"]
        assert theirs == ("[invalid]" if not scored["answer"] else scored["answer"])
    assert results["results"]["phi2_local_bbh"]["exact_match,get-answer"] == pytest.approx(ours["exact_match"])
