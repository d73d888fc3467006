"""The trainer never loses a run: refusals are sentences that leave every file byte for byte as it was.

One short run (10 steps, checkpoints at 5 and 10) is trained once; each test works on a copy of it.
Refusals are checked through the library (`Trainer.run`, no new process) where the command adds
nothing, and through the command where the exit code and stderr are the point.
"""

import hashlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from phi2_jax.errors import ConfigError
from phi2_jax.training.run_config import load_run_config, validate
from phi2_jax.training.run_lock import RunLock
from tests import train_runs


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache):
    """A finished 10-step run with checkpoints at steps 5 and 10 (never modified: tests copy it)."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train_runs.run(run_dir, "train.steps=10", cache=cache)
    return run_dir


@pytest.fixture
def run_copy(tmp_path, trained):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def hashes(folder):
    """{relative path: sha256} of every file under `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def train_in_process(run_dir, cache, monkeypatch, *overrides):
    """`Trainer.run` in this process (the library's entry point), with the fast config."""
    import jax

    from phi2_jax.training.trainer import Trainer

    monkeypatch.setenv("PHI2_JAX_CACHE", str(cache))
    config = load_run_config(None, [f"run_dir={run_dir}", *train_runs.FAST, *overrides])
    return Trainer(config, validate(config, jax.device_count())).run()


# ----------------------------------------------------------------------------- resume: refuse, never overwrite
def test_resuming_with_another_model_is_refused_and_changes_nothing(run_copy, cache, monkeypatch):
    before = hashes(run_copy)
    with pytest.raises(ConfigError) as error:
        train_in_process(run_copy, cache, monkeypatch, "train.steps=20", "model.num_hidden_layers=3")
    assert (f"this config differs from the run in {run_copy.absolute()}/checkpoints/10: model.num_hidden_layers "
            f"(2 there, 3 here); nothing was changed; resume with the run's settings, use another run_dir, or pass "
            f"checkpoint.restart=true") in str(error.value)
    assert hashes(run_copy) == before


def test_unreadable_checkpoints_are_refused_and_kept(run_copy, cache, monkeypatch):
    for step in (5, 10):
        for file in (run_copy / "checkpoints" / str(step) / "params").rglob("*"):
            if file.is_file():
                file.write_bytes(b"garbage")
    before = hashes(run_copy)
    with pytest.raises(ConfigError) as error:
        train_in_process(run_copy, cache, monkeypatch, "train.steps=20")
    assert (f"none of the checkpoints in {run_copy.absolute()}/checkpoints (steps 5, 10) could be restored "
            f"(the warnings above say why); nothing was changed;") in str(error.value)
    assert hashes(run_copy) == before  # nothing set aside, nothing overwritten


def test_readme_override_example_is_refused_in_a_sentence(run_copy, cache):
    """`train.steps=50 optim.lr=1e-3` on a folder holding a run at lr 3e-3: exit 2, one sentence, nothing written."""
    before = hashes(run_copy)
    proc = train_runs.run(run_copy, "train.steps=50", "optim.lr=1e-3", cache=cache, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error == (f"error: this config differs from the run in {run_copy}/checkpoints/10: optim.lr (0.003 there, "
                     f"0.001 here); nothing was changed; resume with the run's settings, use another run_dir, or "
                     f"pass checkpoint.restart=true to start afresh here (which moves the old checkpoints to "
                     f"{run_copy}/replaced-<time>/, deleting nothing).")
    assert "Traceback" not in proc.stderr
    assert hashes(run_copy) == before


def test_run_time_overrides_are_applied_and_said(run_copy, cache):
    with open(run_copy / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "train/lo')  # a line a crash cut short
    out = train_runs.run(run_copy, "train.steps=14", "train.log_every=2", cache=cache).stdout
    assert "applying settings that differ from the run's: train.log_every 5 -> 2, train.steps 10 -> 14" in out
    assert "the learning-rate schedule now spans 14 steps, 5 of warmup" in out
    assert "step 14/14" in out
    assert json.loads((run_copy / "config.json").read_text())["train"]["steps"] == 14  # true: the run now has 14
    lines = (run_copy / "metrics.jsonl").read_text().splitlines()
    assert '{"step": 11, "train/lo' in lines  # the cut line stays on its own, the records after it whole
    assert [json.loads(line)["step"] for line in lines[lines.index('{"step": 11, "train/lo') + 1:]] == [12, 14, 14]


def test_nothing_to_train_leaves_every_file_as_it_was(run_copy, cache, monkeypatch, capsys):
    before = hashes(run_copy)
    result = train_in_process(run_copy, cache, monkeypatch, "train.steps=8", "train.log_every=1")
    out = capsys.readouterr().out
    assert "not applied (nothing to train): train.log_every 5 -> 1, train.steps 10 -> 8" in out
    assert f"{run_copy} is already at step 10 (train.steps 8): nothing to train; config.json is left as it is." in out
    assert result["steps_run"] == 0
    assert hashes(run_copy) == before


def test_restart_sets_the_old_run_aside_byte_for_byte(run_copy, cache):
    before = hashes(run_copy)
    out = train_runs.run(run_copy, "train.steps=5", "model.num_hidden_layers=1", "checkpoint.restart=true",
                         cache=cache).stdout
    assert "checkpoint.restart=true: moved the previous run's checkpoints, metrics.jsonl, config.json, events, " \
           "loss_curve.png to" in out
    (aside,) = run_copy.glob("replaced-*")
    assert hashes(aside) == before
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == ["5"]


def test_a_data_iterator_state_that_does_not_fit_is_a_sentence(run_copy, cache, monkeypatch):
    for step in (5, 10):
        (run_copy / "checkpoints" / str(step) / "data" / "metadata").write_text('{"position": 3}')
    with pytest.raises(ConfigError, match=r"the data iterator state in .*/checkpoints/10 does not fit this data "
                                          r"pipeline \(KeyError: 'next_index'\); was data.sources or data.seq_len "
                                          r"changed\?"):
        train_in_process(run_copy, cache, monkeypatch, "train.steps=20")


# ----------------------------------------------------------------------------- one trainer per folder
def test_run_lock_refuses_a_live_holder_and_takes_a_dead_ones(tmp_path, caplog):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        host = socket.gethostname()
        (tmp_path / "train.lock").write_text(json.dumps({"host": host, "pid": sleeper.pid, "since": "then"}))
        with pytest.raises(ConfigError) as error:
            RunLock(tmp_path).acquire()
        assert str(error.value) == (f"{tmp_path} is in use by another trainer (pid {sleeper.pid} on host {host}, "
                                    f"since then); wait for it to end or use another run_dir (if that trainer is "
                                    f"gone, delete {tmp_path / 'train.lock'}).")
    finally:
        sleeper.kill()
        sleeper.wait()
    lock = RunLock(tmp_path)
    with caplog.at_level(logging.WARNING):
        lock.acquire()  # the holder is dead now
    assert f"took over the lock of pid {sleeper.pid} on {host}" in caplog.text
    assert json.loads((tmp_path / "train.lock").read_text())["pid"] == os.getpid()
    with pytest.raises(ConfigError, match=f"in use by another trainer \\(pid {os.getpid()} on host"):
        RunLock(tmp_path).acquire()  # a second trainer, while the first holds it
    lock.release()
    assert not (tmp_path / "train.lock").exists()


def test_a_second_trainer_on_a_run_folder_is_refused(run_copy, cache, monkeypatch):
    sleeper = subprocess.Popen(["sleep", "60"])  # stands for the first trainer: a live process on this host
    try:
        (run_copy / "train.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid}))
        before = hashes(run_copy)
        with pytest.raises(ConfigError, match=f"is in use by another trainer \\(pid {sleeper.pid} on host"):
            train_in_process(run_copy, cache, monkeypatch, "train.steps=20")
        assert hashes(run_copy) == before
    finally:
        sleeper.kill()
        sleeper.wait()


# ----------------------------------------------------------------------------- divergence, start-up SIGTERM
def test_divergence_stops_before_a_non_finite_checkpoint(tmp_path, cache):
    run_dir = tmp_path / "run"
    proc = train_runs.run(run_dir, "train.steps=30", "optim.lr=1e4", cache=cache, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: training diverged at step 10: loss nan, gradient norm nan (lr ")
    assert error.endswith("stopped without saving it, so the newest checkpoint is step 5; lower optim.lr (now "
                          "10000.0) or lengthen optim.warmup_steps, and resume.")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["5"]
    params = train_runs.final_params(run_dir, 5)
    assert all(np.isfinite(v).all() for v in params.values())
    assert all(math.isfinite(r.get("train/loss", 0)) for r in map(json.loads, (run_dir / "metrics.jsonl").open()))


def test_sigterm_during_start_up_exits_0_with_nothing_to_save(tmp_path, cache, trained):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(train_runs.command(run_dir, "train.steps=10"), cwd=train_runs.ROOT,
                            env=train_runs.train_env(1, cache), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 300
    while not (run_dir / "train.lock").exists():  # the lock is taken before the first step
        assert proc.poll() is None and time.time() < deadline, "the trainer ended before taking its lock"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-3000:]
    assert "SIGTERM before the first step: nothing to save; exiting." in output
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())
    assert not (run_dir / "train.lock").exists()


# ----------------------------------------------------------------------------- the config: sentences
CONFIG_REFUSED = [
    (["train.eval_every=0"], "train.eval_every must be at least 1, got 0."),
    (["data.max_documents=-1"], "data.max_documents must be 0 or more, got -1."),
    (["data.workers=-2"], "data.workers must be 0 or more, got -2."),
    (["optim.lr=-0.001"], "optim.lr must be a finite number, 0 or more, got -0.001."),
    (["optim.lr=.nan"], "optim.lr must be a finite number, 0 or more, got nan."),
    (["optim.clip_norm=-1"], "optim.clip_norm must be a finite number, 0 or more, got -1.0."),
    (["data.sources=[{path: stdlib, weight: -1}]"], "data.sources[0].weight must be a positive number, got -1."),
    (["data.sources=[{path: stdlib, weight: heavy}]"], "data.sources[0].weight must be a positive number, got 'heavy'."),
    (["data.sources=[{path: stdlib, weight: 0}]"], "data.sources[0].weight must be a positive number, got 0."),
    (["run_dir=gs://bucket/runs/a"], "run_dir gs://bucket/runs/a is a URL; the trainer reads and writes local (or "
                                     "mounted) folders only: mount the bucket (e.g. with gcsfuse or s3fs) and give "
                                     "the mounted path."),
    (["checkpoint.init_from=s3://bucket/phi-2"], "checkpoint.init_from s3://bucket/phi-2 is a URL;"),
]


@pytest.mark.parametrize("overrides,message", CONFIG_REFUSED)
def test_config_refusals_are_one_sentence(overrides, message):
    with pytest.raises(ConfigError) as error:
        validate(load_run_config(None, overrides), 1)
    assert str(error.value).startswith(message)


def test_a_bucket_run_dir_is_refused_by_the_command_without_a_gs_folder(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "phi2_jax.train", "run_dir=gs://bucket/runs/a"], cwd=tmp_path,
                          env={**train_runs.train_env(1), "PYTHONPATH": str(train_runs.ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: run_dir gs://bucket/runs/a is a URL;")
    assert list(tmp_path.iterdir()) == []  # no folder named gs:


def test_invalid_yaml_is_one_sentence_with_its_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  steps: 10\n  batch_size: [8\nmodel:\n  preset: tiny\n")
    with pytest.raises(ConfigError) as error:
        load_run_config(path)
    assert str(error.value) == (f"{path} is not valid YAML: line 4, column 6: expected ',' or ']', but got ':'.")


def test_a_warmup_as_long_as_the_run_is_shortened_and_said(caplog):
    """`launch/local.sh 2 train.steps=20` keeps the default 20-step warmup: it becomes a tenth of the run."""
    config = load_run_config(None, ["train.steps=20"])
    with caplog.at_level(logging.WARNING):
        validate(config, 1)
    assert config.optim.warmup_steps == 2
    assert "optim.warmup_steps 20 is not below train.steps 20; warming up over 2 steps (a tenth of the run) " \
           "instead" in caplog.text


def test_a_full_disk_during_a_save_is_a_sentence(tmp_path, cache, trained):
    """A file-size limit stands for a full disk: writes fail as they would (EFBIG, not ENOSPC)."""
    run_dir = tmp_path / "run"
    # SIGXFSZ ignored: a failing write, not a killed process; params are ~1.7 MB, everything else smaller.
    limited = ["bash", "-c", "trap '' XFSZ; ulimit -f 976; exec \"$@\"", "bash"]
    proc = subprocess.run(limited + train_runs.command(run_dir, "train.steps=10"), cwd=train_runs.ROOT,
                          env=train_runs.train_env(1, cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: writing a checkpoint (by step 10) to {run_dir.absolute()}/checkpoints failed: the disk is full (or a "
        f"quota or file-size limit was reached); the newest complete checkpoint is none. Free space and run the same "
        f"command again to resume.")
    assert "Event loop is closed" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_a_full_disk_in_a_two_process_job_stops_every_process_with_the_sentence(tmp_path, cache, trained):
    """A pod's full disk: one process's write fails while the other's succeeds, and Orbax's threads then waited at
    different barriers (20 minutes, its timeout); both processes hung. Now the failed process tells the other
    through the coordination service, and both stop within seconds with the sentence."""
    run_dir = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    limited = ["bash", "-c", "trap '' XFSZ; ulimit -f 976; exec \"$@\"", "bash"]
    procs = [subprocess.Popen(limited + train_runs.command(
        run_dir, "train.steps=10", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=1", "distributed.num_processes=2",
        f"distributed.coordinator=127.0.0.1:{port}", f"distributed.process_id={i}"), cwd=train_runs.ROOT,
        env=train_runs.train_env(2, cache), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    sentence = (f"to {run_dir.absolute()}/checkpoints failed: the disk is full (or a quota or file-size limit was "
                f"reached); the newest complete checkpoint is ")
    for p, out in zip(procs, outputs):
        assert p.returncode != 0 and any(line.startswith("error: writing a checkpoint") and sentence in line
                                         for line in out.splitlines()), out[-3000:]
    # The one that exits last may be ended by the coordination service (SIGABRT) once its sentence is out.
    assert 2 in [p.returncode for p in procs], [p.returncode for p in procs]


def test_the_echoes_of_a_failed_save_are_dropped_and_other_reports_kept():
    """Orbax's write tasks that failed beside the reported one are collected at exit, where asyncio logs each with a
    traceback (CI once printed those after the sentence); the command drops them, and keeps every other report."""
    script = textwrap.dedent("""
        import asyncio, errno, gc, logging
        from phi2_jax.training.train_command import quiet_repeated_orbax_reports
        logging.basicConfig()
        quiet_repeated_orbax_reports()
        async def write(error):
            raise error
        async def start():
            for error in (ValueError("OUT_OF_RANGE: Failed writing: File too large [os_error_code='27']"),
                          OSError(errno.ENOSPC, "No space left on device"), KeyError("a real bug")):
                asyncio.get_running_loop().create_task(write(error))
            await asyncio.sleep(0.01)
        loop = asyncio.new_event_loop()
        loop.run_until_complete(start())
        loop.close()
        gc.collect()
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=train_runs.ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("Task exception was never retrieved") == 1, proc.stderr
    assert "KeyError: 'a real bug'" in proc.stderr and "File too large" not in proc.stderr \
        and "No space left" not in proc.stderr, proc.stderr


def test_a_full_disk_while_tokenizing_is_a_sentence_and_leaves_no_partial_token_file(tmp_path):
    """The first run of a corpus writes the token cache: a full disk there is a sentence, and no half file is kept."""
    cache = tmp_path / "cache"
    limited = ["bash", "-c", "trap '' XFSZ; ulimit -f 200; exec \"$@\"", "bash"]  # the tokenizer fits, the tokens do not
    proc = subprocess.run(limited + train_runs.command(tmp_path / "run", "train.steps=2"), cwd=train_runs.ROOT,
                          env=train_runs.train_env(1, cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: writing the tokenized ") and last.endswith(
        f"to {cache / 'tokens'} failed: the disk is full (or a quota or file-size limit was reached); no partial file "
        f"was kept. Free space there and run the same command again."), last
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert list((cache / "tokens").iterdir()) == []


def test_a_renaming_of_fields_is_one_difference_shown_whole():
    """data.fields went from {} to {'prompt': 'question'}: said as 'data.fields {} -> (unset)' before."""
    from phi2_jax.training.resume import describe, fixed_differences

    saved = {"train": {"objective": "sft"}, "data": {"fields": {}}}
    now = {"train": {"objective": "sft"}, "data": {"fields": {"prompt": "question"}}}
    assert describe(fixed_differences(saved, now, {}, {})) == "data.fields {} -> {'prompt': 'question'}"


def test_resume_differences_name_keys_and_ignore_keys_newer_than_the_run():
    from phi2_jax.training.resume import describe, fixed_differences, run_time_differences

    saved = {"optim": {"lr": 0.003}, "train": {"steps": 10, "batch_size": 8}}
    now = {"optim": {"lr": 0.001, "new_knob": 1}, "train": {"steps": 20, "batch_size": 8}}
    fixed = fixed_differences(saved, now, {"num_hidden_layers": 2, "remat": "none"},
                              {"num_hidden_layers": 3, "remat": "full"})
    assert describe(fixed, "there", "here") == "model.num_hidden_layers (2 there, 3 here), optim.lr (0.003 there, " \
                                               "0.001 here)"
    assert describe(run_time_differences(saved, now)) == "train.steps 10 -> 20"


def test_a_resume_may_change_settings_its_objective_does_not_read():
    """validate warns that an LM run does not read dpo.beta or data.fields (a config shared between stages), but
    resuming the run with them changed was refused as a change to what trains the weights."""
    from phi2_jax.training.resume import fixed_differences
    from phi2_jax.training.run_config import RunConfig

    saved, now = RunConfig().to_dict(), RunConfig().to_dict()
    now["dpo"]["beta"], now["data"]["fields"], now["grpo"]["rewards"] = 0.5, {"prompt": "question"}, ["x:y"]
    assert fixed_differences(saved, now, {}, {}) == []
    now["train"]["objective"] = saved["train"]["objective"] = "dpo"  # read by DPO: fixed
    assert [key for key, _, _ in fixed_differences(saved, now, {}, {})] == ["data.fields", "dpo.beta"]
