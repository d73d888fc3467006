"""Generation with a static KV cache: prefill once, then the whole decode loop in one jitted `lax.while_loop`.

    phi2_jax.generate(model, input_ids, attention_mask=None, max_new_tokens=32,
                      temperature=0.0, top_k=None, top_p=None, seed=0)
      -> [batch, prompt + new] token ids, padded with EOS after a row finishes

Batches are left-padded (a right-padded batch is re-aligned first); positions
come from the mask, as transformers' `generate` computes them. One compiled
program per (batch, prompt bucket, max_new_tokens, sampling mode); prompts are
padded on the left up to a multiple of 32 so nearby lengths share it.

The command line (`python -m phi2_jax.generate`) is `phi2_jax.inference.cli`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from phi2_jax.errors import UserInputError
from phi2_jax.inference.decoding import cache_layout, decode_forward, layer_copies, use_layer_copies
from phi2_jax.model.transformer import Phi, default_positions

PROMPT_BUCKET = 32


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Static sampling choices (each combination compiles once)."""

    temperature: float = 0.0          # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self):
        # Each message starts with the parameter's name (the command line turns it into its flag).
        if not (_is_number(self.temperature) and 0 <= self.temperature < math.inf):
            raise UserInputError(f"temperature must be a number at least 0 (0: greedy), got {self.temperature}.")
        if self.top_k is not None and not (isinstance(self.top_k, numbers.Integral) and not isinstance(self.top_k, bool)
                                           and self.top_k >= 1):
            raise UserInputError(f"top_k must be a positive integer, got {self.top_k}.")
        if self.top_p is not None and not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            raise UserInputError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not (_is_number(self.repetition_penalty) and 0 < self.repetition_penalty < math.inf):
            raise UserInputError(f"repetition_penalty must be a positive number, got {self.repetition_penalty}.")


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def sample_logits(logits: jax.Array, key: jax.Array, sampling: Sampling, seen: jax.Array) -> jax.Array:
    """Next tokens [B] from float32 logits [B, V], in transformers' order: penalty, temperature, top-k, top-p."""
    if sampling.repetition_penalty != 1.0:
        penalised = jnp.where(logits > 0, logits / sampling.repetition_penalty, logits * sampling.repetition_penalty)
        logits = jnp.where(seen, penalised, logits)
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k is not None:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p is not None and sampling.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop_sorted = (jnp.cumsum(probs, axis=-1) - probs) >= sampling.top_p
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# XLA:CPU hands dots to YNNPACK by default, which is faster at training and prefill shapes but slower at
# decoding's few-row ones than Eigen's dots; the choice is per compiled program, so only the decoding
# program turns it off (measured: docs/benchmarks.md, "Decoding: Eigen's dots (YNNPACK off)").
_DECODE_COMPILER_OPTIONS = {"cpu": {"xla_cpu_experimental_ynn_fusion_type": ""}}


@functools.cache
def _compiled_decode(backend: str):
    return jax.jit(_decode, static_argnums=(0, 4, 5, 7, 10, 12), compiler_options=_DECODE_COMPILER_OPTIONS.get(backend))


