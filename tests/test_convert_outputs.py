"""The converter's output folders: never deleting what it reads, nothing half-written on a full or unwritable
disk, partial folders of killed runs reclaimed, and the run's tokenizer carried into the export."""

import errno
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from phi2_jax.checkpoint.orbax_stream import ParamWriter
from phi2_jax.errors import UserInputError
from phi2_jax.hf import convert as convert_module
from phi2_jax.hf.convert import main
from phi2_jax.util.atomic_dir import refuse_overlap

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(dialect="5.x", vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, partial_rotary_factor=0.5)


def convert(*args):
    main([str(a) for a in args])


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, byte for byte."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(capsys, args, pattern):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        convert(*args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert re.search(pattern, err), err


def hidden_siblings(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}."))


# ----------------------------------------------------------------------------- --overwrite never deletes a source
def test_a_destination_overlapping_a_source_is_refused_before_anything_is_touched(hf_folder, tmp_path, capsys):
    folder = tmp_path / "work" / "model"
    shutil.copytree(hf_folder("small", **SMALL)[0], folder)
    convert("from-hf", folder, tmp_path / "ckpt")
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (tmp_path / "link").symlink_to(folder)
    before = {p: snapshot(p) for p in (tmp_path / "work", tmp_path / "ckpt", tok)}
    cases = [
        (["from-hf", folder, folder, "--overwrite"], rf"the destination {folder} is {folder}, which this command reads"),
        (["from-hf", folder, tmp_path / "work", "--overwrite"], rf"the destination {tmp_path / 'work'} holds {folder}"),
        (["from-hf", folder, folder / "ckpt"], rf"the destination {folder / 'ckpt'} is inside {folder}"),
        (["from-hf", folder, tmp_path / "link", "--overwrite"], rf"the destination {tmp_path / 'link'} is {folder}"),
        (["to-hf", tmp_path / "ckpt", tmp_path / "ckpt", "--overwrite"], r"the destination .*ckpt is .*ckpt, which"),
        (["to-hf", tmp_path / "ckpt", tmp_path, "--overwrite"], rf"the destination {tmp_path} holds"),
        (["to-hf", tmp_path / "ckpt", tok, "--tokenizer", tok, "--overwrite"], rf"the destination {tok} is {tok}"),
    ]
    for args, pattern in cases:
        refused(capsys, args, pattern + r".*; choose a destination outside it \(--overwrite would delete what is "
                                        r"being read\)\.")
    assert {p: snapshot(p) for p in before} == before
    assert not [p for p in tmp_path.rglob(".*partial*")]


def test_refuse_overlap_is_the_shared_check():
    refuse_overlap("/data/out", ["/data/in", None, "/elsewhere"])
    with pytest.raises(UserInputError, match=r"the destination /data holds /data/in, which this command reads"):
        refuse_overlap("/data", ["/data/in"])


# ----------------------------------------------------------------------------- unwritable or full destinations
def test_an_unwritable_destination_is_one_sentence(hf_folder, tmp_path, capsys):
    folder, _ = hf_folder("small", **SMALL)
    (tmp_path / "file").write_text("a file where a folder is expected")
    refused(capsys, ["from-hf", folder, tmp_path / "file" / "ckpt"],
            rf"could not write {tmp_path / 'file' / 'ckpt'} \(File exists\); choose another destination\. "
            r"Nothing was changed there\.")
    refused(capsys, ["from-hf", folder, "/proc/phi2_jax_test/ckpt"],
            r"could not write /proc/phi2_jax_test/ckpt \(No such file or directory\)")
    try:  # sysfs refuses new folders even to root: the nearest thing to a read-only disk a test can get
        os.mkdir("/sys/phi2_jax_probe")
        os.rmdir("/sys/phi2_jax_probe")
    except OSError as error:
        if error.errno in (errno.EPERM, errno.EROFS, errno.EACCES):
            refused(capsys, ["from-hf", folder, "/sys/phi2_jax_test/ckpt"],
                    r"could not write /sys/phi2_jax_test/ckpt \((Operation not permitted|Read-only file system|"
                    r"Permission denied)\); choose a (writable )?destination( you may write to)?\.")


