"""Commands' allocator settings: the converter's huge-page re-exec, and the others' reuse of freed memory."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from phi2_jax.util.host_memory import _transparent_huge_pages_available

SCRIPT = ("import os, sys; from phi2_jax.util.host_memory import reexec_with_huge_pages; reexec_with_huge_pages(); "
          "print(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])")


def run(extra_env):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "PHI2_JAX_KEEP_MALLOC")}
    out = subprocess.run([sys.executable, "-c", SCRIPT, "--flag", "x y"], env={**env, **extra_env},
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(sys.platform != "linux" or not _transparent_huge_pages_available(),
                    reason="needs Linux with transparent huge pages")
def test_reexec_sets_the_tunable_once_keeps_arguments_and_can_be_turned_off():
    assert run({}) == "glibc.malloc.hugetlb=1 ['--flag', 'x y']"
    assert run({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == \
        "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1 ['--flag', 'x y']"
    assert run({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) == "glibc.malloc.hugetlb=0 ['--flag', 'x y']"
    assert run({"PHI2_JAX_KEEP_MALLOC": "1"}) == "None ['--flag', 'x y']"


REUSE_SCRIPT = """
import ctypes, resource, sys
from phi2_jax.util.host_memory import keep_freed_memory
applied = keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 256 * 2**20
def fill_and_free():
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
fill_and_free()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
fill_and_free()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator")
def test_freed_memory_is_reused_without_page_faults_and_the_opt_out_restores_the_default():
    def second_fill(extra_env):
        env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "PHI2_JAX_KEEP_MALLOC")}
        out = subprocess.run([sys.executable, "-c", REUSE_SCRIPT], env={**env, **extra_env},
                             capture_output=True, text=True, check=True).stdout.split()
        return out[0] == "True", int(out[1])

    applied, faults = second_fill({})
    assert applied and faults < 100  # the 256 MB block came back from the heap, already mapped
    applied, faults = second_fill({"PHI2_JAX_KEEP_MALLOC": "1"})
    assert not applied
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[always]" not in thp.read_text():
        assert faults > 256 * 2**20 // 4096 // 2  # a fresh mmap, faulted in 4 KB pages again