def _decode(graphdef, state, ids, mask, max_new_tokens: int, sampling: Sampling, key, stream: bool, eos_id, stops,
            layer_graphdef, layer_states: list | None, cache_layout: str):
    """ids/mask [B, P] left-padded -> new tokens [B, N]. layer_graphdef/states: `decoding.layer_copies` or None."""
    model: Phi = nnx.merge(graphdef, state)
    layers = (layer_graphdef, layer_states) if layer_states is not None else None
    batch, prompt_len = ids.shape
    total = prompt_len + max_new_tokens
    vocab = model.config.vocab_size
    kv_mask = jnp.zeros((batch, total), jnp.int32).at[:, :prompt_len].set(mask)
    positions = default_positions(batch, prompt_len, mask)
    cache = model.init_cache(batch, total, layout=cache_layout, per_layer=layers is not None)
    logits, cache = decode_forward(model, layers, ids, kv_mask, positions, cache, 0)
    seen = jnp.zeros((batch, vocab), bool).at[jnp.arange(batch)[:, None], ids].max(mask.astype(bool))
    stop_len = stops.shape[1]
    state0 = {
        "i": jnp.int32(0), "cache": cache, "kv_mask": kv_mask, "logits": logits,
        "position": positions[:, -1] + 1, "done": jnp.zeros(batch, bool),
        "tokens": jnp.full((batch, max_new_tokens), eos_id, jnp.int32), "seen": seen,
        "window": jnp.full((batch, stop_len), -1, jnp.int32),
    }

    def cond(s):
        return (s["i"] < max_new_tokens) & ~jnp.all(s["done"])

    def body(s):
        i = s["i"]
        token = sample_logits(s["logits"], jax.random.fold_in(key, i), sampling, s["seen"])
        token = jnp.where(s["done"], eos_id, token)
        if stream:
            jax.debug.callback(_stream_callback, i, token, ordered=True)
        window = jnp.concatenate([s["window"][:, 1:], token[:, None]], axis=1)
        # A stop sequence matches when the newest tokens equal it (-1 pads its left side).
        stop_hit = jnp.any(jnp.all((window[:, None, :] == stops[None]) | (stops[None] < 0), axis=-1)
                           & (stops[None, :, -1] >= 0), axis=-1)
        done = s["done"] | (token == eos_id) | stop_hit
        kv_mask = s["kv_mask"].at[:, prompt_len + i].set(1)
        logits, cache = decode_forward(model, layers, token[:, None], kv_mask, s["position"][:, None], s["cache"],
                                       prompt_len + i)
        return {"i": i + 1, "cache": cache, "kv_mask": kv_mask, "logits": logits,
                "position": s["position"] + 1, "done": done, "tokens": s["tokens"].at[:, i].set(token),
                "seen": s["seen"].at[jnp.arange(batch), token].set(True), "window": window}

    return jax.lax.while_loop(cond, body, state0)["tokens"]


_stream_sink: list[Callable] = []


def _stream_callback(step, tokens):
    for sink in _stream_sink:
        sink(int(step), np.asarray(tokens))


