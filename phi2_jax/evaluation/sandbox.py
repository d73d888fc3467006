"""Running model-written code: one process tree per program, confined, limited, killed whole, scored with a reason.

Each program runs as `python -I -B program.py` in a fresh temporary directory
with a fixed environment (PATH, LANG, TMPDIR: nothing inherited), in a new
session, under limits on CPU time, address space, file size, open files and
processes, with its output read up to a cap. Where Linux namespaces work
(`unshare` from util-linux; probed once per process) it also gets:

- its own user namespace, as an unprivileged user (nobody when the evaluator is
  root, whom RLIMIT_NPROC would not bind; the evaluator's own user otherwise);
- its own pid namespace with a fresh /proc: the evaluator's processes (and
  their environ) are invisible, kill(getppid()) reaches nothing, and the whole
  tree dies with the sandbox's first process;
- its own network namespace: no network at all, not even the host's localhost;
- its own mount namespace in which every mount is read-only and the working
  directory a fresh tmpfs of `disk_bytes`, capabilities dropped so that this
  cannot be undone.

Without namespaces (`isolation='none'`, or when the probe fails) a root
evaluator still runs programs as nobody, and a subreaper kills what the program
leaves behind; the README says what that does NOT stop.

`run_programs` runs a batch concurrently with a bound (for RL trainers).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from phi2_jax.errors import UserInputError

_LAUNCHER = (Path(__file__).parent / "sandbox_launcher.py").read_text()
NOBODY = 65534
ISOLATIONS = ("auto", "namespaces", "none")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one program may use. cpu_seconds None: the wall-clock limit rounded up, plus one."""

    seconds: float = 10.0              # wall clock, the whole process tree
    cpu_seconds: int | None = None     # per process (RLIMIT_CPU)
    memory_bytes: int = 1 << 30        # address space per process
    file_bytes: int = 16 << 20         # largest file it may write
    open_files: int = 64
    processes: int = 16                # tasks (processes and threads) at once, RLIMIT_NPROC
    output_bytes: int = 1 << 20        # stdout + stderr kept; the program is stopped past it
    disk_bytes: int = 64 << 20         # all files together (with namespaces: a tmpfs of this size)
    isolation: str = "auto"            # 'auto' (namespaces where they work), 'namespaces' or 'none'
    python: str | None = None          # the interpreter; None: `default_python()`

    def __post_init__(self):
        if not (isinstance(self.seconds, (int, float)) and math.isfinite(self.seconds) and self.seconds > 0):
            raise UserInputError(f"sandbox time limit must be a positive number of seconds, got {self.seconds}.")
        for name in ("memory_bytes", "file_bytes", "open_files", "processes", "output_bytes", "disk_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserInputError(f"sandbox limit {name} must be a positive integer, got {value!r}.")
        if self.cpu_seconds is not None and (not isinstance(self.cpu_seconds, int) or self.cpu_seconds < 1):
            raise UserInputError(f"sandbox limit cpu_seconds must be a positive integer, got {self.cpu_seconds!r}.")
        if self.isolation not in ISOLATIONS:
            raise UserInputError(f"sandbox isolation {self.isolation!r} is not one of {', '.join(ISOLATIONS)}.")


@dataclasses.dataclass(frozen=True)
class RunResult:
    passed: bool
    # 'passed'; or why not: 'failed' (non-zero exit), 'timeout' (wall clock), 'cpu_time', 'memory',
    # 'processes' (a fork or thread refused), 'file_size', 'disk_full', 'output_limit', 'killed' (by a
    # signal, or the sandbox's first process killed), 'crashed' (SIGSEGV and kin), 'sandbox_error' (the
    # sandbox could not be set up)
    status: str
    output: str        # the last 2000 characters kept of stdout + stderr
    isolated: bool     # ran in namespaces
    seconds: float     # wall clock


_CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGFPE, signal.SIGILL}


