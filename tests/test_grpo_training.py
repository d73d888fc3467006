"""`python -m phi2_jax.train` with train.objective grpo, end to end on the CPU, as a user runs it.

The toy task: "a+b=" for a, b in 0..4. A short SFT teaches the format (" <digit>" and end-of-text, with
random digits); GRPO then rewards the right sum: `math_answer` (exact) plus a user function given as
'module:function' that gives partial credit by closeness, so groups rarely tie and a tiny model has a
signal from the first step.
"""

import json
import random

import numpy as np
import pytest

from tests import train_runs

CLOSENESS = '''
import json


def closeness(prompts, completions, answer, **_):
    out = []
    for completion, gold in zip(completions, answer):
        text = completion.strip()
        out.append(max(0.0, 1 - abs(int(text) - int(gold)) / 9) if text.isdigit() else 0.0)
    return out


def broken(prompts, completions, **_):
    raise RuntimeError("this reward function is broken")


def record(prompts, completions, **columns):
    with open("seen.jsonl", "a") as f:
        f.write(json.dumps({"prompts": prompts, "completions": completions, "columns": sorted(columns)}) + "\\n")
    return [0.0] * len(completions)
'''
SUMS = [(a, b) for a in range(5) for b in range(5)]
COMMON = ["model.compute_dtype=float32", "model.remat=none", "train.log_every=5", "train.samples=false",
          "optim.warmup_steps=2", "optim.schedule=constant", "optim.weight_decay=0", "data.val_fraction=0.2",
          "checkpoint.async_save=false"]
GRPO = ["train.objective=grpo", "grpo.max_prompt_length=8", "grpo.max_completion_length=4", "grpo.num_generations=8",
        "train.batch_size=64", "train.eval_batches=4", "optim.lr=3e-3"]


def train(folder, run_dir, *overrides, check=True):
    return train_runs.run_in(folder, run_dir, *COMMON, *overrides, check=check)


