"""The request loop of the bench's torch-side workers (torch_worker.py, trl_worker.py).

The workers run as scripts and never import phi2_jax (that would load jax into
their process), so they import this module by name from their own folder: it
uses torch and the standard library only.
"""

from __future__ import annotations

import json
import resource
import sys
from collections.abc import Callable

import torch

TIMED_OPS = ("run", "rollout")  # answered only once the device has finished, as the JAX side blocks until ready


def serve(handle: Callable[[dict, torch.device], dict]) -> None:
    """Answers each JSON request line on stdin with one JSON line on stdout: `handle(request, device)` for the
    worker's own ops, this process's peak memory for {"op": "peak_memory"}."""
    answers, sys.stdout = sys.stdout, sys.stderr  # anything a library prints must not break the protocol
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "peak_memory":
            device_peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
            answer = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "peak_device_mb": device_peak}
        else:
            answer = handle(request, device)
            if request["op"] in TIMED_OPS and device.type == "cuda":
                torch.cuda.synchronize()
        print(json.dumps(answer), file=answers, flush=True)
