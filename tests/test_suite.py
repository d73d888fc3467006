"""The Phi-2 suite: grouped report (markdown, chart, JSON), per-task cache, skipped and bad task files."""

import json
import shutil
import struct

import pytest

from phi2_jax.evaluation import harness, report, suite_command
from phi2_jax.evaluation.bbh import BBH_SAMPLES
from phi2_jax.evaluation.harness import main
from phi2_jax.evaluation.tasks import SAMPLES
from tests.hf_reference import train_bpe_tokenizer

TINY = dict(dialect="5.x", vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, partial_rotary_factor=0.5, max_position_embeddings=1024)
GROUP_NAMES = ["BBH", "commonsense reasoning", "language understanding", "math", "coding"]
# Hand-made results: every metric chosen so that each group's mean is easy to compute by hand.
RESULTS = {
    "bbh": {"exact_match": 0.45, "n": 8, "tasks": {"boolean_expressions": {"exact_match": 0.5, "n": 4},
                                                  "multistep_arithmetic_two": {"exact_match": 0.4, "n": 4}}},
    "piqa": {"acc": 0.9, "acc_norm": 0.5, "n": 4}, "winogrande": {"acc": 0.75, "acc_norm": 0.1, "n": 4},
    "arc_easy": {"acc": 0.25, "acc_norm": 0.0, "n": 4},
    "hellaswag": {"acc": 0.0, "acc_norm": 0.6, "n": 5}, "boolq": {"acc": 0.8, "acc_norm": 0.0, "n": 5},
    "gsm8k": {"exact_match": 0.1, "n": 10},
    "humaneval": {"pass@1": 0.2, "n": 5}, "mbpp": {"pass@1": 0.4, "n": 5},
}
# (50 + 75 + 25) / 3, (60 + 80) / 2, (20 + 40) / 2
EXPECTED_GROUPS = {"BBH": 45.0, "commonsense reasoning": 50.0, "language understanding": 70.0, "math": 10.0,
                   "coding": 30.0}
PUBLISHED = {"Llama-2 7B": [40.0, 62.2, 56.7, 16.5, 21.0], "Mistral 7B": [57.2, 66.4, 63.7, 46.4, 39.4],
             "Phi-2 2.7B": [59.2, 68.8, 62.0, 61.1, 53.7]}  # PHI2_SPEC.md, typed in again


def test_group_averages_equal_a_hand_computed_example():
    groups = report.group_scores(RESULTS)
    assert list(groups) == GROUP_NAMES
    assert groups == pytest.approx(EXPECTED_GROUPS)
    assert report.group_scores({"gsm8k": {"exact_match": 0.5, "n": 2}})["coding"] is None


def _rows(markdown: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines()
            if line.startswith("|") and not line.startswith("|---")]


def test_report_cells_equal_the_per_task_results():
    rows = _rows(report.markdown(RESULTS, "ours"))
    assert rows[0] == ["model", *GROUP_NAMES]
    for model, values in PUBLISHED.items():
        assert [model + " (published)", *[f"{v:.1f}" for v in values]] in rows
    assert ["ours", "45.0", "50.0", "70.0", "10.0", "30.0"] in rows
    tasks = {row[1]: row for row in rows if len(row) == 5 and row[0] != "group"}
    assert tasks["piqa"] == ["commonsense reasoning", "piqa", "acc_norm", "50.0", "4"]
    assert tasks["winogrande"] == ["commonsense reasoning", "winogrande", "acc", "75.0", "4"]
    assert tasks["hellaswag"] == ["language understanding", "hellaswag", "acc_norm", "60.0", "5"]
    assert tasks["mbpp"] == ["coding", "mbpp", "pass@1", "40.0", "5"]
    assert tasks["bbh/multistep_arithmetic_two"] == ["BBH", "bbh/multistep_arithmetic_two", "exact_match", "40.0", "4"]
    assert len(tasks) == 9 + 2  # every task run, and each BBH task


