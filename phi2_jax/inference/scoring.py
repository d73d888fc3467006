"""Batched log-likelihoods: the model-side half of evaluation.

    loglikelihood(model, [(context_ids, continuation_ids), ...])
      -> [(sum of log p(continuation | context), continuation is the greedy choice), ...]
    rolling_loglikelihood(model, ids, eos_id) -> sum of log p over every token

Requests are sorted by length, right-padded to a bucket (multiple of 64) and
batched at a fixed batch size, so a whole evaluation compiles a handful of
programs. On a mesh the batch is split over the data axes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from phi2_jax.model.transformer import Phi
from phi2_jax.sharding import logical_to_spec

LENGTH_BUCKET = 64


@functools.partial(jax.jit, static_argnums=0)
def _token_logprobs(graphdef, state, ids, mask, targets):
    """log p(target_t | ids[:t+1]) and whether target_t is the argmax, both [B, T]."""
    model: Phi = nnx.merge(graphdef, state)
    logits = model(ids, attention_mask=mask)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == targets


def _batches(rows: list[tuple[np.ndarray, np.ndarray]], batch_size: int, max_len: int):
    """Yields (row indices, ids, mask, targets) of right-padded, length-bucketed batches."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        longest = len(rows[chunk[0]][0])
        width = min(-(-longest // LENGTH_BUCKET) * LENGTH_BUCKET, max_len)
        ids = np.zeros((batch_size, width), np.int32)
        mask = np.zeros((batch_size, width), np.int32)
        targets = np.zeros((batch_size, width), np.int32)
        for r, i in enumerate(chunk):
            inputs, outputs = rows[i]
            ids[r, :len(inputs)], mask[r, :len(inputs)], targets[r, :len(outputs)] = inputs, 1, outputs
        yield chunk, ids, mask, targets


def _run(model: Phi, rows, batch_size: int, progress: Callable[[int], None] | None):
    """(log-probs, greedy flags) per row, each of the row's length."""
    graphdef, state = nnx.split(model)
    mesh = model.mesh
    if mesh is not None:
        data_ways = mesh.shape["data"] * mesh.shape["fsdp"]
        batch_size = -(-batch_size // data_ways) * data_ways
        sharding = NamedSharding(mesh, logical_to_spec(("act_batch", "act_length"), mesh=mesh))
    results: list = [None] * len(rows)
    for chunk, ids, mask, targets in _batches(rows, batch_size, model.config.max_position_embeddings):
        arrays = [jnp.asarray(a) if mesh is None else jax.device_put(a, sharding) for a in (ids, mask, targets)]
        logprobs, greedy = jax.device_get(_token_logprobs(graphdef, state, *arrays))
        for r, i in enumerate(chunk):
            n = len(rows[i][0])
            results[i] = (logprobs[r, :n], greedy[r, :n])
        if progress:
            progress(len(chunk))
    return results


def loglikelihood(model: Phi, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *, eos_id: int,
                  batch_size: int = 8, progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
    """For each (context, continuation): (sum log p(continuation | context), all continuation tokens greedy).

    An empty context is replaced by EOS (documents start after an end-of-text).
    Over-long requests keep the continuation and the nearest context.
    """
    max_len = model.config.max_position_embeddings
    rows, spans = [], []
    for context, continuation in requests:
        assert len(continuation) > 0, "an empty continuation has no likelihood to score"
        full = list(context or [eos_id]) + list(continuation)
        full = full[-(max_len + 1):]
        rows.append((np.asarray(full[:-1]), np.asarray(full[1:])))
        spans.append(len(continuation))
    scored = _run(model, rows, batch_size, progress)
    return [(float(lp[-n:].sum()), bool(g[-n:].all())) for (lp, g), n in zip(scored, spans)]


def rolling_loglikelihood(model: Phi, ids: Sequence[int], *, eos_id: int, batch_size: int = 8,
                          progress: Callable[[int], None] | None = None) -> float:
    """Sum of log p(token) over every token of `ids`, the first predicted from EOS, in disjoint context windows."""
    max_len = model.config.max_position_embeddings
    inputs = np.asarray([eos_id, *ids[:-1]])
    targets = np.asarray(ids)
    rows = [(inputs[s:s + max_len], targets[s:s + max_len]) for s in range(0, len(ids), max_len)]
    return float(sum(lp.sum() for lp, _ in _run(model, rows, batch_size, progress)))
