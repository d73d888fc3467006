"""TRL dataset conventions -> ids and loss weights, checked against the tokenizer and transformers' assistant masks."""

import json
import logging

import pytest

from phi2_jax.data.chat import ChatTemplate, load_chat_template
from phi2_jax.data.formats import FieldNames, Formatter, record_kind
from phi2_jax.data.post_batches import pack_examples, preference_rows
from phi2_jax.data.tokenizer import HFTokenizer
from phi2_jax.errors import UserInputError
from tests import hf_reference

transformers = pytest.importorskip("transformers")

# ChatML with {% generation %} around assistant text: transformers then returns the assistant token mask.
CHATML_GEN = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>\n' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEXTS = ["hello world, what is two plus two? four. " * 10, "the user asks and the assistant answers"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tokenizers import Tokenizer

    folder = hf_reference.train_bpe_tokenizer(TEXTS, 400, tmp_path_factory.mktemp("tok"))
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "chat_template": CHATML_GEN}))
    return folder


def formatter(folder, seq_len=64, **kwargs):
    return Formatter(HFTokenizer(folder), load_chat_template(folder), seq_len, **kwargs)


def test_conversation_weights_equal_transformers_assistant_mask(folder):
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is two plus two?"},
                {"role": "assistant", "content": "four"}, {"role": "user", "content": "and hello?"},
                {"role": "assistant", "content": "hello world"}]
    out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    example = formatter(folder).sft_example({"messages": messages})
    assert example.ids.tolist() == list(out["input_ids"])
    assert example.weights.tolist() == [float(m) for m in out["assistant_masks"]]
    # Prompt-completion given as message lists: the same tokens, the completion's turn counted.
    split = formatter(folder).sft_example({"prompt": messages[:4], "completion": messages[4:]})
    assert split.ids.tolist() == example.ids.tolist()
    last = len(out["input_ids"]) - len(hf.encode("hello world<|im_end|>\n", add_special_tokens=False))
    assert split.weights.tolist() == [0.0] * last + [1.0] * (len(split.ids) - last)


def test_plain_prompt_completion_and_text(folder):
    tok, f = HFTokenizer(folder), formatter(folder)
    example = f.sft_example({"prompt": "what is two plus two?", "completion": " four."})
    prompt, completion = tok.encode("what is two plus two?"), tok.encode(" four.<|endoftext|>")
    assert example.ids.tolist() == prompt + completion and completion[-1] == tok.eos_id
    assert example.weights.tolist() == [0.0] * len(prompt) + [1.0] * len(completion)
    everything = formatter(folder, count_prompt=True).sft_example({"prompt": "what is two plus two?", "completion": " four."})
    assert everything.weights.tolist() == [1.0] * len(everything.ids)
    text = f.sft_example({"text": "hello world"})
    assert text.ids.tolist() == tok.encode("hello world<|endoftext|>") and text.weights.all()
    renamed = formatter(folder, fields=FieldNames(prompt="question", completion="answer"))
    assert renamed.sft_example({"question": "what is two plus two?", "answer": " four."}).ids.tolist() == example.ids.tolist()


def test_preference_plain_and_conversational(folder, caplog):
    tok, f = HFTokenizer(folder), formatter(folder)
    pair = f.preference_pair({"prompt": "two plus two?", "chosen": " four", "rejected": " five"})
    assert pair.prompt.tolist() == tok.encode("two plus two?")
    assert pair.chosen.tolist() == tok.encode(" four<|endoftext|>")
    assert pair.rejected.tolist() == tok.encode(" five<|endoftext|>")
    # Implicit prompt: the shared first message; the responses are what the template writes after the generation prompt.
    user = {"role": "user", "content": "two plus two?"}
    chat = f.preference_pair({"chosen": [user, {"role": "assistant", "content": "four"}],
                              "rejected": [user, {"role": "assistant", "content": "five"}]})
    assert chat.prompt.tolist() == tok.encode("<|im_start|>user\ntwo plus two?<|im_end|>\n<|im_start|>assistant\n")
    assert chat.chosen.tolist() == tok.encode("four<|im_end|>\n")
    rows = preference_rows([pair, chat], 24, tok.eos_id)
    n = len(pair.prompt) + len(pair.chosen)
    assert rows["chosen_input_ids"][0, :n - 1].tolist() == [*pair.prompt, *pair.chosen][:-1]
    assert rows["chosen_weights"][0].sum() == len(pair.chosen) and rows["chosen_weights"][0, :len(pair.prompt) - 1].sum() == 0
    with caplog.at_level(logging.WARNING):
        f.preference_pair({"prompt": "p", "chosen": "same", "rejected": "same"})
    assert f.stats.chosen_equals_rejected == 1 and "'chosen' equals 'rejected'" in caplog.text


