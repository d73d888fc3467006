"""`python -m phi2_jax.train` end to end on the CPU: learning, exact resume, sharded and multi-process equivalence."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import phi2_jax
from tests import train_runs


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One tokenizer / token cache for every run of this module."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, cache):
    """20 uninterrupted steps: the run the interrupted ones must reproduce bit for bit."""
    run_dir = tmp_path_factory.mktemp("reference")
    train_runs.run(run_dir, "train.steps=20", cache=cache)
    return run_dir


def test_default_run_learns_and_leaves_a_loadable_model(tmp_path, cache):
    run_dir = tmp_path / "run"
    proc = train_runs.run(run_dir, "train.steps=60", "train.eval_every=30", "train.samples=true", cache=cache)
    losses = train_runs.train_losses(run_dir)
    assert losses[5] > 5.5 and losses[60] < losses[5] - 1.5, losses  # ln(512) = 6.24 at the start
    assert "val_loss" in proc.stdout and "tokens/s" in proc.stdout and "mfu" in proc.stdout and "eta" in proc.stdout
    assert "samples (greedy):" in proc.stdout and "def fibonacci(n):" in proc.stdout
    assert (run_dir / "checkpoints" / "60").is_dir()
    assert list((run_dir / "events").glob("events.out.tfevents.*"))
    assert (run_dir / "loss_curve.png").stat().st_size > 10_000
    model = phi2_jax.from_pretrained(run_dir)
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == 512
    params = train_runs.final_params(run_dir, 60)
    np.testing.assert_array_equal(np.asarray(model.layers.mlp.fc1.kernel.get_value()), params["layers/mlp/fc1/kernel"])
    # the run folder exports straight to a folder transformers loads, with the same logits
    from transformers import PhiForCausalLM

    from phi2_jax.hf.convert import main as convert
    from tests.hf_reference import reference_logits

    convert(["to-hf", str(run_dir), str(tmp_path / "hf"), "--dtype", "float32"])
    exported = PhiForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = np.random.default_rng(0).integers(0, 512, (2, 16))
    np.testing.assert_allclose(np.asarray(model(ids)), reference_logits(exported, ids), rtol=1e-4, atol=1e-4)


def _wait_for_checkpoint(run_dir, step, proc, timeout=300):
    deadline = time.time() + timeout
    while not (run_dir / "checkpoints" / str(step)).is_dir():
        assert proc.poll() is None, "training ended before the checkpoint appeared"
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_interrupted_run_resumes_bit_identically(tmp_path, cache, reference_run, sig):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(train_runs.command(run_dir, "train.steps=20"), cwd=train_runs.ROOT,
                            env=train_runs.train_env(1, cache), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_checkpoint(run_dir, 5, proc)
    proc.send_signal(sig)
    output = proc.communicate(timeout=120)[0]
    if sig == signal.SIGTERM:
        assert proc.returncode == 0, output
        assert "SIGTERM: saved a checkpoint at step" in output
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "checkpoints" / "20").exists()
    resumed = train_runs.run(run_dir, "train.steps=20", cache=cache)
    assert "resumed from step" in resumed.stdout
    ours, reference = train_runs.final_params(run_dir, 20), train_runs.final_params(reference_run, 20)
    for name in reference:
        np.testing.assert_array_equal(ours[name], reference[name], err_msg=name)


def test_eight_devices_give_the_single_device_loss_curve(tmp_path, cache, reference_run):
    run_dir = tmp_path / "sharded"
    train_runs.run(run_dir, "train.steps=20", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", devices=8, cache=cache)
    single, sharded = train_runs.train_losses(reference_run), train_runs.train_losses(run_dir)
    assert single.keys() == sharded.keys()
    np.testing.assert_allclose([sharded[s] for s in single], list(single.values()), rtol=2e-4)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TWO_PROCESS = ["train.steps=10", "mesh.data=2", "mesh.fsdp=4", "mesh.tensor=1", "checkpoint.every=10"]


def _start_two_processes(run_dir, logs, cache, *overrides):
    """Two training processes forming one job (4 fake devices each); their output goes to `logs`."""
    port = _free_port()
    procs = []
    for i, log in enumerate(logs):
        with open(log, "w") as out:
            procs.append(subprocess.Popen(
                train_runs.command(run_dir, *TWO_PROCESS, *overrides, f"distributed.coordinator=127.0.0.1:{port}",
                                   "distributed.num_processes=2", f"distributed.process_id={i}"),
                cwd=train_runs.ROOT, env=train_runs.train_env(4, cache), stdout=out, stderr=subprocess.STDOUT))
    return procs


def _finish(procs, logs, timeout=400):
    for p in procs:
        p.wait(timeout=timeout)
    outputs = [log.read_text() for log in logs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    return outputs


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, cache):
    """10 steps in two processes, uninterrupted, with the end-of-run samples on (they read global arrays)."""
    folder = tmp_path_factory.mktemp("two")
    logs = [folder / f"process_{i}.log" for i in range(2)]
    outputs = _finish(_start_two_processes(folder / "run", logs, cache, "train.samples=true"), logs)
    return folder / "run", outputs


def test_two_processes_give_the_one_process_curve(tmp_path, cache, two_process_run):
    one = tmp_path / "one"
    train_runs.run(one, *TWO_PROCESS, devices=8, cache=cache)
    two, outputs = two_process_run
    assert "2 processes" in outputs[0] and "step 10/10" in outputs[0]
    assert "step 10/10" not in outputs[1]  # only process 0 logs
    assert "samples (greedy):" in outputs[0] and "samples (greedy):" not in outputs[1]
    assert "tokenizer:" not in outputs[1]  # nor do process 1's INFO logs
    a, b = train_runs.train_losses(one), train_runs.train_losses(two)
    np.testing.assert_allclose([b[s] for s in a], list(a.values()), rtol=2e-4)
    assert (two / "checkpoints" / "10").is_dir()
    assert (two / "loss_curve.png").is_file()


def test_sigterm_to_one_process_stops_both_at_one_step_and_resumes_bit_identically(tmp_path, cache, two_process_run):
    """A scheduler may signal one process only: both must stop after the same step, save it once and exit 0."""
    run_dir = tmp_path / "run"
    logs = [tmp_path / f"process_{i}.log" for i in range(2)]
    procs = _start_two_processes(run_dir, logs, cache)
    deadline = time.time() + 300
    while "\nmodel " not in logs[0].read_text():  # printed just before the first step
        assert all(p.poll() is None for p in procs) and time.time() < deadline, logs[0].read_text()[-3000:]
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # process 1 only
    outputs = _finish(procs, logs)
    (saved,) = [int(p.name) for p in (run_dir / "checkpoints").iterdir()]  # exactly one checkpoint
    assert 1 <= saved < 10
    assert f"SIGTERM: saved a checkpoint at step {saved}; exiting" in outputs[0]

    resumed = _finish(_start_two_processes(run_dir, logs, cache), logs)
    assert f"resumed from step {saved}" in resumed[0]
    reference_dir = two_process_run[0]
    ours, reference = train_runs.train_losses(run_dir), train_runs.train_losses(reference_dir)
    assert {s: ours[s] for s in reference if s > saved} == {s: reference[s] for s in reference if s > saved}
    ours, reference = train_runs.final_params(run_dir, 10), train_runs.final_params(reference_dir, 10)
    for name in reference:
        np.testing.assert_array_equal(ours[name], reference[name], err_msg=name)


def test_dry_run_compiles_phi2_on_an_abstract_8_device_mesh():
    proc = subprocess.run([*train_runs.command("unused")[:3], "configs/phi2.yaml", "--dry-run"], cwd=train_runs.ROOT,
                          env=train_runs.train_env(1), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compiled the train step for mesh {'data': 1, 'fsdp': 8, 'tensor': 1} (8 devices)" in proc.stdout
    assert "2,779,683,840" in proc.stdout and "GiB/device" in proc.stdout
    assert not os.path.exists(train_runs.ROOT / "runs" / "phi2")


def test_model_flops_count_dpo_pairs_and_reference_forwards():
    """MFU's numerator for Phi-2 at 2048 tokens, by hand: N = 2,779,683,840 - 51,200 x 2,560 (the embedding is a
    lookup) = 2,648,611,840; 6N + 12 L T d = 15,891,671,040 + 12 x 32 x 2,048 x 2,560 = 17,904,936,960 per token."""
    from phi2_jax import preset
    from phi2_jax.training.metrics import update_flops

    phi2 = preset("phi-2")
    assert update_flops(phi2, "lm", 1, 2048) == 17_904_936_960 * 2048 == 36_669_310_894_080
    # A DPO pair is two sequences; LoRA's adapters-off reference adds a forward (a third of forward + backward).
    assert update_flops(phi2, "dpo", 1, 2048) == 2 * 36_669_310_894_080
    assert update_flops(phi2, "dpo", 1, 2048, reference_forward=True) == pytest.approx(97_784_829_050_880, rel=1e-12)


REFUSED = [
    (["train.stpes=5"], "unknown config key 'train.stpes'. Did you mean 'steps'?"),
    (["model.hiden_size=64"], "unknown config key 'model.hiden_size'. Did you mean 'hidden_size'?"),
    (["train.steps=ten"], "train.steps must be int, got 'ten' (str)."),
    (["train.batch_size=6", "mesh.data=4", "mesh.fsdp=1"], "micro-batch of 6 sequences"),
    (["data.seq_len=4096"], "data.seq_len 4096 exceeds the model's max_position_embeddings 512."),
    (["model.vocab_size=128"], "has 512 tokens but the model's vocab_size is 128"),
]


@pytest.mark.parametrize("overrides,message", REFUSED)
def test_refused_configs_say_why_and_leave_no_run_dir(request, tmp_path, cache, overrides, message):
    run_dir = tmp_path / "run"
    extra = []
    if "vocab_size=128" in overrides[0]:  # needs a 512-token tokenizer: the one the reference run trains and caches
        request.getfixturevalue("reference_run")
        extra = ["data.tokenizer=" + str(next((cache / "tokenizers").glob("auto-512-*.model")))]
    proc = train_runs.run(run_dir, *overrides, *extra, devices=4, cache=cache, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert not run_dir.exists()


def test_resuming_with_other_data_workers_is_refused(tmp_path, cache):
    run_dir = tmp_path / "run"
    train_runs.run(run_dir, "train.steps=10", "checkpoint.every=10", cache=cache)
    proc = train_runs.run(run_dir, "train.steps=15", "data.workers=1", cache=cache, check=False)
    assert proc.returncode == 2
    assert "was trained with data.workers=0; resume it with the same value (got 1)" in proc.stderr


def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, cache):
    run_dir = tmp_path / "run"
    train_runs.run(run_dir, "train.steps=10", cache=cache)
    for file in (run_dir / "checkpoints" / "10" / "params").rglob("*"):
        if file.is_file():
            file.write_bytes(b"garbage")
    proc = train_runs.run(run_dir, "train.steps=15", cache=cache)
    assert "checkpoint at step 10" in proc.stderr and "could not be restored" in proc.stderr
    assert proc.stderr.count("moved the damaged checkpoint of step 10 to") == 1  # one line, no echoes
    assert "Event loop is closed" not in proc.stderr and "Traceback" not in proc.stderr
    assert "resumed from step 5" in proc.stdout and "step 15/15" in proc.stdout


def test_finetuning_starts_at_the_transformers_loss(tmp_path, cache, hf_folder, monkeypatch):
    """init_from a transformers model: the first logged loss is transformers' loss on the same packed batch."""
    import torch

    from phi2_jax.data.pipeline import build_splits, train_dataset

    folder, reference = hf_folder("finetune", dialect="5.x", vocab_size=512, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, partial_rotary_factor=0.5,
                                  max_position_embeddings=128)
    run_dir = tmp_path / "run"
    train_runs.run(run_dir, f"checkpoint.init_from={folder}", "train.steps=1", "train.log_every=1", cache=cache)
    first_loss = train_runs.train_losses(run_dir)[1]

    monkeypatch.setenv("PHI2_JAX_CACHE", str(cache))
    splits = build_splits([{"path": "stdlib"}], "auto", 64, 0.05, 512, max_documents=150)
    batch = next(iter(train_dataset(splits, 8, seed=0)))
    total, count = 0.0, 0
    with torch.no_grad():
        for row in range(8):
            for segment in np.unique(batch["segment_ids"][row]):
                where = batch["segment_ids"][row] == segment  # each packed document on its own
                logits = reference(torch.tensor(batch["input_ids"][row][where][None])).logits[0]
                targets = torch.tensor(batch["targets"][row][where]).long()
                total += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
                count += int(where.sum())
    assert first_loss == pytest.approx(total / count, rel=1e-5)


