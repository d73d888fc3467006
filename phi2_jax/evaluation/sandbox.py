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


# Limits are set by the child itself before it runs the program: a `preexec_fn` would run Python
# between fork and exec, which can deadlock in a multithreaded parent (JAX's runtime is one).
_LAUNCHER = """
import resource, runpy, sys
seconds, memory, files, nofile = (int(v) for v in sys.argv[1:5])
for limit, value in ((resource.RLIMIT_CPU, seconds), (resource.RLIMIT_AS, memory),
                     (resource.RLIMIT_FSIZE, files), (resource.RLIMIT_NOFILE, nofile), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
sys.argv = sys.argv[5:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_program(source: str, limits: Limits = Limits()) -> RunResult:
    """Runs `source` as a Python program; passed means exit status 0 within the limits."""
    with tempfile.TemporaryDirectory(prefix="phi2_jax_sandbox_") as workdir:
        path = os.path.join(workdir, "program.py")
        with open(path, "w") as f:
            f.write(source)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        command = [sys.executable, "-I", "-B", "-c", _LAUNCHER, str(int(limits.seconds) + 1), str(limits.memory_bytes),
                   str(limits.file_bytes), str(limits.open_files), path]
        proc = subprocess.Popen(command, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
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
