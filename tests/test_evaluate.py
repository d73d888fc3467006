"""Evaluation: log-likelihood scores against transformers' logits, perplexity, answer extraction, the sandbox."""

import json
import os

import numpy as np
import pytest
import torch

import phi2_jax
from phi2_jax.evaluation.harness import evaluate, main, pass_at_k
from phi2_jax.evaluation.lm_eval_adapter import Harness
from phi2_jax.evaluation.sandbox import Limits, run_program
from phi2_jax.evaluation.tasks import SAMPLES, extract_answer, load_task
from phi2_jax.data.tokenizer import load_tokenizer
from tests.hf_reference import train_bpe_tokenizer

EVAL = dict(dialect="5.x", vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, partial_rotary_factor=0.5, max_position_embeddings=512)
MC_TASKS = ["piqa", "arc", "hellaswag", "winogrande", "boolq", "mmlu", "siqa", "openbookqa"]


@pytest.fixture(scope="module")
def setup(hf_folder, tmp_path_factory):
    folder, reference = hf_folder("evaluate", **EVAL)
    corpus = [line for f in SAMPLES.glob("*.jsonl") for line in f.read_text().splitlines()]
    tok_dir = train_bpe_tokenizer(corpus * 3, 500, tmp_path_factory.mktemp("eval_tok"))
    return folder, reference, phi2_jax.from_pretrained(folder), load_tokenizer(tok_dir), tok_dir