@pytest.mark.parametrize("command", ["from-hf", "to-hf"])
def test_a_full_disk_mid_conversion_leaves_the_previous_output_and_nothing_else(hf_folder, tmp_path, capsys,
                                                                               monkeypatch, command):
    folder, _ = hf_folder("small", **SMALL)
    convert("from-hf", folder, tmp_path / "ckpt")
    dest = tmp_path / "out"
    if command == "from-hf":
        convert("from-hf", folder, dest)
    else:
        convert("to-hf", tmp_path / "ckpt", dest, "--max-shard-size", "10KB")  # several shards: fails mid-way
    before = snapshot(dest)
    calls = []

    def full(original):
        def write(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return original(*args, **kwargs)
        return write

    if command == "from-hf":
        monkeypatch.setattr(ParamWriter, "write", full(ParamWriter.write))
        command_args = ["from-hf", folder, dest, "--overwrite"]
    else:
        monkeypatch.setattr(convert_module, "write_streaming", full(convert_module.write_streaming))
        command_args = ["to-hf", tmp_path / "ckpt", dest, "--max-shard-size", "10KB", "--overwrite"]
    refused(capsys, command_args, rf"could not write {dest} \(No space left on device\); free some space or choose "
                                  r"another destination\. Nothing was changed there\.")
    assert len(calls) == 3 and snapshot(dest) == before and hidden_siblings(dest) == []


def test_a_file_size_limit_inside_tensorstore_is_one_sentence(hf_folder, tmp_path):
    """A real failing write (RLIMIT_FSIZE: EFBIG, even for root) deep in tensorstore, in a child process."""
    folder, _ = hf_folder("small", **SMALL)
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (5000, 5000)); "
            "from phi2_jax.hf.convert import main; main(sys.argv[1:])")
    dest = tmp_path / "ckpt"
    proc = subprocess.run([sys.executable, "-c", code, "from-hf", str(folder), str(dest)], cwd=ROOT,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: could not write {dest} (File too large); choose a destination that allows files this large. "
        f"Nothing was changed there."), proc.stderr
    assert not dest.exists() and hidden_siblings(dest) == []


# ----------------------------------------------------------------------------- partial folders of killed runs
def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_stale_partials_of_dead_processes_are_reclaimed_with_a_line(hf_folder, tmp_path, capsys):
    folder, _ = hf_folder("small", **SMALL)
    dest = tmp_path / "ckpt"
    host, dead = socket.gethostname(), _dead_pid()
    planted = {
        f".ckpt.partial-{dead}@{host}": True,      # a killed conversion: reclaimed
        f".ckpt.partial-{dead}": True,             # the name before hosts were recorded: reclaimed
        f".ckpt.partial-{os.getppid()}@{host}": False,  # a live process (the one that started pytest): kept
        f".ckpt.partial-{dead}@another-host": False,   # maybe alive elsewhere on a shared disk: kept
        f".other.partial-{dead}@{host}": False,    # beside another destination: not ours to judge
    }
    for name in planted:
        (tmp_path / name / "params").mkdir(parents=True)
        (tmp_path / name / "params" / "blob").write_bytes(b"\0" * 1_500_000)
    capsys.readouterr()
    convert("from-hf", folder, dest)
    err = capsys.readouterr().err
    for name, reclaimed in planted.items():
        assert (tmp_path / name).exists() != reclaimed, name
        line = (f"removed {name} (1.5 MB), a partial output left beside ckpt by process {dead}, which is no longer "
                f"running.")
        assert (line in err) == reclaimed, err
    assert (dest / "params").is_dir()


def test_an_output_set_aside_by_a_killed_overwrite_is_restored(hf_folder, tmp_path, capsys):
    folder, _ = hf_folder("small", **SMALL)
    dest = tmp_path / "ckpt"
    convert("from-hf", folder, dest)
    before = snapshot(dest)
    dead = _dead_pid()
    aside = tmp_path / f".ckpt.old-{dead}@{socket.gethostname()}"
    dest.rename(aside)  # killed between setting the old output aside and moving the new one in
    capsys.readouterr()
    with pytest.raises(SystemExit):  # not empty once restored: the user must still say --overwrite
        convert("from-hf", folder, dest)
    err = capsys.readouterr().err
    assert f"restored {dest} from {aside.name}, set aside by process {dead}, which died before replacing it." in err
    assert snapshot(dest) == before and not aside.exists()


def test_a_conversion_killed_by_sigkill_is_reclaimed_by_the_next_run(hf_folder, tmp_path, capsys):
    folder, _ = hf_folder("small", **SMALL)
    dest, flag = tmp_path / "ckpt", tmp_path / "started"
    # The child stops after its first tensor, so the kill lands mid-conversion every time.
    code = ("import sys, time; from pathlib import Path; from phi2_jax.checkpoint.orbax_stream import ParamWriter; "
            "original = ParamWriter.write\n"
            "def write(self, *a):\n    original(self, *a); Path(sys.argv[1]).touch(); time.sleep(600)\n"
            "ParamWriter.write = write\nfrom phi2_jax.hf.convert import main; main(sys.argv[2:])")
    child = subprocess.Popen([sys.executable, "-c", code, str(flag), "from-hf", str(folder), str(dest)], cwd=ROOT,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not flag.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert flag.exists(), "the child never wrote its first tensor"
    child.send_signal(signal.SIGKILL)
    child.wait()
    left = hidden_siblings(dest)
    assert left == [f".ckpt.partial-{child.pid}@{socket.gethostname()}"] and not dest.exists()
    capsys.readouterr()
    convert("from-hf", folder, dest)
    err = capsys.readouterr().err
    assert re.search(rf"removed {re.escape(left[0])} \(\d+\.\d MB\), a partial output left beside ckpt by process "
                     rf"{child.pid}, which is no longer running\.", err), err
    assert hidden_siblings(dest) == [] and (dest / "params").is_dir()
