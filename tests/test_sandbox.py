"""The code sandbox against hostile programs: each escape fails with its reason, and the evaluator lives on.

Each hostile program exits 0 only if its escape worked, so `passed` would mean
the sandbox leaked. Leftover processes are found by the program's working
directory, which every process it starts carries in its command line or cwd.
"""

import math
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest

from phi2_jax import UserInputError
from phi2_jax.evaluation.sandbox import Limits, namespace_support, run_program, run_programs

ISOLATED, WHY_NOT = namespace_support()
needs_namespaces = pytest.mark.skipif(not ISOLATED, reason=f"namespaces do not work here: {WHY_NOT}")
MODES = [pytest.param("auto", marks=needs_namespaces, id="namespaces"), pytest.param("none", id="no-namespaces")]
SLOW_OK = 30.0  # a generous wall clock for programs that should end by themselves on a loaded machine


def leftovers(marker: str) -> list[int]:
    """Pids of live processes whose command line or working directory contains `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            cwd = os.readlink(f"/proc/{entry}/cwd") if os.path.exists(f"/proc/{entry}/cwd") else ""
        except OSError:
            continue
        if state != "Z" and (marker in cmdline or marker in cwd):
            found.append(int(entry))
    return found


def workdir_of(result) -> str:
    line = next(line for line in result.output.splitlines() if line.startswith("cwd "))
    return line.split(" ", 1)[1]


def test_a_correct_program_passes_and_a_wrong_one_fails_with_its_output():
    ok = run_program("print('hello')\n", Limits(seconds=SLOW_OK))
    assert (ok.passed, ok.status, ok.output) == (True, "passed", "hello\n")
    wrong = run_program("assert 1 + 1 == 3, 'arithmetic'\n", Limits(seconds=SLOW_OK))
    assert (wrong.passed, wrong.status) == (False, "failed")
    assert wrong.output.strip().endswith("AssertionError: arithmetic")
    assert ok.isolated == wrong.isolated == ISOLATED


@pytest.mark.parametrize("isolation", MODES)
def test_an_endless_loop_is_a_timeout(isolation):
    start = time.monotonic()
    result = run_program("while True:\n    pass\n", Limits(seconds=2, isolation=isolation))
    assert (result.passed, result.status) == (False, "timeout")
    assert 2.0 <= time.monotonic() - start < 10.0


@pytest.mark.parametrize("isolation", MODES)
def test_a_memory_bomb_is_memory(isolation):
    result = run_program("x = bytearray(8 * 1024 ** 3)\n", Limits(seconds=SLOW_OK, memory_bytes=512 << 20,
                                                                    isolation=isolation))
    assert (result.passed, result.status) == (False, "memory")


def test_cpu_time_is_limited_per_process():
    result = run_program("while True:\n    pass\n", Limits(seconds=SLOW_OK, cpu_seconds=1))
    assert (result.passed, result.status) == (False, "cpu_time")


@pytest.mark.parametrize("isolation", MODES)
def test_a_file_past_the_size_limit_is_refused(isolation):
    result = run_program("open('big', 'wb').write(b'x' * (2 << 20))\n",
                         Limits(seconds=SLOW_OK, file_bytes=1 << 20, isolation=isolation))
    assert (result.passed, result.status) == (False, "file_size")
    assert "OSError: [Errno 27] File too large" in result.output


@needs_namespaces
def test_many_files_cannot_fill_the_disk():
    source = "for n in range(64):\n    open(f'part{n}', 'wb').write(b'x' * (1 << 20))\n"
    result = run_program(source, Limits(seconds=SLOW_OK, file_bytes=1 << 20, disk_bytes=4 << 20))
    assert (result.passed, result.status) == (False, "disk_full")
    assert "OSError: [Errno 28] No space left on device" in result.output


def test_a_thread_bomb_is_refused_too():
    source = "import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
    result = run_program(source, Limits(seconds=SLOW_OK, processes=8))
    assert (result.passed, result.status) == (False, "processes")
    assert "RuntimeError: can't start new thread" in result.output


@pytest.mark.parametrize("isolation", MODES)
def test_an_output_flood_is_cut_at_the_cap(isolation):
    start = time.monotonic()
    result = run_program("while True:\n    print('x' * 1000)\n",
                         Limits(seconds=SLOW_OK, output_bytes=100_000, isolation=isolation))
    assert (result.passed, result.status) == (False, "output_limit")
    assert len(result.output) == 2000 and set(result.output) <= {"x", "\n"}
    assert time.monotonic() - start < SLOW_OK / 2  # stopped at the cap, not at the time limit


@pytest.mark.parametrize("isolation", MODES)
def test_a_fork_bomb_is_contained_and_leaves_nothing(isolation):
    source = "import os\nprint('cwd', os.getcwd(), flush=True)\nwhile True:\n    os.fork()\n"
    result = run_program(source, Limits(seconds=SLOW_OK, processes=8, isolation=isolation))
    assert (result.passed, result.status) == (False, "processes")
    assert "BlockingIOError: [Errno 11] Resource temporarily unavailable" in result.output
    assert leftovers(workdir_of(result)) == []


@pytest.mark.parametrize("isolation", MODES)
def test_a_detached_grandchild_is_killed_when_the_program_ends(isolation):
    source = ("import os, sys\nprint('cwd', os.getcwd(), flush=True)\n"
              "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
              "        os.execv('/bin/sleep', ['sleep', '600'])\n    os._exit(0)\n")
    start = time.monotonic()
    result = run_program(source, Limits(seconds=SLOW_OK, isolation=isolation))
    assert result.status == "passed"  # the program itself did nothing wrong
    assert time.monotonic() - start < SLOW_OK / 2  # the sleeper held neither its output pipe nor us
    assert leftovers(workdir_of(result)) == []


@pytest.mark.parametrize("isolation", MODES)
def test_killing_the_parent_or_the_evaluator_does_not_kill_the_evaluator(isolation):
    source = (f"import os, signal\nfor pid in (os.getppid(), {os.getpid()}):\n"
              "    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError as e:\n        print(pid, e)\n"
              "import sys\nsys.exit(1)\n")
    result = run_program(source, Limits(seconds=SLOW_OK, isolation=isolation))
    assert not result.passed
    # With namespaces the parent is the namespace's init, which ignores it, and our pid is not there;
    # without, the launcher (its parent) dies, which scores the program as killed.
    assert result.status == ("failed" if isolation == "auto" else "killed")
    os.kill(os.getpid(), 0)  # still here


@needs_namespaces
def test_the_evaluators_environment_is_not_readable(monkeypatch):
    monkeypatch.setenv("PHI2_SANDBOX_TEST_SECRET", "sk-not-a-real-key-31337")
    source = ("import os, sys\nseen = str(dict(os.environ))\n"
              "for pid in os.listdir('/proc'):\n    try:\n"
              "        seen += open(f'/proc/{pid}/environ', 'rb').read().decode(errors='replace')\n"
              "    except OSError:\n        pass\n"
              "print(seen)\nsys.exit(0 if 'sk-not-a-real-key' in seen else 1)\n")
    result = run_program(source, Limits(seconds=SLOW_OK))
    assert (result.passed, result.status) == (False, "failed")
    assert "sk-not-a-real-key" not in result.output and "PATH=/usr/bin:/bin" in result.output
    assert os.environ["PHI2_SANDBOX_TEST_SECRET"] == "sk-not-a-real-key-31337"


@needs_namespaces
def test_the_evaluators_processes_are_invisible():
    result = run_program("import os\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n",
                         Limits(seconds=SLOW_OK))
    assert result.passed and result.output.strip() == "[1, 2]"  # the launcher and the program


@pytest.fixture
def open_dir():
    """A folder anyone may write to, under /tmp (so that every folder above it is reachable too)."""
    path = tempfile.mkdtemp(prefix="phi2_jax_canary_", dir="/tmp")
    os.chmod(path, 0o777)
    yield Path(path)
    shutil.rmtree(path)


@needs_namespaces
def test_nothing_is_written_outside_the_working_directory(open_dir):
    canary = open_dir / "canary.txt"  # only the sandbox's read-only mounts stand in the way
    source = (f"import os, sys\nopen('inside.txt', 'w').write('fine')\n"
              f"try:\n    open({str(canary)!r}, 'w').write('escaped')\nexcept OSError as e:\n    print(e)\n"
              f"    sys.exit(1)\n")
    result = run_program(source, Limits(seconds=SLOW_OK))
    assert (result.passed, result.status) == (False, "failed")
    assert result.output == f"[Errno 30] Read-only file system: {str(canary)!r}\n"
    assert not canary.exists() and os.listdir(open_dir) == []


@needs_namespaces
def test_there_is_no_network_not_even_the_hosts_localhost():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        port = server.getsockname()[1]
        source = (f"import socket, sys\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=5)\n"
                  f"except OSError as e:\n    print(e)\n    sys.exit(1)\n")
        result = run_program(source, Limits(seconds=SLOW_OK))
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody came
    assert (result.passed, result.status) == (False, "failed")


def test_a_batch_runs_concurrently_within_the_bound_and_keeps_its_order():
    sources = [f"import time\ntime.sleep(1.5)\nprint({n})\n" for n in range(6)]
    start = time.monotonic()
    results = run_programs(sources, Limits(seconds=SLOW_OK), max_workers=3)
    elapsed = time.monotonic() - start
    assert [r.output.strip() for r in results] == [str(n) for n in range(6)]
    assert all(r.passed for r in results)
    assert 3.0 <= elapsed < 8.0  # two rounds of three; one at a time would take 9 s


@pytest.mark.parametrize("seconds", [0, -1.0, math.nan, math.inf])
def test_bad_limits_get_one_sentence(seconds):
    with pytest.raises(UserInputError) as error:
        Limits(seconds=seconds)
    assert str(error.value) == f"sandbox time limit must be a positive number of seconds, got {seconds}."


def test_bad_limit_values_and_isolation_get_one_sentence(monkeypatch):
    with pytest.raises(UserInputError, match=r"^sandbox limit processes must be a positive integer, got 0\.$"):
        Limits(processes=0)
    with pytest.raises(UserInputError, match=r"^sandbox isolation 'docker' is not one of auto, namespaces, none\.$"):
        Limits(isolation="docker")
    with pytest.raises(UserInputError, match=r"^max_workers must be at least 1, got 0\.$"):
        run_programs(["pass"], max_workers=0)
    import phi2_jax.evaluation.sandbox as sandbox
    monkeypatch.setattr(sandbox, "namespace_support", lambda: (False, "no util-linux unshare"))
    with pytest.raises(UserInputError) as error:
        run_program("pass", Limits(isolation="namespaces"))
    assert str(error.value) == ("sandbox isolation 'namespaces' was asked for but does not work here "
                                "(no util-linux unshare).")