def test_chart_has_one_bar_group_per_column(tmp_path):
    path = tmp_path / "chart.png"
    figure = report.chart({k: v for k, v in RESULTS.items() if k != "gsm8k"}, "ours", path)
    (axes,) = figure.axes
    assert [t.get_text().replace("\n", " ") for t in axes.get_xticklabels()] == GROUP_NAMES
    expected = {**PUBLISHED, "ours": [45.0, 50.0, 70.0, None, 30.0]}
    assert [c.get_label() for c in axes.containers] == list(expected)
    for container, values in zip(axes.containers, expected.values()):
        assert len(container.patches) == len(GROUP_NAMES)
        for group, (bar, value) in enumerate(zip(container.patches, values)):
            centre = bar.get_x() + bar.get_width() / 2
            assert group - 0.5 < centre < group + 0.5  # every model's bar for group g sits over tick g
            assert (bar.get_height() != bar.get_height()) if value is None else bar.get_height() == pytest.approx(value)
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", header[16:24]) == (900, 450)


@pytest.fixture(scope="module")
def tiny(hf_folder, tmp_path_factory):
    folder, _ = hf_folder("suite", **TINY)
    corpus = [line for f in [*SAMPLES.glob("*.jsonl"), *BBH_SAMPLES.glob("*")] for line in f.read_text().splitlines()]
    tok_dir = train_bpe_tokenizer(corpus * 3, 500, tmp_path_factory.mktemp("suite_tok"))
    data = tmp_path_factory.mktemp("suite_data")
    shutil.copytree(BBH_SAMPLES, data / "bbh")
    for name, sample in [("piqa", "piqa"), ("arc_easy", "arc"), ("gsm8k", "gsm8k"), ("humaneval", "humaneval")]:
        shutil.copy(SAMPLES / f"{sample}.jsonl", data / f"{name}.jsonl")
    return folder, tok_dir, data


def _suite(tiny, out, *extra):
    folder, tok_dir, data = tiny
    return ["--model", str(folder), "--tokenizer", str(tok_dir), "--suite", "phi2", "--data", str(data),
            "--output", str(out), "--limit", "1", "--max-new-tokens", "4", "--label", "tiny", *extra]


def _counting_evaluate(monkeypatch, fail_on: str | None = None) -> list[str]:
    """Records the tasks suite_command scores; raises RuntimeError (a crash) when it reaches `fail_on`."""
    scored, real = [], harness.evaluate

    def spy(model, tokenizer, tasks, **kwargs):
        (name,) = tasks
        if name == fail_on:
            raise RuntimeError("simulated crash")
        scored.append(name)
        return real(model, tokenizer, tasks, **kwargs)

    monkeypatch.setattr(suite_command, "evaluate", spy)
    return scored


