"""Huge pages for the host allocator: `phi2-convert` re-runs itself with them on.

The converter moves a model through freshly allocated tensor buffers (mapped
safetensors, tensorstore chunks, safetensors row blocks), and glibc serves
every block above 32 MB with a new `mmap`, so a conversion faults in the
whole model in 4 KB pages, several times over: most of its time was kernel
time. glibc's `glibc.malloc.hugetlb=1` tunable asks for transparent huge
pages on those blocks instead (512x fewer faults). Measured on the dev VM in
A/B pairs on the same disk state: from-hf of phi-2 34.0 / 34.0 -> 21.7 / 21.6 s,
to-hf 29.3 / 21.4 -> 15.4 / 17.5 s.

Tunables are read once at process start, so the only way to turn it on from
Python is to exec the same command again with it set. Set
PHI2_JAX_KEEP_MALLOC=1 to opt out.

Not used for training: there the same A/B comparisons of the bench's training
step disagreed from run to run (faster in one process alone, slower beside the
transformers worker), so the trainer keeps the default allocator until a
measurement says otherwise.
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
