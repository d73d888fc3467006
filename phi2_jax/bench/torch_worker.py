"""The transformers side of `python -m phi2_jax.bench`, in a process of its own.

Run as a script (`python .../torch_worker.py MODEL_DIR DTYPE`), never as
`phi2_jax.bench.torch_worker`: importing the package would load jax into this
process, and the point of a separate process is that each framework runs as a
user runs it, alone, with its own allocator state and its own peak memory.
(Alternating both in one process slowed each side, and the memory column
could only be the sum of both; measured: docs/benchmarks.md, "Bench:
transformers in a process of its own".)

The model runs on the GPU when torch has one (the bench refuses a GPU run against
a CPU-only torch), in the setup JAX runs: for training, the stored (parameter)
dtype under autocast to the compute dtype, as our float32 parameters with
bfloat16 compute; for prefill and decoding, weights loaded in the compute
dtype, as transformers' users load them for inference.

Protocol: one JSON object per line on stdin, one answer per line on stdout.
    {"op": "setup", "suite": "train"|"prefill"|"decode", "ids": "file.npy", "new_tokens": N}
                           loads the model                     -> {"device": "cuda"|"cpu"}
    {"op": "run"}          runs the suite's work once, to completion on the device  -> {"ok": true}
    {"op": "peak_memory"}  this process's peak resident (and device) memory
                           -> {"peak_rss_mb": float, "peak_device_mb": float | null}
"""

from __future__ import annotations

import contextlib
import sys

import numpy as np
import torch
from transformers import PhiForCausalLM
from worker_loop import serve  # this script's folder (see worker_loop.py)


def make_work(model, suite: str, ids: torch.Tensor, new_tokens: int, compute_dtype: torch.dtype):
    """A no-argument function doing one repetition of `suite` on `ids`, as the bench's JAX side does."""
    if suite == "train":
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
        mixed = model.dtype != compute_dtype
        autocast = torch.autocast(ids.device.type, dtype=compute_dtype) if mixed else contextlib.nullcontext()

        def train_step():
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                logits = model(ids[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()

        return train_step
    model.eval()
    if suite == "prefill":
        def prefill():
            with torch.inference_mode():
                model(ids, use_cache=False)

        return prefill

    def decode():
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, use_cache=True)

    return decode


def main() -> None:
    model_dir, compute_dtype = sys.argv[1], getattr(torch, sys.argv[2])
    work = None

    def handle(request: dict, device: torch.device) -> dict:
        nonlocal work
        if request["op"] == "setup":
            training = request["suite"] == "train"  # trains the weights as written ("auto"), under autocast
            model = PhiForCausalLM.from_pretrained(model_dir, dtype="auto" if training else compute_dtype)
            ids = torch.from_numpy(np.load(request["ids"])).long().to(device)
            work = make_work(model.to(device), request["suite"], ids, request.get("new_tokens", 0), compute_dtype)
            return {"device": device.type}
        work()  # "run"
        return {"ok": True}

    serve(handle)


if __name__ == "__main__":
    main()