def test_pairs_with_chosen_equal_to_rejected_are_named_once_and_counted(folder, tmp_path, caplog):
    """A file of many such pairs warned once per record; now the first by place, then one count."""
    from phi2_jax.data.post_data import build_post_splits

    path = tmp_path / "pairs.jsonl"
    records = [{"prompt": f"p{i}", "chosen": "same" if i % 2 else " yes", "rejected": "same" if i % 2 else " no"}
               for i in range(7)]  # 3 of 7 with chosen equal to rejected: lines 2, 4 and 6
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with caplog.at_level(logging.WARNING):
        splits = build_post_splits([{"path": str(path)}], HFTokenizer(folder), load_chat_template(folder), "dpo", 32,
                                   0.0)
    assert splits.stats.chosen_equals_rejected == 3
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"{path} line 2: 'chosen' equals 'rejected'; the pair teaches nothing (its DPO loss gradient is zero).",
        "3 preference pairs have chosen equal to rejected (the first is named above); they teach nothing."]


def test_length_policy(folder):
    tok = HFTokenizer(folder)
    f = formatter(folder, seq_len=8)
    long_prompt = "hello world " * 10
    assert f.sft_example({"prompt": long_prompt, "completion": " four"}) is None
    assert f.preference_pair({"prompt": long_prompt, "chosen": "a", "rejected": "b"}) is None
    assert f.stats.dropped_long_prompt == 2
    cut = f.sft_example({"prompt": "two", "completion": " hello world " * 10})
    assert len(cut.ids) == 9 and cut.ids.tolist() == (tok.encode("two") + tok.encode(" hello world " * 10 + "<|endoftext|>"))[:9]
    assert f.stats.truncated == 1


@pytest.mark.parametrize("record,message", [
    ({"prompt": "x"}, "record 3 has no 'completion' field; expected all of \\['prompt', 'completion'\\]."),
    ({"body": "x"}, "record 3 has none of the expected fields"),
    ({"prompt": "x", "completion": ""}, "record 3: 'completion' is empty; expected a response to learn from."),
    ({"messages": [{"role": "robot", "content": "x"}]}, "record 3: 'messages'\\[0\\] has unknown role 'robot'"),
    ({"prompt": "x", "chosen": "", "rejected": "y"}, "record 3: 'chosen' is empty; expected a response."),
    ({"messages": [{"role": "user", "content": "x"}]}, "no non-empty assistant turn"),
])
def test_bad_records_are_one_sentence(folder, record, message):
    f = formatter(folder)
    with pytest.raises(UserInputError, match=message):
        (f.preference_pair if "chosen" in record else f.sft_example)(record, where="record 3")


def test_template_that_fails_to_render(folder):
    bad = ChatTemplate("{{ raise_exception('no system turns') if messages[0].role == 'system' }}", source="t.jinja")
    f = Formatter(HFTokenizer(folder), bad, 64)
    with pytest.raises(UserInputError, match=r"record 1: the chat template \(t.jinja\) failed to render a conversation: "
                                             r"no system turns\."):
        f.sft_example({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]},
                      where="record 1")


def test_packing_keeps_weights_and_restarts_positions(folder):
    f = formatter(folder)
    examples = [f.sft_example({"prompt": p, "completion": c}) for p, c in
                [("two plus two?", " four"), ("hello", " world"), ("what is", " two")]]
    rows = pack_examples(examples, 16, pad_id=0)
    at, row, segment = 0, 0, 0
    for example in examples:
        n = len(example.ids) - 1
        if at + n > 16:
            at, row, segment = 0, row + 1, 0
        segment += 1
        assert rows["segment_ids"][row, at:at + n].tolist() == [segment] * n
        assert rows["input_ids"][row, at:at + n].tolist() == example.ids[:-1].tolist()
        assert rows["weights"][row, at:at + n].tolist() == example.weights[1:].tolist()
        assert rows["positions"][row, at:at + n].tolist() == list(range(n))
        at += n
    assert rows["weights"].sum() == sum(e.weights[1:].sum() for e in examples)
    assert record_kind({"text": "x"}) == "language_modeling"
