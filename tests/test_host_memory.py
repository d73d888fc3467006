"""Entry points re-run themselves once with glibc's huge-page tunable, keeping what the user set."""

import os
import subprocess
import sys

import pytest

from phi2_jax.host_memory import _transparent_huge_pages_available

SCRIPT = ("import os, sys; from phi2_jax.host_memory import reexec_with_huge_pages; reexec_with_huge_pages(); "
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
