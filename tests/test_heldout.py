"""`evaluate --heldout`: completion log-likelihoods against transformers, exact match against its greedy generate."""

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from phi2_jax.data.chat import load_chat_template
from phi2_jax.data.tokenizer import HFTokenizer
from phi2_jax.evaluation.harness import main
from phi2_jax.evaluation.heldout import SAMPLE, read_pairs
from tests.hf_reference import train_bpe_tokenizer

CFG = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           partial_rotary_factor=0.5, max_position_embeddings=128)
EOS = "<|endoftext|>"
CORPUS = ["Question: what is 7 times 8?\nAnswer: 56", "Instruct: Which ocean is the largest?\nOutput: The Pacific.",
          "You are terse.\nInstruct: Name a prime.\nOutput: 7", "def add(a, b):\n    return a + b\n"]
MAX_NEW = 6


@pytest.fixture(scope="module")
def setup(hf_folder, tmp_path_factory):
    folder, reference = hf_folder("heldout", **CFG)
    tok_dir = train_bpe_tokenizer(CORPUS * 3, 300, tmp_path_factory.mktemp("heldout_tok"))
    return folder, reference, tok_dir, Tokenizer.from_file(str(tok_dir / "tokenizer.json"))


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


def completion_logprob(reference, prompt_ids, completion_ids):
    """transformers' sum of log p(completion token | prompt and the completion before it)."""
    with torch.no_grad():
        logprobs = torch.log_softmax(reference(torch.tensor([prompt_ids + completion_ids])).logits[0].double(), -1)
    return float(sum(logprobs[len(prompt_ids) - 1 + i, t] for i, t in enumerate(completion_ids)))


def greedy_answer(reference, tok, prompt_ids):
    """transformers' greedy continuation (stopping at end-of-text), cut at the documented stop, stripped."""
    eos = tok.token_to_id(EOS)
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt_ids]), max_new_tokens=MAX_NEW, do_sample=False,
                                 eos_token_id=eos, pad_token_id=eos)[0, len(prompt_ids):].tolist()
    out = out[:out.index(eos)] if eos in out else out
    return tok.decode(out, skip_special_tokens=False).split("\nInstruct:")[0].strip()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_cli_heldout_loglik_equals_transformers_and_exact_match_its_greedy_output(setup, tmp_path, capsys):
    folder, reference, tok_dir, tok = setup
    code = "def add(a, b):"
    own = greedy_answer(reference, tok, encode(tok, code))
    assert own and own != "return a + b"
    records = [  # with the (prompt, completion) text each is scored as: the Phi-2 template, end-of-text
        ({"prompt": "Question: what is 7 times 8?\nAnswer:", "completion": " 56"},
         "Question: what is 7 times 8?\nAnswer:", " 56" + EOS),
        ({"prompt": [{"role": "user", "content": "Which ocean is the largest?"}],
          "completion": [{"role": "assistant", "content": "The Pacific."}]},
         "Instruct: Which ocean is the largest?\nOutput:", " The Pacific." + EOS + "\n"),
        ({"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime."},
                       {"role": "assistant", "content": "7"}]},
         "You are terse.\nInstruct: Name a prime.\nOutput:", " 7" + EOS + "\n"),
        ({"prompt": code, "completion": own}, code, own + EOS),
        ({"prompt": code, "completion": "    return a + b"}, code, "    return a + b" + EOS),
    ]
    answers = ["56", "The Pacific.", "7", own, "return a + b"]
    file = write_jsonl(tmp_path / "pairs.jsonl", [r for r, _, _ in records])
    out = tmp_path / "results.json"
    main(["--model", str(folder), "--tokenizer", str(tok_dir), "--heldout", str(file), "--max-new-tokens", str(MAX_NEW),
          "--output", str(out)])  # one batch of 5 prompts of different lengths, left-padded

    expected = [completion_logprob(reference, encode(tok, p), encode(tok, c)) for _, p, c in records]
    tokens = [len(encode(tok, c)) for _, _, c in records]
    matches = [greedy_answer(reference, tok, encode(tok, p)) == a for (_, p, _), a in zip(records, answers)]
    assert matches[3] and not matches[4]
    result = json.loads(out.read_text())[f"heldout:{file}"]
    np.testing.assert_allclose([i["loglik"] for i in result["items"]], expected, rtol=1e-4)
    assert [i["tokens"] for i in result["items"]] == tokens and result["tokens"] == sum(tokens)
    assert [i["match"] for i in result["items"]] == matches
    assert [i["answer"] for i in result["items"]] == answers
    assert result["loglik"] == pytest.approx(np.mean(expected), rel=1e-4)
    assert result["loglik_per_token"] == pytest.approx(sum(expected) / sum(tokens), rel=1e-4)
    assert result["exact_match"] == sum(matches) / len(matches) and result["n"] == len(records)
    printed = capsys.readouterr().out
    rows = {line.split("|")[2].strip(): float(line.split("|")[3]) for line in printed.splitlines()
            if line.startswith(f"| heldout:{file} |")}
    assert rows == pytest.approx({"loglik": np.mean(expected), "loglik_per_token": sum(expected) / sum(tokens),
                                  "exact_match": sum(matches) / len(matches)}, abs=1e-4)