def test_suite_runs_the_present_tasks_caches_them_and_a_rerun_recomputes_nothing(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    scored = _counting_evaluate(monkeypatch)
    main(_suite(tiny, out))
    captured = capsys.readouterr()
    assert scored == ["bbh", "piqa", "arc_easy", "gsm8k", "humaneval"]
    skipped_line = next(line for line in captured.err.splitlines() if line.startswith("skipped: "))
    for name in ["squadv2", "winogrande", "arc_challenge", "siqa", "hellaswag", "openbookqa", "mmlu", "boolq", "mbpp"]:
        assert f"{name} (" in skipped_line
    assert "[5/5] humaneval scored in" in captured.err and "5/5 items done" not in captured.err
    assert "7/7 items done, eta 0m00s" in captured.err  # 3 BBH tasks x 1 + 4 others x 1
    summary = json.loads((out / "results.json").read_text())
    assert sorted(summary["results"]) == sorted(scored) and summary["results"]["piqa"]["n"] == 1
    assert summary["results"]["bbh"]["tasks"].keys() == {"boolean_expressions", "logical_deduction_three_objects",
                                                         "multistep_arithmetic_two"}
    assert summary["groups"]["commonsense reasoning"] == pytest.approx(
        50 * (summary["results"]["piqa"]["acc_norm"] + summary["results"]["arc_easy"]["acc"]))
    assert "| tiny |" in (out / "report.md").read_text() and (out / "report.png").stat().st_size > 1000
    assert len(list((out / "cache").glob("*.json"))) == 5
    before = {p.name: p.read_bytes() for p in (out / "cache").iterdir()}

    # Rerun: everything comes from the cache, the model is not even loaded.
    scored.clear()
    from phi2_jax.hf import loading

    real_load = loading.from_pretrained
    monkeypatch.setattr(loading, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    main(_suite(tiny, out))
    monkeypatch.setattr(loading, "from_pretrained", real_load)
    assert scored == [] and "cached" in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text())["results"] == summary["results"]
    assert {p.name: p.read_bytes() for p in (out / "cache").iterdir()} == before

    # A changed setting is a different key: that task is scored again.
    main(_suite(tiny, out, "--max-new-tokens", "5"))
    assert scored == ["bbh", "gsm8k", "humaneval"]  # the multiple-choice tasks do not read --max-new-tokens


def test_a_crash_mid_suite_keeps_the_finished_tasks(tiny, tmp_path, monkeypatch):
    out = tmp_path / "out"
    scored = _counting_evaluate(monkeypatch, fail_on="gsm8k")
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(_suite(tiny, out))
    assert scored == ["bbh", "piqa", "arc_easy"]
    assert sorted(p.name.split("-")[0] for p in (out / "cache").glob("*.json")) == ["arc_easy", "bbh", "piqa"]
    assert sorted(json.loads((out / "results.json").read_text())["results"]) == ["arc_easy", "bbh", "piqa"]
    assert not list(out.rglob("*.partial")) and not (out / "report.md").exists()
    scored = _counting_evaluate(monkeypatch)  # the rerun scores only what the crash left
    main(_suite(tiny, out))
    assert scored == ["gsm8k", "humaneval"]
    assert sorted(json.loads((out / "results.json").read_text())["results"]) == ["arc_easy", "bbh", "gsm8k", "humaneval",
                                                                                "piqa"]


def test_bad_task_file_is_one_sentence_before_any_work_and_keeps_the_cache(tiny, tmp_path, capsys, monkeypatch):
    folder, tok_dir, _ = tiny
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    shutil.copy(SAMPLES / "piqa.jsonl", data / "piqa.jsonl")
    main(_suite((folder, tok_dir, data), out))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (data / "boolq.jsonl").write_text('{"question": "q", "passage": "p", "answer": true}\n{"question": "q"}\n')
    scored = _counting_evaluate(monkeypatch)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(_suite((folder, tok_dir, data), out))
    assert exit_info.value.code == 2 and scored == []
    assert capsys.readouterr().err == (f"error: {data / 'boolq.jsonl'} line 2 has no field 'passage'; "
                                       f"this task needs question, passage.\n")
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_task_failing_mid_suite_exits_2_with_the_finished_tasks_kept(tiny, tmp_path, capsys):
    folder, tok_dir, _ = tiny
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    for name in ("piqa", "gsm8k"):
        shutil.copy(SAMPLES / f"{name}.jsonl", data / f"{name}.jsonl")
    with pytest.raises(SystemExit) as exit_info:  # gsm8k's few-shot prompt + 1000 new tokens overflow 1024
        main(_suite((folder, tok_dir, data), out, "--max-new-tokens", "1000"))
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("error: a prompt of ") and last.endswith("exceeds the model's context of 1024 tokens.")
    assert list(json.loads((out / "results.json").read_text())["results"]) == ["piqa"]
    assert [p.name.split("-")[0] for p in (out / "cache").glob("*.json")] == ["piqa"]


@pytest.mark.parametrize("extra, message", [
    (["--data", "{tmp}/none"], "--data {tmp}/none is not a folder; expected a folder of <task>.jsonl files."),
    (["--data", "{tmp}"], "--data {tmp} holds none of the suite's task files"),
    (["--suite", "phi3", "--data", "{tmp}"], "unknown suite 'phi3'; expected one of phi2."),
    (["--task", "piqa", "--data", "{tmp}"], "--suite runs its own task list; leave out --task, --ppl, --safety and --heldout."),
    (["--safety", "--data", "{tmp}"], "--suite runs its own task list; leave out --task, --ppl, --safety and --heldout."),
    ([], "--suite needs --data FOLDER (the task files) and --output FOLDER (results, cache, report)."),
], ids=["no-data", "empty-data", "unknown-suite", "with-task", "with-safety", "no-data-flag"])
def test_bad_suite_arguments_get_one_sentence(tmp_path, capsys, extra, message):
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path / "no-model"), "--suite", "phi2", "--output", str(tmp_path / "out"), *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: " + message.replace("{tmp}", str(tmp_path))) and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
