"""`python -m phi2_jax.train` with train.objective sft / dpo, end to end on the CPU, as a user runs it.

The task is a small format-following set: "What color is the <thing>?" answered "Answer: <color>." (SFT);
preference pairs prefer that answer to the bare colour in capitals (DPO). The model is a tiny random
PhiForCausalLM saved by transformers with a byte-level BPE tokenizer, the files a user has.
"""

import json
import random

import numpy as np
import pytest

from phi2_jax.data.chat import PHI2_TEMPLATE
from tests import train_runs

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

COLORS = "red green blue yellow black white pink brown orange purple gray gold".split()
THINGS = "apple sky grass sun snow coal rose soil lemon plum ash coin cloud leaf".split()
VOCAB = 320


def _pairs(n, seed=0):
    rng = random.Random(seed)
    return [(f"What color is the {rng.choice(THINGS)}?", f"Answer: {rng.choice(COLORS)}.") for _ in range(n)]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """(folder of data files, base model folder)."""
    from phi2_jax.data.tokenizer import train_byte_level_bpe

    root = tmp_path_factory.mktemp("post")
    pairs = _pairs(320)
    with open(root / "sft.jsonl", "w") as f:  # conversational and plain prompt-completion records, mixed
        for i, (p, c) in enumerate(pairs):
            record = ({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]} if i % 2
                      else {"prompt": f"Instruct: {p}\nOutput:", "completion": f" {c}"})
            f.write(json.dumps(record) + "\n")
    with open(root / "dpo.jsonl", "w") as f:
        for p, c in pairs:
            bare = c.split()[-1].rstrip(".").upper()
            f.write(json.dumps({"prompt": [{"role": "user", "content": p}],
                                "chosen": [{"role": "assistant", "content": c}],
                                "rejected": [{"role": "assistant", "content": bare}]}) + "\n")
    base = root / "base"
    train_byte_level_bpe([f"Instruct: {p}\nOutput: {c} {c.upper()}" for p, c in pairs], 300, base)
    torch.manual_seed(0)
    config = transformers.PhiConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=128, bos_token_id=0,
                                    eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0)
    transformers.PhiForCausalLM(config).save_pretrained(base)
    return root, base


COMMON = ["data.seq_len=48", "train.batch_size=8", "train.log_every=5", "train.eval_batches=2",
          "train.samples=false", "model.compute_dtype=float32", "model.remat=none", "optim.warmup_steps=2",
          "optim.schedule=constant", "data.val_fraction=0.1", "checkpoint.async_save=false"]


def train(run_dir, *overrides, devices=1, check=True):
    return train_runs.run_in(train_runs.ROOT, run_dir, *COMMON, *overrides, devices=devices, check=check)


metrics = train_runs.logged


@pytest.fixture(scope="module")
def sft_run(task, tmp_path_factory):
    root, base = task
    run_dir = tmp_path_factory.mktemp("sft") / "run"
    proc = train(run_dir, "train.objective=sft", f"checkpoint.init_from={base}",
                 f"data.sources=[{{path: {root / 'sft.jsonl'}}}]", "train.steps=40", "train.eval_every=5",
                 "optim.lr=3e-3", "checkpoint.every=40")
    return run_dir, proc


