"""The transformers side of `python -m phi2_jax.bench`, in a process of its own.

Run as a script (`python .../bench_torch_worker.py MODEL_DIR DTYPE`), never as
`phi2_jax.bench_torch_worker`: importing the package would load jax into this
process, and the point of a separate process is that each framework runs as a
user runs it, alone, with its own allocator state and its own peak memory.
(Alternating both in one process slowed our training step by 15-30%, and the
memory column could only be the sum of both.)

Protocol: one JSON object per line on stdin, one answer per line on stdout.
    {"op": "setup", "suite": "train"|"prefill"|"decode", "ids": "file.npy", "new_tokens": N}
    {"op": "run"}          runs the suite's work once            -> {"ok": true}
    {"op": "peak_rss_mb"}  this process's peak resident memory   -> {"peak_rss_mb": float}
"""

from __future__ import annotations

import json
import resource
import sys

import numpy as np
import torch
from transformers import PhiForCausalLM


def make_work(model, suite: str, ids: torch.Tensor, new_tokens: int):
    """A no-argument function doing one repetition of `suite` on `ids`, as the bench's JAX side does."""
    if suite == "train":
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

        def train_step():
            optimizer.zero_grad(set_to_none=True)
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
    answers, sys.stdout = sys.stdout, sys.stderr  # anything a library prints must not break the protocol
    model_dir, dtype = sys.argv[1], sys.argv[2]
    model = PhiForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    work = None
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "setup":
            ids = torch.from_numpy(np.load(request["ids"])).long()
            work = make_work(model, request["suite"], ids, request.get("new_tokens", 0))
            answer = {"ok": True}
        elif request["op"] == "run":
            work()
            answer = {"ok": True}
        else:
            answer = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        print(json.dumps(answer), file=answers, flush=True)


if __name__ == "__main__":
    main()