metrics = train_runs.logged


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A folder holding the prompts, the reward module and a model that SFT taught the answer format."""
    import phi2_jax
    from phi2_jax.data.tokenizer import train_byte_level_bpe

    folder = tmp_path_factory.mktemp("grpo")
    rng = random.Random(0)
    with open(folder / "sft.jsonl", "w") as f:
        for _ in range(400):
            a, b = rng.choice(SUMS)
            f.write(json.dumps({"prompt": f"{a}+{b}=", "completion": f" {rng.randrange(9)}"}) + "\n")
    with open(folder / "prompts.jsonl", "w") as f, open(folder / "chat.jsonl", "w") as chat:
        for _ in range(4):
            for a, b in SUMS:
                f.write(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n")
                chat.write(json.dumps({"prompt": [{"role": "user", "content": f"{a}+{b}="}], "answer": str(a + b)})
                           + "\n")
    (folder / "toy_rewards.py").write_text(CLOSENESS)
    tokenizer = train_byte_level_bpe([f"{a}+{b}= {c}" for a, b in SUMS for c in range(9)], 300, folder / "tok")
    config = phi2_jax.preset("tiny").replace(vocab_size=320, num_hidden_layers=2, hidden_size=64, intermediate_size=256)
    phi2_jax.save_pretrained(phi2_jax.create_model(config, seed=0), folder / "base", tokenizer=tokenizer)
    train(folder, "sft", "train.objective=sft", "checkpoint.init_from=base", "data.sources=[{path: sft.jsonl}]",
          "data.seq_len=32", "train.steps=30", "train.batch_size=16", "train.eval_every=100", "checkpoint.every=30")
    return folder


def test_grpo_raises_the_held_out_reward_despite_a_broken_reward_function(toy):
    """Thresholds: the start answers a random digit, so its held-out exact-answer rate is near chance (1/9;
    0.08 measured) and its total reward (exact + 0.2 x closeness) about 0.2. In 80 steps the total rose by
    0.15-0.3 and the exact rate to 0.19-0.35 in the runs measured here (tiny models' RL paths vary with any
    setting; several settled on answering 4, the middle of the range, right for 5 of the 25 sums). Asked:
    total +0.1 and exact rate +0.1 at the best of the later evaluations. The held-out prompts are sums the
    training prompts also hold (25 exist): this shows the machinery learns, not generalisation. A third
    reward function raises at every call: it scores 0, is counted and warned about, and the run goes on."""
    proc = train(toy, "rl", *GRPO, "checkpoint.init_from=sft", "data.sources=[{path: prompts.jsonl}]",
                 'grpo.rewards=[math_answer, {name: "toy_rewards:closeness", weight: 0.2}, "toy_rewards:broken"]',
                 "train.steps=80", "train.eval_every=20", "checkpoint.every=80", "train.log_every=10")
    exact, total = metrics(toy / "rl", "val/rewards/math_answer/mean"), metrics(toy / "rl", "val/reward")
    assert sorted(exact) == [0, 20, 40, 60, 80]
    assert exact[0] < 0.15 and max(exact[s] for s in (40, 60, 80)) >= exact[0] + 0.1, exact
    assert total[80] >= total[0] + 0.1, total
    for key in ("train/reward", "train/reward_std", "train/rewards/math_answer/mean", "train/rewards/closeness/std",
                "train/frac_reward_zero_std", "train/tied_groups", "train/clip_ratio/region_mean", "train/entropy",
                "train/completions/mean_length", "train/completions/clipped_ratio"):
        assert len(metrics(toy / "rl", key)) == 8, key
    assert "GRPO prompts: 100 (" in proc.stderr and "step 0  held-out  reward " in proc.stdout
    assert (toy / "rl" / "loss_curve.png").read_bytes().startswith(b"\x89PNG")
    assert ("reward function broken raised RuntimeError: this reward function is broken; its rewards for this batch "
            "are 0.") in proc.stderr
    # Counted per call: 80 rollout batches and 5 held-out evaluations (steps 0, 20, ..., 80).
    assert metrics(toy / "rl", "train/reward_failures/broken")[80] == 80 + 4


def test_grpo_resume_repeats_the_uninterrupted_run(toy):
    """KL to a frozen copy of the start (beta > 0, no LoRA) and two passes per rollout (old log-probs kept):
    2 steps, stop, resume to 4 gives the same parameters bit for bit as 4 straight (the sampler's state
    is the step's seed, and Grain's iterator state is in the checkpoint)."""
    args = [*GRPO, "checkpoint.init_from=sft", "data.sources=[{path: prompts.jsonl}]", "grpo.beta=0.04",
            "grpo.num_iterations=2", "grpo.rewards=[math_answer]", "train.eval_every=100", "checkpoint.every=2",
            "train.batch_size=16", "train.log_every=1", "optim.warmup_steps=0"]  # no warmup clipped to the 2-step run
    train(toy, "straight", *args, "train.steps=4")
    train(toy, "split", *args, "train.steps=2")
    resumed = train(toy, "split", *args, "train.steps=4")
    assert "resumed from step 2" in resumed.stdout
    assert metrics(toy / "split", "train/kl")[4] == metrics(toy / "straight", "train/kl")[4] > 0
    ours, reference = train_runs.final_params(toy / "split", 4), train_runs.final_params(toy / "straight", 4)
    for name in reference:
        np.testing.assert_array_equal(ours[name], reference[name], err_msg=name)


def test_grpo_in_two_processes_follows_the_one_process_run(toy):
    """A pod's path: two processes (gloo, 2 fake devices each) sample from the sharded policy, each scores its
    own prompts' completions, rewards and held-out scores are gathered; the run equals one process driving the
    same 4 devices. (Two bugs of this path were found by hand before: generate's output not gathered across
    processes, and a device of the other process read while freeing memory.)"""
    import socket
    import subprocess
    import sys

    args = [*COMMON, *GRPO, "checkpoint.init_from=sft", "data.sources=[{path: prompts.jsonl}]", "grpo.beta=0.04",
            'grpo.rewards=[math_answer, {name: "toy_rewards:closeness", weight: 0.2}]', "train.steps=2",
            "train.eval_every=2", "checkpoint.every=2", "train.batch_size=16", "train.log_every=1",
            "optim.warmup_steps=0"]
    train_runs.run_in(toy, "one", *args, devices=4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-m", "phi2_jax.train", "run_dir=two", *args,
                               f"distributed.coordinator=127.0.0.1:{port}", "distributed.num_processes=2",
                               f"distributed.process_id={i}"], cwd=toy, env=train_runs.train_env(2),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "4 devices, 2 processes" in outputs[0]
    for key in ("train/loss", "train/grad_norm", "train/reward", "train/kl", "val/reward"):
        one, two = metrics(toy / "one", key), metrics(toy / "two", key)
        assert one.keys() == two.keys() and one, key
        np.testing.assert_allclose(list(two.values()), list(one.values()), rtol=1e-4, atol=1e-6, err_msg=key)


def test_grpo_export_keeps_the_chat_template_of_the_sft_run_it_started_from(toy, tmp_path):
    """GRPO renders no template, but exporting SFT -> GRPO used to drop the SFT run's, so transformers'
    apply_chat_template on the export raised (no template) instead of rendering the format SFT taught."""
    transformers = pytest.importorskip("transformers")
    from phi2_jax.hf.convert import to_hf

    train(toy, "from_sft", *GRPO, "checkpoint.init_from=sft", "data.sources=[{path: prompts.jsonl}]",
          "grpo.rewards=[math_answer]", "train.eval_every=100", "train.steps=1", "checkpoint.every=1",
          "train.batch_size=16")
    to_hf(toy / "from_sft", tmp_path / "exported", dtype="float32")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "1+2="}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered == "Instruct: 1+2=\nOutput:"  # the built-in template the SFT run trained with


def test_grpo_on_conversational_prompts_calls_reward_functions_as_trl_does(toy):
    """Prompts given as message lists are rendered with the chat template (the built-in one here, as the SFT run
    trained) and user reward functions get them as TRL's GRPOTrainer passes conversational data."""
    train(toy, "chat", *GRPO, "checkpoint.init_from=sft", "data.sources=[{path: chat.jsonl}]", "train.steps=1",
          "grpo.max_prompt_length=32",  # "Instruct: 1+2=\nOutput:", byte by byte in the toy tokenizer
          "grpo.rewards=[math_answer, toy_rewards:record]", "train.eval_every=100", "checkpoint.every=1",
          "train.batch_size=16")
    calls = [json.loads(line) for line in (toy / "seen.jsonl").read_text().splitlines()]
    training = [c for c in calls if len(c["completions"]) == 16]  # 2 prompts x 8; the others are held-out calls
    assert len(training) == 1 and len(calls) == 3  # held out at steps 0 and 1
    for call in calls:
        assert all(len(p) == 1 and p[0]["role"] == "user" and p[0]["content"].endswith("=") for p in call["prompts"])
        assert all(len(c) == 1 and c[0]["role"] == "assistant" and isinstance(c[0]["content"], str)
                   for c in call["completions"])
        assert call["columns"] == ["answer"]
    assert len(metrics(toy / "chat", "train/rewards/math_answer/mean")) == 1
    assert (toy / "chat" / "chat_template.jinja").is_file()  # the template the prompts were rendered with


