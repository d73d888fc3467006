"""Greedy completion by recomputing the whole window each token: simple and exact, for short samples.

The KV-cache decoder for real generation lives in `generate.py`; this is what
the trainer uses to print a few completions of a small model.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from phi2_jax.model.transformer import Phi


@functools.partial(jax.jit, static_argnums=(0, 3))
def _greedy(graphdef, state, buffer, prompt_len_and_new, eos_id):
    prompt_len, new_tokens = prompt_len_and_new
    model = nnx.merge(graphdef, state)

    def body(i, carry):
        buffer, done = carry
        position = prompt_len + i
        logits = model(buffer[None])[0, position - 1]
        token = jnp.where(done, eos_id, jnp.argmax(logits).astype(buffer.dtype))
        return buffer.at[position].set(token), done | (token == eos_id)

    buffer, _ = jax.lax.fori_loop(0, new_tokens, body, (buffer, jnp.bool_(False)))
    return buffer


def greedy_complete(model: Phi, prompt_ids: list[int], new_tokens: int, eos_id: int) -> list[int]:
    """The greedy continuation of `prompt_ids` (up to `new_tokens` tokens, stopping at EOS)."""
    total = min(len(prompt_ids) + new_tokens, model.config.max_position_embeddings)
    new_tokens = total - len(prompt_ids)
    buffer = np.zeros(total, np.int32)
    buffer[: len(prompt_ids)] = prompt_ids
    graphdef, state = nnx.split(model)
    out = np.asarray(_greedy(graphdef, state, jnp.asarray(buffer), (len(prompt_ids), new_tokens), eos_id))
    continuation = out[len(prompt_ids):].tolist()
    return continuation[: continuation.index(eos_id)] if eos_id in continuation else continuation