def reference_loglik(reference, tokenizer, context, continuation):
    ctx = tokenizer.encode(context) or [tokenizer.eos_id]
    cont = tokenizer.encode(continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = torch.log_softmax(reference(ids).logits[0].double(), -1)
    return float(sum(logprobs[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def test_multiple_choice_scores_equal_transformers(setup):
    _, reference, model, tokenizer, _ = setup
    results = evaluate(model, tokenizer, {name: None for name in MC_TASKS}, batch_size=4)
    for name in MC_TASKS:
        _, items = load_task(name, None, None)
        correct = correct_norm = 0
        for item, scored in zip(items, results[name]["items"]):
            expected = [reference_loglik(reference, tokenizer, c, x) for c, x in item.options]
            np.testing.assert_allclose(scored["logliks"], expected, rtol=1e-4, err_msg=name)
            correct += int(np.argmax(expected) == item.gold)
            correct_norm += int(np.argmax([e / len(x.encode()) for e, (_, x) in zip(expected, item.options)]) == item.gold)
        assert results[name]["acc"] == correct / len(items)
        assert results[name]["acc_norm"] == correct_norm / len(items)


def test_perplexity_is_exp_of_transformers_mean_loss(setup, tmp_path):
    _, reference, model, tokenizer, _ = setup
    text = "def add(a, b):\n    return a + b\n\nThe Pacific Ocean is the largest ocean.\n"
    (tmp_path / "doc.txt").write_text(text)
    ours = evaluate(model, tokenizer, {}, ppl_files=[tmp_path / "doc.txt"])["perplexity"]
    ids = [tokenizer.eos_id] + tokenizer.encode(text)  # every token predicted, the first from end-of-text
    with torch.no_grad():
        loss = reference(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert ours["perplexity"] == pytest.approx(np.exp(loss), rel=1e-4)
    assert ours["tokens"] == len(ids) - 1


def test_lm_eval_harness_requests(setup):
    _, reference, model, tokenizer, _ = setup
    harness = Harness(model, tokenizer, batch_size=2)
    (ll, _), = harness.loglikelihood([("Question: what is 7 times 8?\nAnswer:", " 56")])
    assert ll == pytest.approx(reference_loglik(reference, tokenizer, "Question: what is 7 times 8?\nAnswer:", " 56"),
                               rel=1e-4)
    out = harness.generate_until([("def add(a, b):", {"until": ["\n\n"], "max_gen_toks": 8})])
    assert isinstance(out[0], str) and "\n\n" not in out[0]


def test_gsm8k_answer_extraction_and_pass_at_k():
    assert extract_answer("so 12 - 2 = 10 apples.\n#### 10") == "10"
    assert extract_answer("The answer is $1,234.50.") == "1234.5"
    assert extract_answer("first 3 then 4") == "4"
    assert extract_answer("no digits here") == ""
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)
    assert pass_at_k(5, 0, 5) == 0.0 and pass_at_k(5, 1, 5) == 1.0


@pytest.mark.parametrize("name", ["humaneval", "mbpp"])
def test_code_tasks_pass_with_the_reference_solution_and_fail_without(name):
    _, items = load_task(name, None, None)
    records = [json.loads(line) for line in (SAMPLES / f"{name}.jsonl").read_text().splitlines()]
    for item, record in zip(items, records):
        solution = record["canonical_solution"] if name == "humaneval" else record["code"]
        assert run_program(item.prompt + solution + item.test_suffix).passed, item.task_id
        assert not run_program(item.prompt + "    return None\n" + item.test_suffix).passed


def test_sandbox_kills_loops_and_memory_bombs_and_hides_secrets(monkeypatch):
    loop = run_program("while True:\n    pass\n", Limits(seconds=2))
    assert loop.status == "timeout" and not loop.passed
    bomb = run_program("x = bytearray(8 * 1024 ** 3)\n", Limits(seconds=10, memory_bytes=512 << 20))
    assert bomb.status == "memory" and not bomb.passed
    monkeypatch.setenv("PHI2_EVAL_SECRET", "hunter2")
    leak = run_program("import os, sys\nsys.exit(1 if 'hunter2' in str(os.environ) else 0)\n")
    assert leak.passed, leak.output
    assert "PHI2_EVAL_SECRET" in os.environ


def test_bad_task_files_name_the_line(setup, tmp_path, capsys):
    folder, _, _, _, tok_dir = setup
    bad_json = tmp_path / "piqa.jsonl"
    bad_json.write_text('{"goal": "a", "sol1": "b", "sol2": "c", "label": 0}\n{"goal": oops}\n')
    missing = tmp_path / "arc.jsonl"
    missing.write_text('{"question": "q", "choices": {"text": ["a"], "label": ["A"]}}\n')
    for spec, message in [(f"piqa={bad_json}", "piqa.jsonl line 2 is not valid JSON"),
                          (f"arc={missing}", "arc.jsonl line 1 has no field 'answerKey'"),
                          ("squad", "unknown task 'squad'")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["--model", str(folder), "--tokenizer", str(tok_dir), "--task", spec])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_cli_writes_json_and_a_table(setup, tmp_path, capsys):
    folder, _, _, _, tok_dir = setup
    out = tmp_path / "results.json"
    main(["--model", str(folder), "--tokenizer", str(tok_dir), "--task", "piqa", "--task", "gsm8k", "--task", "humaneval",
          "--limit", "2", "--max-new-tokens", "8", "--output", str(out)])
    printed = capsys.readouterr().out
    assert "| piqa | acc |" in printed and "| gsm8k | exact_match |" in printed and "| humaneval | pass@1 |" in printed
    results = json.loads(out.read_text())
    assert results["piqa"]["n"] == 2 and 0.0 <= results["gsm8k"]["exact_match"] <= 1.0


def test_scoring_on_a_sharded_model_matches_one_device(setup):
    folder, _, model, tokenizer, _ = setup
    from phi2_jax.inference.scoring import loglikelihood
    sharded = phi2_jax.from_pretrained(folder, mesh=phi2_jax.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    requests = [(tokenizer.encode("Question: which planet?\nAnswer:"), tokenizer.encode(" Mercury")),
                (tokenizer.encode("def add(a, b):"), tokenizer.encode("\n    return a + b")),
                ([], tokenizer.encode("hello"))]
    single = loglikelihood(model, requests, eos_id=tokenizer.eos_id, batch_size=2)
    split = loglikelihood(sharded, requests, eos_id=tokenizer.eos_id, batch_size=2)  # padded up to 4 rows
    np.testing.assert_allclose([s for s, _ in split], [s for s, _ in single], rtol=1e-5)
    assert [g for _, g in split] == [g for _, g in single]


def test_lm_eval_scores_a_local_task_through_the_registered_model(setup, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from phi2_jax.evaluation.lm_eval_adapter import lm_eval_model

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # the task's data is a local file; nothing is fetched
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, reference, _, tokenizer, tok_dir = setup
    docs = [{"question": "what is 7 times 8?", "choices": ["56", "54", "15"], "label": 0},
            {"question": "which ocean is the largest?", "choices": ["the Atlantic", "the Pacific"], "label": 1},
            {"question": "what does def start in Python?", "choices": ["a loop", "a class", "a function"], "label": 2}]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "local_mc.yaml").write_text(
        "task: phi2_local_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'docs.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n")
    results = lm_eval.simple_evaluate(model=lm_eval_model(str(folder), str(tok_dir), batch_size=2),
                                      tasks=["phi2_local_mc"], task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
                                      log_samples=True)
    correct = 0
    for sample in sorted(results["samples"]["phi2_local_mc"], key=lambda s: s["doc_id"]):
        doc = docs[sample["doc_id"]]
        ours = [float(ll) for ll, _ in sample["filtered_resps"]]
        # lm_eval asks for the continuation after its default target delimiter, one space.
        expected = [reference_loglik(reference, tokenizer, f"Question: {doc['question']}\nAnswer:", " " + choice)
                    for choice in doc["choices"]]
        np.testing.assert_allclose(ours, expected, rtol=1e-4)
        correct += int(np.argmax(expected) == doc["label"])
    assert results["results"]["phi2_local_mc"]["acc,none"] == pytest.approx(correct / len(docs))


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0."),
    (["--timeout", "0"], "--timeout must be a positive number of seconds, got 0.0."),
    (["--timeout", "-2"], "--timeout must be a positive number of seconds, got -2.0."),
    (["--timeout", "nan"], "--timeout must be a positive number of seconds, got nan."),
    (["--task", "piqa"], "--task piqa is given twice; name each task once."),
    (["--output", "{tmp}"], "--output {tmp} is a folder; expected a file name for the results JSON."),
], ids=["batch-size-0", "timeout-0", "timeout-negative", "timeout-nan", "task-twice", "output-folder"])
def test_bad_arguments_are_refused_in_one_sentence_before_any_work(tmp_path, capsys, extra, message):
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    with pytest.raises(SystemExit) as exit_info:  # the model does not exist: no work was started
        main(["--model", str(tmp_path / "no-model"), "--task", "piqa", *extra])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {message.replace('{tmp}', str(tmp_path))}\n"


@pytest.mark.parametrize("task, record, message", [
    ("piqa", {"goal": "a", "sol1": "b", "sol2": "c", "label": [0]},
     "line 1 field 'label' is a list; expected an integer or a string."),
    ("piqa", {"goal": "a", "sol1": "b", "sol2": "c", "label": True},
     "line 1 field 'label' is true or false; expected an integer or a string."),
    ("humaneval", {"task_id": "t", "prompt": 3, "test": "", "entry_point": "f"},
     "line 1 field 'prompt' is an integer; expected a string."),
    ("mbpp", {"task_id": 1, "text": "t", "test_list": "assert f()"},
     "line 1 field 'test_list' is a string; expected a list of strings."),
    ("mbpp", {"task_id": 1, "text": "t", "test_list": []},
     "line 1 field 'test_list' is empty; expected at least one test."),
    ("arc", {"question": "q", "choices": {"text": "a b", "label": ["A"]}, "answerKey": "A"},
     "line 1 field 'choices.text' is a string; expected a list of strings."),
    ("hellaswag", {"ctx": "c", "endings": ["x", 2], "label": 0},
     "line 1 field 'endings' is a list; expected a list of strings."),
    ("boolq", {"question": "q", "passage": "p", "answer": "maybe"},
     "line 1 field 'answer' is 'maybe'; expected true or false."),
    ("gsm8k", {"question": "q", "answer": 4},
     "line 1 field 'answer' is an integer; expected a string."),
], ids=["label-list", "label-bool", "prompt-int", "tests-string", "tests-empty", "arc-choices", "endings",
        "boolq-answer", "gsm8k-answer"])
def test_task_records_with_fields_of_the_wrong_type_get_one_sentence(tmp_path, capsys, task, record, message):
    path = tmp_path / f"{task}.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path / "no-model"), "--task", f"{task}={path}"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {path} {message}\n"


def test_finished_tasks_are_written_when_a_later_task_fails(setup, tmp_path, capsys):
    folder, _, _, _, tok_dir = setup
    out = tmp_path / "results.json"
    with pytest.raises(SystemExit) as exit_info:  # gsm8k's 5-shot prompts + 500 new tokens overflow 512
        main(["--model", str(folder), "--tokenizer", str(tok_dir), "--task", "piqa", "--task", "gsm8k",
              "--limit", "2", "--max-new-tokens", "500", "--output", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "plus max_new_tokens 500 exceeds the model's context of 512 tokens." in err.splitlines()[-1]
    results = json.loads(out.read_text())
    assert list(results) == ["piqa"] and results["piqa"]["n"] == 2
    assert sorted(os.listdir(tmp_path)) == ["results.json"]  # no partial file left


def test_generation_tasks_run_batched_and_equal_one_prompt_at_a_time(setup, monkeypatch):
    _, _, model, tokenizer, _ = setup
    from phi2_jax.inference import generate as generation

    calls, real = [], generation.generate_text

    def spy(model, tokenizer, prompts, **kwargs):
        calls.append(len(prompts))
        return real(model, tokenizer, prompts, **kwargs)

    monkeypatch.setattr(generation, "generate_text", spy)
    results = evaluate(model, tokenizer, {"gsm8k": None, "humaneval": None}, batch_size=2, max_new_tokens=6)
    assert calls == [2, 1, 2]  # gsm8k's 3 items two at a time, then humaneval's 2 together (left-padded)
    _, gsm8k = load_task("gsm8k", None, None)
    alone = [real(model, tokenizer, [i.prompt], max_new_tokens=6, stop=["\n\nQuestion:", "Question:"])[0] for i in gsm8k]
    assert [i["completion"] for i in results["gsm8k"]["items"]] == alone
    _, humaneval = load_task("humaneval", None, None)
    alone = [real(model, tokenizer, [i.prompt], max_new_tokens=6, stop=i.stop)[0] for i in humaneval]
    assert [i["completions"][0] for i in results["humaneval"]["items"]] == alone


def test_nothing_to_evaluate_names_every_kind_of_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("error: nothing to evaluate; pass --task NAME[=FILE], --ppl FILE, --safety [FILE] "
                                       "and/or --heldout FILE.\n")
