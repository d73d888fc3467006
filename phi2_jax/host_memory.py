"""Huge pages for the host allocator: the train, convert and bench commands re-run themselves with them on.

XLA:CPU allocates each step's temporaries and outputs afresh, and glibc serves
every block above 32 MB with a new `mmap`, so each training step faults in
hundreds of megabytes of new 4 KB pages (~210k faults per gradient step of the
bench model, 0.6 s of kernel time on a 2-core machine); the converter's
tensor buffers do the same. glibc's `glibc.malloc.hugetlb=1` tunable asks for
transparent huge pages on those blocks instead (512x fewer faults, fewer TLB
misses). Measured on the dev VM, two runs each: the bench model's training
step 2.82 / 2.54 -> 2.19 / 2.32 s, from-hf of phi-2 34.0 / 34.0 -> 21.7 / 21.6 s.
Tunables are read once at process start, so the only way to turn it on from
Python is to exec the same command again with it set. Set
PHI2_JAX_KEEP_MALLOC=1 to opt out.

`python -m phi2_jax.bench` does the same, and its transformers worker inherits
the setting, so both sides run with one allocator configuration.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "PHI2_JAX_KEEP_MALLOC"


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
    if (sys.platform != "linux" or os.environ.get(OPT_OUT) or "glibc.malloc.hugetlb" in tunables
            or not _transparent_huge_pages_available() or not os.confstr("CS_GNU_LIBC_VERSION")):
        return
    env = {**os.environ, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}" if tunables else TUNABLE, OPT_OUT: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
