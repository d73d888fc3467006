"""Running model-written code: a separate process with a time limit, resource limits and no inherited secrets.

The program runs as `python -I` (isolated: no user site, no PYTHON* variables)
in a fresh temporary directory, with an environment that holds only PATH and
LANG, limits on CPU time, address space, file size and open files, in its own
process group so that a timeout kills everything it started. This contains
mistakes and runaway loops; it is not a security boundary against a hostile
program (use a container or VM for that).
"""

from __future__ import annotations

import dataclasses
import os
import resource
import signal
import subprocess
import sys
import tempfile


@dataclasses.dataclass(frozen=True)
class Limits:
    seconds: float = 10.0           # wall clock
    memory_bytes: int = 1 << 30     # address space
    file_bytes: int = 16 << 20      # largest file it may write
    open_files: int = 64


@dataclasses.dataclass(frozen=True)
class RunResult:
    passed: bool
    status: str        # 'passed', 'failed', 'timeout', 'memory' or 'crashed'
    output: str


def _apply_limits(limits: Limits):
    def preexec():
        cpu = int(limits.seconds) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return preexec


def run_program(source: str, limits: Limits = Limits()) -> RunResult:
    """Runs `source` as a Python program; passed means exit status 0 within the limits."""
    with tempfile.TemporaryDirectory(prefix="phi2_jax_sandbox_") as workdir:
        path = os.path.join(workdir, "program.py")
        with open(path, "w") as f:
            f.write(source)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        proc = subprocess.Popen([sys.executable, "-I", "-B", path], cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_apply_limits(limits))
        try:
            output, _ = proc.communicate(timeout=limits.seconds)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            return RunResult(False, "timeout", output.decode(errors="replace")[-2000:])
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # anything it left running
            except ProcessLookupError:
                pass
    text = output.decode(errors="replace")[-2000:]
    if proc.returncode == 0:
        return RunResult(True, "passed", text)
    if "MemoryError" in text or proc.returncode == -signal.SIGKILL:
        return RunResult(False, "memory", text)
    if proc.returncode == -signal.SIGXCPU:
        return RunResult(False, "timeout", text)
    return RunResult(False, "failed" if proc.returncode > 0 else "crashed", text)