def test_launch_local_sh_runs_a_two_process_training(tmp_path, cache):
    run_dir = tmp_path / "local2"
    env = {**train_runs.train_env(1, cache), "PYTHON": sys.executable, "RUN_LOGS": str(tmp_path / "logs")}
    # The README's `launch/local.sh 2 train.steps=20 ...` keeps a warmup as long as the run: shortened, and said.
    proc = subprocess.run(["bash", "launch/local.sh", "2", *train_runs.FAST, "train.steps=6", "optim.warmup_steps=20",
                           f"run_dir={run_dir}"],
                          cwd=train_runs.ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "2 processes" in proc.stdout and "step 6/6" in proc.stdout
    assert (run_dir / "checkpoints" / "6").is_dir()
    assert "step 6/6" not in (tmp_path / "logs" / "process_1.log").read_text()  # process 1 stays quiet
    assert "optim.warmup_steps 20 is not below train.steps 6; warming up over 0 steps" in proc.stdout


def test_launch_recipes_xla_flags_are_known_to_this_xla():
    # XLA aborts at start on a flag it does not know: a renamed or dropped GPU flag would kill the job.
    recipes = [train_runs.ROOT / "launch" / name for name in ("slurm.sbatch", "k8s-jobset.yaml")]
    flags = sorted({flag for recipe in recipes for flag in re.findall(r"--xla_\w+=\S+", recipe.read_text())})
    assert len(flags) >= 3, flags

    def starts_with(xla_flags):
        env = {**os.environ, "XLA_FLAGS": " ".join(xla_flags), "JAX_PLATFORMS": "cpu"}
        probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                               capture_output=True, text=True, timeout=120)
        return probe.returncode == 0, probe.stderr[-1000:]

    ok, error = starts_with(flags)
    assert ok, error
    assert not starts_with(["--xla_gpu_no_such_flag=true"])[0]  # the probe does catch an unknown flag