def test_sft_held_out_completion_loss_falls(sft_run):
    """Threshold: the random model's held-out completion loss is about ln(320) = 5.8 nats; the answer is a fixed
    format plus one of 12 colours, so a model that learned the format is near ln(12)/tokens-per-answer."""
    run_dir, proc = sft_run
    val = metrics(run_dir, "val/loss")
    assert val[5] > 4.0 and val[40] < 1.5, val
    assert "post-training data: 320 sft examples" in proc.stderr
    assert "chat template: built-in Phi-2" in proc.stderr
    assert (run_dir / "chat_template.jinja").read_text() == PHI2_TEMPLATE
    png = (run_dir / "loss_curve.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_sft_export_renders_the_trained_prompt_in_transformers(sft_run, task, tmp_path):
    from phi2_jax.data.tokenizer import load_tokenizer
    from phi2_jax.hf.convert import to_hf
    from phi2_jax.hf.loading import from_pretrained

    run_dir, _ = sft_run
    out = tmp_path / "exported"
    to_hf(run_dir, out, dtype="float32")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "What color is the sky?"}]
    rendered = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "Instruct: What color is the sky?\nOutput:"  # what the SFT rows were rendered as
    full = hf_tok.apply_chat_template(messages + [{"role": "assistant", "content": "Answer: blue."}], tokenize=False)
    assert full == "Instruct: What color is the sky?\nOutput: Answer: blue.<|endoftext|>\n"
    # The exported weights are the run's: transformers' logits equal ours from the run folder.
    ids = np.array([load_tokenizer(out).encode(rendered)])
    hf_model = transformers.PhiForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = hf_model(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(from_pretrained(run_dir)(ids))
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=2e-4)


def test_dpo_with_lora_learns_the_preference(task, tmp_path):
    """Threshold 0.8: at step 0 the policy is the reference, every reward is 0 and the accuracy (chosen reward
    strictly above rejected) is 0; chance is 0.5; the preference is a format the model can pick up."""
    root, base = task
    run_dir = tmp_path / "dpo"
    proc = train(run_dir, "train.objective=dpo", f"checkpoint.init_from={base}", "model.lora_rank=8",
                 f"data.sources=[{{path: {root / 'dpo.jsonl'}}}]", "train.steps=30", "train.eval_every=10",
                 "optim.lr=1e-2", "checkpoint.every=30")
    accuracy = metrics(run_dir, "val/rewards/accuracies")
    assert accuracy[30] > 0.8, accuracy
    assert metrics(run_dir, "val/rewards/margins")[30] > 0
    for key in ("train/rewards/chosen", "train/rewards/rejected", "train/rewards/accuracies", "train/rewards/margins",
                "train/logps/chosen", "train/logps/rejected"):
        assert len(metrics(run_dir, key)) == 6, key
    assert "acc " in proc.stdout and "margin " in proc.stdout
    assert not (run_dir / "reference_logps.npz").exists()  # LoRA: the reference is the adapters off


def _sequence_logps(model, tokenizer, prompt: str, response: str) -> float:
    """transformers' summed log-prob of the response tokens after the prompt (the reference TRL computes)."""
    prompt_ids, response_ids = tokenizer.encode(prompt), tokenizer.encode(response)
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
    targets = ids[0, 1:]
    picked = logps[torch.arange(len(targets)), targets][len(prompt_ids) - 1:]
    return float(picked.sum())


def test_dpo_full_finetune_reference_pass_and_exact_resume(task, tmp_path):
    from phi2_jax.data.tokenizer import load_tokenizer

    root, base = task
    args = ["train.objective=dpo", f"checkpoint.init_from={base}", f"data.sources=[{{path: {root / 'dpo.jsonl'}}}]",
            "train.eval_every=100", "optim.lr=1e-3", "checkpoint.every=2", "optim.warmup_steps=0"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(straight, *args, "train.steps=4")
    # The stored reference log-probs are the starting model's, as transformers computes them.
    saved = np.load(straight / "reference_logps.npz", allow_pickle=False)
    tokenizer, hf_model = load_tokenizer(base), transformers.PhiForCausalLM.from_pretrained(base).eval()
    record = json.loads((root / "dpo.jsonl").read_text().splitlines()[0])
    prompt = "Instruct: " + record["prompt"][0]["content"] + "\nOutput:"
    chosen = _sequence_logps(hf_model, tokenizer, prompt, " " + record["chosen"][0]["content"] + "<|endoftext|>\n")
    rejected = _sequence_logps(hf_model, tokenizer, prompt, " " + record["rejected"][0]["content"] + "<|endoftext|>\n")
    found = np.flatnonzero(np.isclose(saved["chosen_0"], chosen, rtol=1e-5))
    assert len(found) and np.isclose(saved["rejected_0"][found], rejected, rtol=1e-5).any()
    # Stopped at step 2 and resumed: the same parameters as the uninterrupted run, bit for bit.
    train(split, *args, "train.steps=2")
    resumed = train(split, *args, "train.steps=4")
    assert "DPO reference log-probs read from" in resumed.stderr
    ours, reference = train_runs.final_params(split, 4), train_runs.final_params(straight, 4)
    for name in reference:
        np.testing.assert_array_equal(ours[name], reference[name], err_msg=name)


BAD_RECORDS = [
    ({"prompt": "What color is the sky?"}, "has no 'completion' field; expected all of ['prompt', 'completion']."),
    ({"prompt": "What color is the sky?", "completion": ""}, "'completion' is empty; expected a response to learn from."),
    ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
     "has unknown role 'robot'; expected one of system, user, assistant, tool."),
    ({"prompt": [], "completion": [{"role": "assistant", "content": "x"}]},
     "'prompt' is an empty list; expected a non-empty list of messages."),  # was "'prompt' is list; expected ..."
]