def run_program(source: str, limits: Limits = Limits()) -> RunResult:
    """Runs `source` as a Python program; passed means exit status 0 within every limit."""
    return _run(source, limits, _use_namespaces(limits.isolation))


def _run(source: str, limits: Limits, isolated: bool) -> RunResult:
    start = time.monotonic()
    root = os.geteuid() == 0
    with tempfile.TemporaryDirectory(prefix="phi2_jax_sandbox_", ignore_cleanup_errors=True) as workdir:
        path = os.path.join(workdir, "program.py")
        with open(path, "w") as f:
            f.write(source)
        if root:  # the program runs as nobody and owns its directory, nothing else
            os.chmod(path, 0o644)
            os.chown(workdir, NOBODY, NOBODY)
        python = limits.python or default_python()
        status_read, status_write = os.pipe()
        cpu = limits.cpu_seconds or int(limits.seconds) + 1
        command = [*(_namespace_prefix(root) if isolated else []),
                   python, "-I", "-B", "-c", _LAUNCHER, str(status_write),
                   "namespaces" if isolated else "none", workdir, str(cpu), str(limits.memory_bytes),
                   str(limits.file_bytes), str(limits.open_files), str(limits.processes), str(limits.disk_bytes),
                   python, path]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "TMPDIR": workdir}
        try:
            proc = subprocess.Popen(command, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True, pass_fds=(status_write,))
        finally:
            os.close(status_write)
        try:
            output, report, stopped = _collect(proc, status_read, limits, start + limits.seconds, isolated)
        finally:
            os.close(status_read)
            _kill_group(proc)
            proc.wait()
    text = output.decode(errors="replace")[-2000:]
    status = _status(stopped, report, text)
    if status == "sandbox_error":
        text += f"\nsandbox: {report.strip()}"
    return RunResult(status == "passed", status, text, isolated, time.monotonic() - start)


def run_programs(sources: Sequence[str], limits: Limits = Limits(), max_workers: int | None = None) -> list[RunResult]:
    """`run_program` for each source, at most `max_workers` at once (default: the CPU count, at most 8), in order."""
    if max_workers is not None and max_workers < 1:
        raise UserInputError(f"max_workers must be at least 1, got {max_workers}.")
    _use_namespaces(limits.isolation)  # probe once, before the threads
    workers = max_workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers, thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda source: run_program(source, limits), sources))


def _collect(proc, status_read: int, limits: Limits, deadline: float, isolated: bool) -> tuple[bytes, str, str | None]:
    """(output, the launcher's report, 'timeout' / 'output_limit' if we stopped the program) once the launcher ends.

    The end is the status pipe's EOF, not stdout's: a detached descendant holding
    stdout must not hold the evaluator.
    """
    out = proc.stdout.fileno()
    os.set_blocking(out, False)
    output, report, stopped = bytearray(), b"", None
    with selectors.DefaultSelector() as selector:
        selector.register(out, selectors.EVENT_READ)
        selector.register(status_read, selectors.EVENT_READ)
        while stopped is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                stopped = "timeout"
                break
            ended = False
            for key, _ in selector.select(remaining):
                data = os.read(key.fd, 1 << 16)
                if key.fd == status_read:
                    report += data
                    ended = not data
                elif not data:
                    selector.unregister(out)
                else:
                    output += data
                    if len(output) > limits.output_bytes:
                        stopped = "output_limit"
            if ended:
                break
        if stopped is None:  # what the program wrote just before it ended
            try:
                while len(output) <= limits.output_bytes and (data := os.read(out, 1 << 16)):
                    output += data
            except BlockingIOError:
                pass
        else:
            _stop(proc, isolated)
    return bytes(output[:limits.output_bytes]), report.decode(errors="replace"), stopped


