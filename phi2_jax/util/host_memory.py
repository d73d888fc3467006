"""How the commands' host allocator gets and returns memory (glibc), set once at their start.

XLA:CPU allocates a program's temporaries afresh at every execution, and
glibc serves each block above 32 MB with a new `mmap` and unmaps it on free,
so every training step (and every `generate` call) faults its temporaries
back in, 4 KB at a time, and spends kernel time doing it.

* `keep_freed_memory()` (train, and `bench train`, which measures what train
  runs): all threads share one arena served from the heap, never by `mmap`,
  and freed memory is kept for reuse instead of being trimmed. The faults go
  to zero and the training step gets faster, at the price of a resident size
  that stays at the process's peak (what a caching allocator does). Set at run
  time with `mallopt`, before XLA's threads start. Not for decoding: XLA's
  runtime mallocs small objects for each of a decoding step's many small ops,
  and one shared arena slows them (the one-arena setting alone; separate
  arenas cannot keep the large blocks).
* `reexec_with_huge_pages()` (convert): the converter moves a model through
  freshly allocated tensor buffers (mapped safetensors, tensorstore chunks,
  safetensors row blocks); glibc's `glibc.malloc.hugetlb=1` tunable asks for
  transparent huge pages on them (512x fewer faults), which speeds both
  directions up. Tunables are read once at process start, so the command
  execs itself again with it set.

Measured: docs/benchmarks.md, "Host allocator".

Both were measured on XLA:CPU only, so the commands apply them only when the platform JAX will
run on is the CPU (`platform_before_jax_starts`): a GPU host's allocator is left as it is.
Set PHI2_JAX_KEEP_MALLOC=1 to opt out of both. Library code never calls these.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

TUNABLE = "glibc.malloc.hugetlb=1"
_GPU_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")


def platform_before_jax_starts() -> str:
    """The platform JAX will pick ('cpu', 'cuda', 'rocm', 'tpu', ...), judged without starting JAX.

    JAX_PLATFORMS when set (its first entry); otherwise an installed GPU plugin with a
    GPU device node present, or an installed libtpu; otherwise the CPU.
    """
    requested = os.environ.get("JAX_PLATFORMS", "").split(",")[0].strip().lower()
    if requested:
        return requested
    gpu_present = Path("/dev/nvidia0").exists() or Path("/dev/kfd").exists()
    for plugin in _GPU_PLUGINS:
        if gpu_present and importlib.util.find_spec(plugin) is not None:
            return "rocm" if "rocm" in plugin else "cuda"
    if importlib.util.find_spec("libtpu") is not None:
        return "tpu"
    return "cpu"


def keep_freed_memory_on_cpu(command: str) -> None:
    """`keep_freed_memory()` where the platform is the CPU, and a log line saying what was decided."""
    platform = platform_before_jax_starts()
    if platform != "cpu":
        log.info("%s: host allocator left as is (platform %s; its tuning was measured on XLA:CPU)", command, platform)
    elif keep_freed_memory():
        log.info("%s: host allocator keeps freed memory (platform cpu)", command)
OPT_OUT = "PHI2_JAX_KEEP_MALLOC"


def _glibc_and_not_opted_out() -> bool:
    return sys.platform == "linux" and not os.environ.get(OPT_OUT) and bool(os.confstr("CS_GNU_LIBC_VERSION"))


def _transparent_huge_pages_available() -> bool:
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[never]" not in mode


def reexec_with_huge_pages() -> None:
    """Re-executes this command with glibc's huge-page tunable set, once; a no-op where it does not apply.

    Call it first thing under `if __name__ == "__main__":`, never from library code.
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if not _glibc_and_not_opted_out() or "glibc.malloc.hugetlb" in tunables or not _transparent_huge_pages_available():
        return
    env = {**os.environ, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}" if tunables else TUNABLE, OPT_OUT: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_freed_memory() -> bool:
    """Makes glibc keep freed memory for reuse (one arena, no mmap, no trimming); returns whether it applied.

    Call it first thing in a command's main, before JAX starts its threads; a
    no-op off glibc or with PHI2_JAX_KEEP_MALLOC set.
    """
    if not _glibc_and_not_opted_out():
        return False
    libc = ctypes.CDLL(None)
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
    return all(libc.mallopt(option, value) == 1 for option, value in settings)