def refused(argv, capsys) -> str:
    """The one line `python -m phi2_jax.train` prints before exiting 2 (run in this process: no start-up cost)."""
    from phi2_jax.train import main

    with pytest.raises(SystemExit) as exit_code:
        main([*COMMON, *argv])
    assert exit_code.value.code == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    return line


@pytest.mark.parametrize("record,message", BAD_RECORDS)
def test_bad_records_are_one_sentence_and_write_nothing(task, tmp_path, record, message, capsys):
    _, base = task
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps(record) + "\n")
    run_dir = tmp_path / "run"
    line = refused([f"run_dir={run_dir}", "train.objective=sft", f"checkpoint.init_from={base}",
                    f"data.sources=[{{path: {data}}}]", "train.steps=2"], capsys)
    assert f"{data} line 2" in line and line.endswith(message)
    assert not run_dir.exists()


def test_a_template_that_fails_to_render_is_one_sentence(task, tmp_path, capsys):
    root, base = task
    template = tmp_path / "strict.jinja"
    template.write_text("{% for m in messages %}{% if m['role'] == 'user' %}{{ raise_exception('no users here') }}"
                        "{% endif %}{{ m['content'] }}{% endfor %}")
    line = refused([f"run_dir={tmp_path / 'run'}", "train.objective=sft", f"checkpoint.init_from={base}",
                    f"data.sources=[{{path: {root / 'sft.jsonl'}}}]", f"data.chat_template={template}"], capsys)
    assert line == (f"error: {root / 'sft.jsonl'} line 2: the chat template ({template}) failed to render a "
                    f"conversation: no users here.")
    assert not (tmp_path / "run").exists()


def test_a_sentencepiece_tokenizer_is_refused_for_chat_templates(task, tmp_path, capsys, monkeypatch):
    """Its end-of-sequence piece has no text, which templates and completions would write."""
    from phi2_jax.data.tokenizer import train_sentencepiece

    root, base = task
    monkeypatch.setenv("PHI2_JAX_CACHE", str(tmp_path / "cache"))
    model = train_sentencepiece(lambda: ["What color is the sky? Answer: blue."] * 50, 300, "post-training-test")
    line = refused([f"run_dir={tmp_path / 'run'}", "train.objective=sft", f"checkpoint.init_from={base}",
                    f"data.tokenizer={model}", f"data.sources=[{{path: {root / 'sft.jsonl'}}}]"], capsys)
    assert "does not encode its end-of-text token's text" in line and "phi2-convert to-hf writes one" in line


TEMPLATES_WITHOUT_RESPONSE = [
    # prints the user turns only: assistant turns render as nothing, so no token would count in the loss
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}",
    "",  # renders nothing at all (crashed the row packer with a ValueError before)
]