def _stop(proc, isolated: bool) -> None:
    """Ends the program at a limit. With namespaces SIGKILL to the group does it: unshare's death kills the
    namespace's first process and with it the namespace. Without them the launcher gets SIGTERM first, to kill
    the descendants it adopted (which left the group), and up to 2 s for that."""
    if not isolated:
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            return
        end = time.monotonic() + 2.0
        while time.monotonic() < end and proc.poll() is None:
            time.sleep(0.01)
    _kill_group(proc)


def _kill_group(proc) -> None:
    # Before proc.wait(): until it is reaped its pid (the group's id) cannot be reused.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _status(stopped: str | None, report: str, text: str) -> str:
    if stopped:
        return stopped
    lines = report.split()
    if len(lines) < 2:
        return "killed"  # the launcher itself died without a word
    kind, value = lines[0], " ".join(lines[1:])
    if kind == "setup":
        return "sandbox_error"
    number = int(value) if value.lstrip("-").isdigit() else -1
    if kind == "exit":
        if number == 0:
            return "passed"
        if "MemoryError" in text:
            return "memory"
        if "BlockingIOError: [Errno 11]" in text or "can't start new thread" in text:  # refused by RLIMIT_NPROC
            return "processes"
        if "[Errno 27] File too large" in text:
            return "file_size"
        if "[Errno 28] No space left on device" in text:
            return "disk_full"
        return "failed"
    if number == signal.SIGXCPU:
        return "cpu_time"
    if number == signal.SIGXFSZ:
        return "file_size"
    return "crashed" if number in _CRASH_SIGNALS else "killed"


@functools.cache
def default_python() -> str:
    """This interpreter, unless we are root and nobody (whom programs run as) cannot run it: then a system python3."""
    if os.geteuid() != 0:
        return sys.executable
    own = (sys.executable, os.path.join(sys.base_prefix, "lib"))
    if all(_others_can_read(p) for p in own):
        return sys.executable
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if _others_can_read(candidate):
            return candidate
    return sys.executable  # the trial run or the program's own start will say what is wrong


def _others_can_read(path: str) -> bool:
    """Whether a user with no relation to the owners can reach and read/run `path` (symlinks followed)."""
    path = os.path.realpath(path)
    try:
        if not os.stat(path).st_mode & stat.S_IROTH:
            return False
        parents = Path(path).parents
        return all(os.stat(d).st_mode & stat.S_IXOTH for d in parents)
    except OSError:
        return False


def _namespace_prefix(root: bool) -> list[str]:
    # A root evaluator first becomes nobody, whom the namespace's root then is outside it: RLIMIT_NPROC binds
    # (tasks of uid 0 are exempt from it) and file permissions keep it out of root's files. (unshare's own
    # --map-users would need newuidmap.) Otherwise the user's own id is the namespace's root.
    drop = [shutil.which("setpriv") or "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
    return [*(drop if root else []), shutil.which("unshare") or "unshare", "--map-root-user", "--net", "--pid",
            "--ipc", "--uts", "--mount", "--fork", "--kill-child", "--mount-proc", "--"]


def _use_namespaces(isolation: str) -> bool:
    if isolation == "none":
        return False
    works, reason = namespace_support()
    if isolation == "namespaces" and not works:
        raise UserInputError(f"sandbox isolation 'namespaces' was asked for but does not work here ({reason}).")
    return works


@functools.cache
def namespace_support() -> tuple[bool, str]:
    """(whether namespace isolation works on this machine, why not): a trial program run in it, once per process."""
    tools = ["unshare", "setpriv"] if os.geteuid() == 0 else ["unshare"]
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if not sys.platform.startswith("linux") or missing:
        return False, f"no util-linux {' or '.join(missing) or 'on this platform'}"
    # Passes only inside a pid namespace, where the launcher is pid 1 and the program pid 2.
    result = _run("import os, sys\nsys.exit(0 if os.getpid() == 2 else 3)\n", Limits(seconds=30), isolated=True)
    if result.passed:
        return True, ""
    last = result.output.strip().splitlines()[-1] if result.output.strip() else "no output"
    return False, f"{result.status}: {last}"