@pytest.mark.parametrize("overrides,message", [
    (['grpo.rewards=["toy_rewards:missing"]'], "grpo.rewards[0] 'toy_rewards:missing': module toy_rewards has no "
                                               "attribute 'missing'."),
    (["grpo.num_generations=7"], "grpo.num_generations 7 does not divide the batch of 64 completions"),
    (["grpo.loss_type=dapo"], "grpo.loss_type 'dapo' is one of TRL's that phi2_jax does not implement"),
])
def test_bad_grpo_settings_are_one_sentence(toy, overrides, message, monkeypatch, capsys):
    from phi2_jax.train import main

    monkeypatch.chdir(toy)
    monkeypatch.syspath_prepend(str(toy))
    with pytest.raises(SystemExit) as exit_code:
        main(["run_dir=refused", *COMMON, *GRPO, "checkpoint.init_from=sft", "data.sources=[{path: prompts.jsonl}]",
              *overrides])
    assert exit_code.value.code == 2
    assert message in capsys.readouterr().err
    assert not (toy / "refused").exists()


def test_grpo_refuses_what_it_would_misread(toy, tmp_path, capsys, monkeypatch):
    """data.fields (SFT and DPO's renaming) was silently ignored by GRPO, and a Parquet file was read as JSONL
    ('line 1 is not UTF-8 text')."""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    from phi2_jax.train import main

    monkeypatch.chdir(toy)
    pq.write_table(pa.table({"prompt": ["1+1="], "answer": ["2"]}), tmp_path / "prompts.parquet")
    cases = [(["data.sources=[{path: prompts.jsonl}]", "data.fields={prompt: question}"],
              "error: data.fields {'prompt': 'question'} renames SFT and DPO record fields; GRPO prompt files name "
              "theirs with grpo.prompt_field and grpo.answer_field (grpo.task jsonl)."),
             ([f"data.sources=[{{path: {tmp_path / 'prompts.parquet'}}}]"],
              f"error: data source file {tmp_path / 'prompts.parquet'} is Parquet; GRPO reads its prompts from JSONL "
              f"files (grpo.task jsonl); expected .jsonl files."),
             (["data.sources=[{path: prompts.jsonl}, {path: chat.jsonl}]"],
              "error: GRPO prompt file chat.jsonl holds message lists but prompts.jsonl holds text; expected one kind "
              "of prompt in a run.")]
    for overrides, message in cases:
        with pytest.raises(SystemExit) as exit_code:
            main(["run_dir=refused", *COMMON, *GRPO, "checkpoint.init_from=sft", "grpo.task=jsonl", *overrides])
        assert exit_code.value.code == 2
        assert message in capsys.readouterr().err.splitlines()
        assert not (toy / "refused").exists()