@pytest.mark.parametrize("objective", ["sft", "dpo"])
@pytest.mark.parametrize("text", TEMPLATES_WITHOUT_RESPONSE)
def test_a_template_that_renders_no_response_is_refused(task, tmp_path, capsys, text, objective):
    root, base = task
    template = tmp_path / "silent.jinja"
    template.write_text(text)
    data = tmp_path / "conversations.jsonl"
    record = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    if objective == "dpo":
        record = {"prompt": record["messages"][:1], "chosen": record["messages"][1:],
                  "rejected": [{"role": "assistant", "content": "Go away."}]}
    data.write_text(json.dumps(record) + "\n")
    line = refused([f"run_dir={tmp_path / 'run'}", f"train.objective={objective}", f"checkpoint.init_from={base}",
                    f"data.sources=[{{path: {data}}}]", f"data.chat_template={template}"], capsys)
    assert line == (f"error: {data} line 1: the chat template ({template}) renders no text for the response; "
                    f"expected the assistant's content in the rendered conversation.")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content,message", [
    ("{% for m in messages %}{{ m['content'] }\n{% endfor %}",
     "{template}: the chat template does not parse as jinja (line 1: unexpected '}}')."),
    (b"\xff\xfe{{ messages }}", "{template} is not UTF-8 text (byte 0); expected a jinja chat template or "
                                "tokenizer_config.json."),
])
def test_a_template_file_that_does_not_parse_is_named(task, tmp_path, capsys, content, message):
    root, base = task
    template = tmp_path / "broken.jinja"
    template.write_bytes(content if isinstance(content, bytes) else content.encode())
    line = refused([f"run_dir={tmp_path / 'run'}", "train.objective=sft", f"checkpoint.init_from={base}",
                    f"data.sources=[{{path: {root / 'sft.jsonl'}}}]", f"data.chat_template={template}"], capsys)
    assert line == "error: " + message.format(template=template)
    assert not (tmp_path / "run").exists()


def test_a_refused_dpo_resume_leaves_the_reference_log_probs_alone(task, tmp_path, capsys):
    """Full fine-tuning: a resume with other data is refused before the reference pass, which used to recompute
    and overwrite run_dir/reference_logps.npz and then say 'nothing was changed'."""
    from phi2_jax.train import main

    root, base = task
    run_dir, other = tmp_path / "run", tmp_path / "other.jsonl"
    other.write_text("".join((root / "dpo.jsonl").read_text().splitlines(keepends=True)[:100]))
    args = [*COMMON, f"run_dir={run_dir}", "train.objective=dpo", f"checkpoint.init_from={base}", "train.steps=1",
            "checkpoint.every=1", "train.eval_every=100"]
    main([*args, f"data.sources=[{{path: {root / 'dpo.jsonl'}}}]"])
    saved = (run_dir / "reference_logps.npz").read_bytes()
    capsys.readouterr()
    line = refused([*args, "train.steps=2", f"data.sources=[{{path: {other}}}]"], capsys)
    assert line.startswith(f"error: this config differs from the run in {run_dir / 'checkpoints' / '1'}: data.sources")
    assert (run_dir / "reference_logps.npz").read_bytes() == saved
    # checkpoint.restart=true sets the old log-probs aside with the checkpoints (kept, not overwritten).
    main([*args, f"data.sources=[{{path: {other}}}]", "checkpoint.restart=true"])
    (aside,) = run_dir.glob("replaced-*")
    assert (aside / "reference_logps.npz").read_bytes() == saved
    assert (run_dir / "reference_logps.npz").read_bytes() != saved


def test_a_conversational_pair_with_nothing_shared_and_no_prompt_is_named(task, tmp_path, capsys):
    """The implicit prompt (the messages chosen and rejected share) is empty: said so, not "'prompt' is list"."""
    _, base = task
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"chosen": [{"role": "assistant", "content": "Yes."}],
                                "rejected": [{"role": "assistant", "content": "No."}]}) + "\n")
    line = refused([f"run_dir={tmp_path / 'run'}", "train.objective=dpo", f"checkpoint.init_from={base}",
                    f"data.sources=[{{path: {data}}}]"], capsys)
    assert line == (f"error: {data} line 1 has no 'prompt' and its 'chosen' and 'rejected' share no first messages "
                    f"to take as one; expected a 'prompt' field.")
    assert not (tmp_path / "run").exists()