def test_conversations_are_rendered_with_the_model_folders_template(setup, tmp_path):
    folder, reference, tok_dir, tok = setup
    model = tmp_path / "model"
    model.mkdir()
    for f in folder.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    (model / "chat_template.jinja").write_text(PLAIN_TEMPLATE)
    # Five rows, as above, so that the programs compiled for the test above are reused.
    file = write_jsonl(tmp_path / "pairs.jsonl", [{"messages": [{"role": "user", "content": "Name a prime."},
                                                                {"role": "assistant", "content": "7"}]}] * 5)
    out = tmp_path / "results.json"
    main(["--model", str(model), "--tokenizer", str(tok_dir), "--heldout", str(file), "--max-new-tokens", str(MAX_NEW),
          "--output", str(out)])
    item = json.loads(out.read_text())[f"heldout:{file}"]["items"][0]
    expected = completion_logprob(reference, encode(tok, "user: Name a prime.\nassistant:"), encode(tok, " 7\n"))
    assert item["loglik"] == pytest.approx(expected, rel=1e-4) and item["tokens"] == len(encode(tok, " 7\n"))


# A template of the folder's own: role-named lines, "assistant:" as its generation prompt.
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant:{% endif %}")
GOOD = {"prompt": "q", "completion": "a"}
USER = {"role": "user", "content": "q"}


@pytest.mark.parametrize("lines, message", [
    (None, "held-out file {file} does not exist; expected JSON Lines of prompt-completion pairs."),
    ([], "held-out file {file} holds no pairs; expected one JSON object per line."),
    ([GOOD, "{oops"], "{file} line 2 is not valid JSON (Expecting property name enclosed in double quotes at column 2)."),
    ([GOOD, {"text": "t"}], "{file} line 2 is a language modeling record; a held-out pair needs 'prompt' + "
                            "'completion' or 'messages' ending in an assistant turn."),
    ([{"prompt": "q", "chosen": "a", "rejected": "b"}], "{file} line 1 is a preference record; a held-out pair needs "
                                                         "'prompt' + 'completion' or 'messages' ending in an assistant turn."),
    ([{"prompt": "q"}], "{file} line 1 has no 'completion' field; expected all of ['prompt', 'completion']."),
    ([{"prompt": "q", "completion": 3}], "{file} line 1: 'completion' is int; expected a string."),
    ([{"prompt": "", "completion": "a"}], "{file} line 1: 'prompt' is empty; expected the text the completion answers."),
    ([{"messages": [USER]}], "{file} line 1: 'messages' must hold a prompt and end in an assistant turn, the "
                             "completion to score."),
    ([{"prompt": [{"role": "robot", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]}],
     "{file} line 1: 'prompt'[0] has unknown role 'robot'; expected one of system, user, assistant, tool."),
    ([{"prompt": [{"role": "user", "content": ["q"]}], "completion": [{"role": "assistant", "content": "a"}]}],
     "{file} line 1: the chat template (built-in Phi-2) failed to render a conversation: can only concatenate str "
     "(not \"list\") to str."),
    ([{"prompt": [USER], "completion": [{"role": "user", "content": "a"}]}],
     "{file} line 1: 'completion' has no assistant turn with text content; expected one to compare generations with."),
], ids=["missing", "empty", "bad-json", "text-record", "preference", "no-completion", "completion-int", "empty-prompt",
        "messages-no-answer", "unknown-role", "list-content", "no-assistant"])
def test_cli_refuses_a_bad_heldout_file_before_the_model_and_writes_nothing(setup, tmp_path, capsys, lines, message):
    _, _, tok_dir, _ = setup
    file, out, model = tmp_path / "pairs.jsonl", tmp_path / "results.json", tmp_path / "empty-model"
    model.mkdir()  # exists but holds no weights: loading it would fail with another sentence
    if lines is not None:
        file.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in lines))
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(model), "--tokenizer", str(tok_dir), "--heldout", str(file), "--output", str(out)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {message.format(file=file)}\n"
    assert not out.exists()


def test_the_same_heldout_file_twice_is_refused(tmp_path, capsys):
    file = write_jsonl(tmp_path / "pairs.jsonl", [GOOD])
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path / "no-model"), "--heldout", str(file), "--heldout", str(file)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: --heldout {file} is given twice; name each file once.\n"


def test_the_shipped_sample_holds_one_pair_of_each_kind(setup):
    _, _, tok_dir, tok = setup
    pairs = read_pairs(SAMPLE, HFTokenizer(tok_dir), load_chat_template(None))
    assert [p.answer for p in pairs] == ["Paris", "42", "Mercury"]
    assert [p.prompt for p in pairs] == [tuple(encode(tok, t)) for t in (
        "Question: What is the capital of France?\nAnswer:", "Instruct: What is 12 plus 30?\nOutput:",
        "Answer with one word.\nInstruct: Which planet is closest to the Sun?\nOutput:")]
    assert [p.completion for p in pairs] == [tuple(encode(tok, t)) for t in (
        " Paris" + EOS, " 42" + EOS + "\n", " Mercury" + EOS + "\n")]


def test_limit_takes_the_first_heldout_pairs(setup, tmp_path):
    """--limit ('first N items of each task') was ignored by --heldout: a quick check scored every pair."""
    folder, reference, tok_dir, tok = setup
    file = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"Say {n}.", "completion": f" {n}"} for n in range(5)])
    out = tmp_path / "results.json"
    main(["--model", str(folder), "--tokenizer", str(tok_dir), "--heldout", str(file),
          "--max-new-tokens", "2", "--limit", "2", "--output", str(out)])
    results = json.loads(out.read_text())
    assert results[f"heldout:{file}"]["n"] == 2
    assert len(results[f"heldout:{file}"]["items"]) == 2