def left_pad(sequences: Sequence[Sequence[int]], width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (ids, mask) [B, width] with each row's tokens at the right end (left padding)."""
    width = max(len(s) for s in sequences) if width is None else width
    ids = np.zeros((len(sequences), width), np.int32)
    mask = np.zeros_like(ids)
    for r, tokens in enumerate(sequences):
        if len(tokens):
            ids[r, width - len(tokens):], mask[r, width - len(tokens):] = tokens, 1
    return ids, mask


def left_align(input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Moves every row's real tokens to the right end (left padding), whatever padding it came with."""
    rows = [ids[mask.astype(bool)] for ids, mask in zip(input_ids, attention_mask)]
    return left_pad(rows, input_ids.shape[1])


def generate(
    model: Phi,
    input_ids,
    attention_mask=None,
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int = 0,
    eos_token_id: int | None = None,
    stop_sequences: Sequence[Sequence[int]] = (),
    on_token: Callable[[int, np.ndarray], None] | None = None,
    copy_layers: bool | None = None,
) -> np.ndarray:
    """Prompt + continuation ids [B, P + max_new_tokens]; rows are padded with EOS after they finish.

    input_ids [B, P] (numpy or jax); attention_mask [B, P] marks real tokens
    (left or right padding). eos_token_id defaults to the config's.
    stop_sequences: token id sequences that end a row like EOS does.
    on_token(step, tokens [B]) is called as each token is produced (streaming).
    copy_layers: hold a second copy of the layer weights during the call so that each
    decoding step reads every weight once (`inference/decoding.py`); None decides per
    backend and by free memory. The tokens are the same either way.
    """
    ids = np.asarray(input_ids, np.int32)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise UserInputError(f"input_ids must be a non-empty [batch, time] array, got shape {ids.shape}.")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    lengths = mask.sum(axis=1)
    if (lengths == 0).any():
        raise UserInputError(f"prompt {int(np.argmin(lengths))} of the batch is empty; expected at least one token.")
    if max_new_tokens < 1:
        raise UserInputError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    Sampling(temperature, top_k, top_p, repetition_penalty)  # refuses bad values in one sentence
    if top_k is not None and top_k > model.config.vocab_size:
        raise UserInputError(f"top_k {top_k} exceeds the model's vocabulary of {model.config.vocab_size} tokens.")
    context = model.config.max_position_embeddings
    if lengths.max() + max_new_tokens > context:
        raise UserInputError(f"a prompt of {int(lengths.max())} tokens plus max_new_tokens {max_new_tokens} exceeds the "
                             f"model's context of {context} tokens.")
    ids, mask = left_align(ids, mask)
    ids, mask = ids[:, ids.shape[1] - lengths.max():], mask[:, mask.shape[1] - lengths.max():]
    bucket = min(-(-ids.shape[1] // PROMPT_BUCKET) * PROMPT_BUCKET, context - max_new_tokens)
    pad = bucket - ids.shape[1]
    padded_ids = np.pad(ids, ((0, 0), (pad, 0)))
    padded_mask = np.pad(mask, ((0, 0), (pad, 0)))
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    eos = -1 if eos is None else eos
    stop_len = max([len(s) for s in stop_sequences] + [1])
    stops = np.full((max(len(stop_sequences), 1), stop_len), -1, np.int32)
    for n, seq in enumerate(stop_sequences):
        if len(seq):
            stops[n, stop_len - len(seq):] = seq
    sampling = Sampling(float(temperature), top_k, top_p, float(repetition_penalty))
    graphdef, state = nnx.split(model)
    if on_token is not None:
        _stream_sink.append(on_token)
    try:
        backend = jax.default_backend()
        # Copied out of the stack once per call, not once per layer and token (see inference/decoding.py).
        layer_graphdef, layer_states = (layer_copies(model) if use_layer_copies(model, backend, copy_layers)
                                        else (None, None))
        new = _compiled_decode(backend)(
            graphdef, state, jnp.asarray(padded_ids), jnp.asarray(padded_mask), max_new_tokens, sampling,
            jax.random.key(seed), on_token is not None, eos, jnp.asarray(stops), layer_graphdef, layer_states,
            cache_layout(backend))
        if not new.is_fully_addressable:  # a model sharded over several processes: each gets every row
            from jax.experimental import multihost_utils

            new = multihost_utils.process_allgather(new, tiled=True)
        new = np.asarray(new)
    finally:
        if on_token is not None:
            jax.effects_barrier()
            _stream_sink.remove(on_token)
    return np.concatenate([ids, new], axis=1)


def generate_text(model: Phi, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 64,
                  stop: Sequence[str] = (), **sampling) -> list[str]:
    """Continuations of text prompts (the prompt itself not included), cut at EOS and at the first stop string."""
    return generate_after_ids(model, tokenizer, [tokenizer.encode(p) for p in prompts], max_new_tokens=max_new_tokens,
                              stop=stop, **sampling)


def generate_after_ids(model: Phi, tokenizer, encoded: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                       stop: Sequence[str] = (), **sampling) -> list[str]:
    """`generate_text` for prompts given as token ids (e.g. a chat prompt tokenized as training tokenized it)."""
    if any(not e for e in encoded):
        raise UserInputError("a prompt is empty; expected at least one token of text.")
    ids, mask = left_pad(encoded)
    width = ids.shape[1]
    stop_ids = [tokenizer.encode(s) for s in stop if s]
    out = generate(model, ids, mask, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_id,
                   stop_sequences=stop_ids, **sampling)
    texts = []
    for prompt_ids, row in zip(encoded, out[:, width:].tolist()):
        row = row[: row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row
        texts.append(cut_at_stop(tokenizer.decode_continuation(prompt_ids, row), stop))
    return texts


def stop_index(text: str, stop: Sequence[str]) -> int:
    """Where `text` is cut: the start of the first stop string in it, else its length."""
    return min([text.find(s) for s in stop if s and s in text] + [len(text)])


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the first of the stop strings it contains."""
    return text[:stop_index(text, stop)]
