"""Phi (phi-1, phi-1.5, phi-2) causal language model in Flax NNX.

    h = embed(ids)                                   # then embedding dropout
    for each layer (one `lax.scan` over stacked weights):
        x = LayerNorm(h)                             # ONE norm per parallel block
        h = h + dropout(Attention(x)) + dropout(MLP(x))
    logits = lm_head(LayerNorm(h))                   # lm_head has a bias, untied

Attention rotates only the first `rotary_dim` dims of each head (NeoX
rotate-half); MLP is fc1 -> gelu_new -> fc2. Parameters live in
`config.param_dtype`; matmuls run in `config.compute_dtype`; LayerNorm,
rotary, softmax and logits run in float32.

All layers' weights are stacked along a leading 'layers' axis and the forward
pass scans over them, so compile time does not grow with depth. Every weight
carries `logical_axes` metadata read by `phi2_jax.sharding`.

`Phi.run` is the one forward pass; through the scan it also threads a static
KV cache (decoding, `generate.py`), captures intermediates per layer and
applies residual-stream edits (`interpret.py`). Linear layers optionally carry
LoRA adapters (`lora.py`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from phi2_jax.model.attention import attention, attention_mask, attention_probs, flat_heads, unflat_heads
from phi2_jax.config import PhiConfig
from phi2_jax.model.dense import dense
from phi2_jax.sharding import constrain, state_shardings

Array = jax.Array


# ----------------------------------------------------------------------------- pieces
_GELU_C = math.sqrt(2.0 / math.pi)


@jax.custom_vjp
def gelu_new(x: Array) -> Array:
    """GPT-2 / Phi gelu, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

    Its gradient keeps only x for the backward pass: autodiff of the formula kept
    five [L, B, T, 4E] intermediates per step (the largest activations of a
    layer), where recomputing the tanh from x costs a few elementwise ops.
    """
    return 0.5 * x * (1.0 + jnp.tanh(_GELU_C * (x + 0.044715 * x**3)))


def _gelu_new_forward(x: Array) -> tuple[Array, Array]:
    return gelu_new(x), x


def _gelu_new_backward(x: Array, grad: Array) -> tuple[Array]:
    t = jnp.tanh(_GELU_C * (x + 0.044715 * x**3))
    # d/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
    slope = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _GELU_C * (1.0 + 3 * 0.044715 * x * x)
    return (grad * slope,)


gelu_new.defvjp(_gelu_new_forward, _gelu_new_backward)


ACTIVATION_FNS = {
    "gelu_new": gelu_new,
    "gelu_pytorch_tanh": gelu_new,
    "gelu_fast": gelu_new,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def rotary_tables(positions: Array, rotary_dim: int, theta: float) -> tuple[Array, Array]:
    """Float32 cos/sin [B, T, rotary_dim] for integer positions [B, T] (NeoX layout: halves repeated)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates the first cos.shape[-1] dims of x [B, T, H, D] (rotate-half); the rest pass through."""
    rotary_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rotary_dim].astype(jnp.float32), x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x_rot = x_rot * cos + rotated * sin
    return jnp.concatenate([x_rot.astype(x.dtype), x_pass], axis=-1)


def default_positions(batch: int, length: int, attention_mask: Array | None, segment_ids: Array | None) -> Array:
    """Position ids when none are given.

    Plain batch: 0..T-1. With a padding mask: the count of real tokens before
    each token, so a left-padded row gets the positions it would have alone
    (what transformers' `generate` does). With segment ids (packed documents):
    the offset inside each document.
    """
    if segment_ids is not None:
        index = jnp.arange(length)[None, :]
        starts = jnp.concatenate(
            [jnp.ones((batch, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
        return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    if attention_mask is not None:
        return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)
    return jnp.broadcast_to(jnp.arange(length)[None, :], (batch, length))


def dropout(x: Array, rate: float, rng: Array | None) -> Array:
    """Inverted dropout; identity when `rng` is None (evaluation) or rate is 0."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


# ----------------------------------------------------------------------------- parameter modules
def _normal(std: float):
    return jax.nn.initializers.normal(std)


class LoRAParam(nnx.Param):
    """A low-rank adapter weight: the only parameters a LoRA fine-tune trains."""


class Linear(nnx.Module):
    """y = x @ kernel + bias (+ scale * x @ lora_a @ lora_b), kernel [*stack, in, out], computed in `compute_dtype`.

    With `lora=True` (and config.lora_rank > 0) the layer carries a LoRA adapter:
    lora_a [*stack, in, r] ~ N(0, 1/in), lora_b [*stack, r, out] = 0, so a fresh
    adapter leaves the function unchanged; scale = lora_alpha / lora_rank.
    """

    def __init__(self, d_in: int, d_out: int, names: tuple[str, str], *, stack: tuple[int, ...], config: PhiConfig,
                 rngs: nnx.Rngs, lora: bool = False):
        pdt = jnp.dtype(config.param_dtype)
        stack_names = ("layers",) * len(stack)
        self.kernel = nnx.Param(_normal(config.initializer_range)(rngs.params(), (*stack, d_in, d_out), pdt),
                                logical_axes=(*stack_names, *names))
        self.bias = nnx.Param(jnp.zeros((*stack, d_out), pdt), logical_axes=(*stack_names, names[1]))
        self.compute_dtype = jnp.dtype(config.compute_dtype)
        self.lora_scale = 0.0
        if lora and config.lora_rank:
            rank = config.lora_rank
            self.lora_a = LoRAParam(_normal(d_in**-0.5)(rngs.params(), (*stack, d_in, rank), pdt),
                                    logical_axes=(*stack_names, names[0], "lora_rank"))
            self.lora_b = LoRAParam(jnp.zeros((*stack, rank, d_out), pdt), logical_axes=(*stack_names, "lora_rank", names[1]))
            self.lora_scale = config.lora_alpha / rank

    def __call__(self, x: Array, out_dtype=None) -> Array:
        dtype = self.compute_dtype
        y = affine(x, self.kernel.get_value(), self.bias.get_value(), dtype, out_dtype or dtype)
        if self.lora_scale:
            low = jnp.einsum("...i,ir->...r", x.astype(dtype), self.lora_a.get_value().astype(dtype))
            y = y + (self.lora_scale * jnp.einsum("...r,ro->...o", low, self.lora_b.get_value().astype(dtype))).astype(y.dtype)
        return y


def affine(x: Array, kernel: Array, bias: Array, compute_dtype, out_dtype) -> Array:
    """x @ kernel + bias with the matmul in `compute_dtype` (float32 accumulation), the result in `out_dtype`."""
    y = dense(x.astype(compute_dtype), kernel.astype(compute_dtype), out_dtype)
    return y + bias.astype(y.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, computed in float32, with the config's epsilon (not Flax's 1e-6)."""

    def __init__(self, dim: int, name: str, *, stack: tuple[int, ...], config: PhiConfig):
        pdt = jnp.dtype(config.param_dtype)
        stack_names = ("layers",) * len(stack)
        self.scale = nnx.Param(jnp.ones((*stack, dim), pdt), logical_axes=(*stack_names, name))
        self.bias = nnx.Param(jnp.zeros((*stack, dim), pdt), logical_axes=(*stack_names, name))
        self.eps = config.layer_norm_eps

    def __call__(self, x: Array, out_dtype) -> Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale.get_value().astype(jnp.float32) + self.bias.get_value().astype(jnp.float32)).astype(out_dtype)


class Attention(nnx.Module):
    """q/k/v/dense projections with bias, optional qk LayerNorm, partial rotary, causal attention."""

    def __init__(self, config: PhiConfig, *, stack: tuple[int, ...], rngs: nnx.Rngs):
        h = config.hidden_size
        self.config = config
        self.q_proj = Linear(h, h, ("embed", "heads"), stack=stack, config=config, rngs=rngs,
                            lora="q_proj" in config.lora_targets)
        self.k_proj = Linear(h, config.kv_dim, ("embed", "kv_heads"), stack=stack, config=config, rngs=rngs,
                            lora="k_proj" in config.lora_targets)
        self.v_proj = Linear(h, config.kv_dim, ("embed", "kv_heads"), stack=stack, config=config, rngs=rngs,
                            lora="v_proj" in config.lora_targets)
        self.dense = Linear(h, h, ("heads", "embed"), stack=stack, config=config, rngs=rngs,
                           lora="dense" in config.lora_targets)
        if config.qk_layernorm:
            self.q_layernorm = LayerNorm(config.head_dim, "head_dim", stack=stack, config=config)
            self.k_layernorm = LayerNorm(config.head_dim, "head_dim", stack=stack, config=config)

    def __call__(self, x: Array, ctx: dict[str, Any], mesh: Mesh | None, cache: tuple | None,
                 projected: tuple[Array, Array, Array] | None = None):
        """Returns (output [B, T, E], updated (k, v) cache or None, attention probabilities or None).

        cache: ((k, v), this layer's index) while decoding, else None; k and v are
        either stacked [L, B*K, S, D] arrays or lists of L per-layer [B*K, S, D]
        arrays (see `Phi.init_cache`).
        projected: (q, k, v) already computed from x (by `DecoderLayer`'s fused input projection).
        """
        cfg = self.config
        batch, length, _ = x.shape
        q, k, v = projected if projected is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q = q.reshape(batch, length, cfg.num_attention_heads, cfg.head_dim)
        k = k.reshape(batch, length, cfg.num_key_value_heads, cfg.head_dim)
        v = v.reshape(batch, length, cfg.num_key_value_heads, cfg.head_dim)
        if cfg.qk_layernorm:
            q = self.q_layernorm(q, q.dtype)
            k = self.k_layernorm(k, k.dtype)
        q = apply_rotary(q, ctx["cos"], ctx["sin"])
        k = apply_rotary(k, ctx["cos"], ctx["sin"])
        q = constrain(q, ("act_batch", "act_length", "act_heads", "act_head_dim"), mesh)
        k = constrain(k, ("act_batch", "act_length", "act_kv_heads", "act_head_dim"), mesh)
        q_offset, kv_flat = 0, False
        if cache is not None:
            # Decoding: write this step's keys/values at slots [index, index + T) of this layer's cache, in
            # place, then attend over all of that layer's slots, read where they lie.
            (k_all, v_all), layer = cache
            index = ctx["cache_index"]
            k_all, k = _write_cache(k_all, layer, k, index)
            v_all, v = _write_cache(v_all, layer, v, index)
            cache, q_offset, kv_flat = (k_all, v_all), index, True
        out = attention(q, k, v, backend=cfg.attention_backend, q_offset=q_offset, kv_mask=ctx["attention_mask"],
                        q_segment_ids=ctx["segment_ids"], kv_segment_ids=ctx["segment_ids"], kv_flat=kv_flat)
        probs = None
        if "attn_probs" in ctx["capture"]:
            k_seq = unflat_heads(k, batch) if kv_flat else k
            mask = attention_mask(batch, length, k_seq.shape[1], q_offset=q_offset, kv_mask=ctx["attention_mask"],
                                  q_segment_ids=ctx["segment_ids"], kv_segment_ids=ctx["segment_ids"])
            probs = attention_probs(q, k_seq, mask)
        return self.dense(out.reshape(batch, length, -1)), cache, probs


def _write_cache(store, layer, new: Array, index) -> tuple[Any, Array]:
    """Writes new [B, T, K, D] at slots [index, index + T) of `layer`'s cache; returns (store, that layer's [B*K, S, D]).

    store: stacked [L, B*K, S, D] (scanned layers, dynamic `layer`), or a list of
    per-layer arrays (unrolled layers, static `layer`), whose layer is read
    without a copy out of a stack.
    """
    per_layer = isinstance(store, list)
    new = flat_heads(new.astype((store[0] if per_layer else store).dtype))
    if per_layer:
        written = jax.lax.dynamic_update_slice(store[layer], new, (0, index, 0))
        return [*store[:layer], written, *store[layer + 1:]], written
    store = jax.lax.dynamic_update_slice(store, new[None], (layer, 0, index, 0))
    return store, jax.lax.dynamic_index_in_dim(store, layer, keepdims=False)


class MLP(nnx.Module):
    """fc1 -> activation (gelu_new for Phi) -> fc2, both with bias."""

    def __init__(self, config: PhiConfig, *, stack: tuple[int, ...], rngs: nnx.Rngs):
        self.fc1 = Linear(config.hidden_size, config.intermediate_size, ("embed", "mlp"), stack=stack, config=config,
                          rngs=rngs, lora="fc1" in config.lora_targets)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size, ("mlp", "embed"), stack=stack, config=config,
                          rngs=rngs, lora="fc2" in config.lora_targets)
        self.activation = config.hidden_act

    def __call__(self, x: Array, mesh: Mesh | None, fc1_out: Array | None = None) -> tuple[Array, Array]:
        """(output [B, T, E], activation after the nonlinearity [B, T, F]); fc1_out: fc1(x) if already computed."""
        y = self.fc1(x) if fc1_out is None else fc1_out
        y = constrain(y, ("act_batch", "act_length", "act_mlp"), mesh)
        act = ACTIVATION_FNS[self.activation](y)
        return self.fc2(act), act


# The projections that read the layer norm's output, in the order `unstack_layers` concatenates them and
# `DecoderLayer` splits them: (module, linear).
INPUT_PROJECTIONS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("mlp", "fc1"))


class DecoderLayer(nnx.Module):
    """The parallel block. Built with `stack=(L,)` it holds all L layers' weights stacked."""

    def __init__(self, config: PhiConfig, *, stack: tuple[int, ...], rngs: nnx.Rngs):
        self.input_layernorm = LayerNorm(config.hidden_size, "norm", stack=stack, config=config)
        self.self_attn = Attention(config, stack=stack, rngs=rngs)
        self.mlp = MLP(config, stack=stack, rngs=rngs)
        self.resid_pdrop = config.resid_pdrop

    def __call__(self, h: Array, ctx: dict[str, Any], rng: Array | None, mesh: Mesh | None, cache: tuple | None,
                 input_projection: dict[str, Array] | None = None):
        """Returns (new residual stream, updated cache, captured intermediates of this layer).

        input_projection: q/k/v/fc1's {'kernel' [E, E + 2 kv_dim + F], 'bias'} concatenated (see `unstack_layers`).
        """
        x = self.input_layernorm(h, h.dtype)
        attn_rng, mlp_rng = jax.random.split(rng) if rng is not None else (None, None)
        projected, fc1_out = None, None
        if input_projection is not None:
            dtype = self.mlp.fc1.compute_dtype
            y = affine(x, input_projection["kernel"], input_projection["bias"], dtype, dtype)
            cfg = self.self_attn.config
            q, k, v, fc1_out = jnp.split(y, np.cumsum([cfg.hidden_size, cfg.kv_dim, cfg.kv_dim]), axis=-1)
            projected = (q, k, v)
        attn_out, cache, probs = self.self_attn(x, ctx, mesh, cache, projected)
        mlp_out, mlp_act = self.mlp(x, mesh, fc1_out)
        attn_out = dropout(attn_out, self.resid_pdrop, attn_rng)
        mlp_out = dropout(mlp_out, self.resid_pdrop, mlp_rng)
        h = h + attn_out.astype(h.dtype) + mlp_out.astype(h.dtype)
        available = {"attn_out": attn_out, "mlp_out": mlp_out, "mlp_act": mlp_act, "attn_probs": probs}
        return h, cache, {name: available[name] for name in ctx["capture"] if name in available}


_REMAT_POLICIES = {
    "full": None,  # save nothing inside a layer: recompute all of it in the backward pass
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# ----------------------------------------------------------------------------- the model
class Phi(nnx.Module):
    """Phi causal LM. `model(input_ids, attention_mask=None, position_ids=None)` -> float32 logits [B, T, V]."""

    def __init__(self, config: PhiConfig, *, rngs: nnx.Rngs, mesh: Mesh | None = None):
        self.config = config
        self.mesh = mesh
        pdt = jnp.dtype(config.param_dtype)
        self.embed_tokens = nnx.Param(
            _normal(config.initializer_range)(rngs.params(), (config.vocab_size, config.hidden_size), pdt),
            logical_axes=("vocab", "embed"))
        self.layers = DecoderLayer(config, stack=(config.num_hidden_layers,), rngs=rngs)
        self.final_layernorm = LayerNorm(config.hidden_size, "norm", stack=(), config=config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, ("embed", "vocab"), stack=(), config=config, rngs=rngs)

    def forward(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        position_ids: Array | None = None,
        segment_ids: Array | None = None,
        *,
        dropout_rng: Array | None = None,
    ) -> Array:
        """Float32 logits [B, T, V] for input_ids [B, T]; traceable (use inside your own jit / grad).

        attention_mask [B, T]: 1 for real tokens, 0 for padding (left or right).
        segment_ids [B, T]: document ids of packed sequences; no attention across them.
        dropout_rng: a PRNG key turns dropout on (training); None means deterministic.
        """
        return self.run(input_ids, attention_mask, position_ids, segment_ids, dropout_rng=dropout_rng)["logits"]

    def run(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        position_ids: Array | None = None,
        segment_ids: Array | None = None,
        *,
        dropout_rng: Array | None = None,
        cache: dict[str, Array] | None = None,
        cache_index: Array | int = 0,
        capture: tuple[str, ...] = (),
        edits: dict[str, Array] | None = None,
        layer_weights: list | None = None,
    ) -> dict[str, Any]:
        """The forward pass with everything optional; returns {'logits', 'cache', 'captures'}.

        cache: {'k', 'v'} from `init_cache`; the T new tokens are
          written at slots [cache_index, cache_index + T) and `attention_mask`
          is then the [B, S] mask of valid cache slots (this step's included).
        capture: names from CAPTURE_NAMES; each comes back stacked over layers.
        edits: residual-stream interventions after each layer (see `interpret.py`):
          {'replace_mask' [L, B, T], 'replace_value' [L, B, T, E], 'add' [L, B, T, E]}.
        layer_weights: each layer's weights as arrays of their own (`unstack_layers`); the
          layers then run unrolled, each reading its own arrays. Scanning over the stacked
          weights copies every layer's slice out before its matmuls (XLA cannot point a
          dot at a dynamic offset), which doubles the bytes a decoding step moves.
        """
        cfg, mesh = self.config, self.mesh
        unknown = set(capture) - set(CAPTURE_NAMES)
        assert not unknown, f"unknown capture names {sorted(unknown)}; expected some of {CAPTURE_NAMES}"
        batch, length = input_ids.shape
        compute_dtype = jnp.dtype(cfg.compute_dtype)
        if position_ids is None:
            assert cache is None, "decoding needs explicit position_ids"
            position_ids = default_positions(batch, length, attention_mask, segment_ids)
        cos, sin = rotary_tables(position_ids, cfg.rotary_dim, cfg.rope_theta)
        ctx = {"cos": cos, "sin": sin, "attention_mask": attention_mask, "segment_ids": segment_ids,
               "cache_index": cache_index, "capture": tuple(capture)}

        embed_rng, layers_rng = jax.random.split(dropout_rng) if dropout_rng is not None else (None, None)
        h = jnp.take(self.embed_tokens.get_value(), input_ids, axis=0).astype(compute_dtype)
        h = dropout(h, cfg.embd_pdrop, embed_rng)
        h = constrain(h, ("act_batch", "act_length", "act_embed"), mesh)

        graphdef, stacked = nnx.split(self.layers)

        def one_layer(carry, xs):
            h, cache = carry
            layer = nnx.merge(graphdef, xs["params"])
            index = xs["index"]
            rng = jax.random.fold_in(layers_rng, index) if layers_rng is not None else None
            # The stacked cache rides in the carry so that XLA updates it in place (as a scan output it
            # would be copied whole at every decoding step).
            layer_cache = ((cache["k"], cache["v"]), index) if cache is not None else None
            h, layer_cache, captured = layer(h, ctx, rng, mesh, layer_cache, xs.get("input_projection"))
            if cache is not None:
                cache = {"k": layer_cache[0], "v": layer_cache[1]}
            if "edits" in xs:
                e = xs["edits"]
                h = jnp.where(e["replace_mask"][..., None], e["replace_value"].astype(h.dtype), h)
                h = h + e["add"].astype(h.dtype)
            h = constrain(h, ("act_batch", "act_length", "act_embed"), mesh)
            if "residual" in ctx["capture"]:
                captured["residual"] = h
            return (h, cache), captured

        if layer_weights is None:
            scanned_layer = one_layer
            if cfg.remat != "none":
                scanned_layer = jax.checkpoint(one_layer, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
            xs = {"params": stacked, "index": jnp.arange(cfg.num_hidden_layers)}
            if edits is not None:
                xs["edits"] = edits
            (h, new_cache), captures = jax.lax.scan(scanned_layer, (h, cache), xs)
        else:  # unrolled: for decoding, never differentiated, so no remat
            carry, per_layer = (h, cache), []
            for index, weights in enumerate(layer_weights):
                xs = {**weights, "index": index}
                if edits is not None:
                    xs["edits"] = jax.tree.map(lambda e: e[index], edits)
                carry, captured = one_layer(carry, xs)
                per_layer.append(captured)
            (h, new_cache), captures = carry, jax.tree.map(lambda *c: jnp.stack(c), *per_layer)

        h = self.final_layernorm(h, compute_dtype)
        logits = self.lm_head(h, out_dtype=jnp.float32)
        logits = constrain(logits, ("act_batch", "act_length", "act_vocab"), mesh)
        return {"logits": logits, "cache": new_cache, "captures": captures}

    def unstack_layers(self, fuse_input_projections: bool = False) -> list[dict[str, Any]]:
        """Each layer's weights copied out of the stacked arrays once, for `run(..., layer_weights=...)`.

        Entries are {'params': that layer's state}. With `fuse_input_projections` the
        four projections of the layer norm's output (q, k, v, fc1) are concatenated
        into one kernel, {'input_projection': {'kernel', 'bias'}}, and their own
        kernels left out of the copy (empty arrays), so it costs no more memory: a
        decoding step then reads them in one matrix-vector product instead of four
        (batch-1 steps of phi-small's layers on the CPU: 6.8 -> 5.5 ms, 17 -> 21 GB/s).
        Not done where those layers carry LoRA adapters, or on a mesh that splits
        them over a 'tensor' axis (the concatenation would interleave the shards).
        """
        _, stacked = nnx.split(self.layers)
        layers = [{"params": jax.tree.map(lambda a, i=i: a[i], stacked)} for i in range(self.config.num_hidden_layers)]
        if fuse_input_projections and self.can_fuse_input_projections():
            for layer in layers:
                params = layer["params"]
                linears = [params[module][linear] for module, linear in INPUT_PROJECTIONS]
                layer["input_projection"] = {
                    "kernel": jnp.concatenate([p["kernel"].get_value() for p in linears], axis=-1),
                    "bias": jnp.concatenate([p["bias"].get_value() for p in linears], axis=-1)}
                for p in linears:
                    p["kernel"].set_value(jnp.zeros((0,), p["kernel"].get_value().dtype))
        return layers

    def can_fuse_input_projections(self) -> bool:
        """Whether `unstack_layers(fuse_input_projections=True)` fuses (see there)."""
        adapted = self.config.lora_rank and set(self.config.lora_targets) & {linear for _, linear in INPUT_PROJECTIONS}
        return not adapted and (self.mesh is None or self.mesh.shape.get("tensor", 1) == 1)

    def init_cache(self, batch: int, max_length: int, dtype=None, per_layer: bool = False) -> dict[str, Any]:
        """An empty static KV cache {'k', 'v'} in the compute dtype, heads first: [B*K, max_length, D] per layer.

        Stacked [L, B*K, max_length, D] for the scanned layers, or with `per_layer`
        lists of L arrays for `run(..., layer_weights=...)`, whose unrolled layers
        then read their cache without copying it out of a stack.
        """
        cfg = self.config
        shape = (batch * cfg.num_key_value_heads, max_length, cfg.head_dim)
        dtype = dtype or jnp.dtype(cfg.compute_dtype)
        if per_layer:
            layers = range(cfg.num_hidden_layers)
            return {"k": [jnp.zeros(shape, dtype) for _ in layers], "v": [jnp.zeros(shape, dtype) for _ in layers]}
        shape = (cfg.num_hidden_layers, *shape)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    def __call__(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None, *, dropout_rng=None,
                 capture: tuple[str, ...] | list[str] = (), edits: dict | None = None):
        """Logits for numpy or jax inputs. Outside a trace it runs a cached jitted forward pass.

        With `capture` (names from CAPTURE_NAMES) returns (logits, {name: [L, ...] array});
        `edits` patch or steer the residual stream (build them with `phi2_jax.interpret`).
        """
        args = [None if a is None else jnp.asarray(a) for a in (input_ids, attention_mask, position_ids, segment_ids)]
        if args[0].ndim != 2:
            raise ValueError(f"input_ids must be [batch, time], got shape {tuple(args[0].shape)}.")
        unknown = set(capture) - set(CAPTURE_NAMES)
        if unknown:
            raise ValueError(f"cannot capture {sorted(unknown)}; expected some of {', '.join(CAPTURE_NAMES)}.")
        capture = tuple(capture)
        if any(isinstance(a, jax.core.Tracer) for a in [*args, dropout_rng, self.embed_tokens.get_value()]):
            out = self.run(*args, dropout_rng=dropout_rng, capture=capture, edits=edits)
        else:
            graphdef, state = nnx.split(self)
            out = _jitted_run(graphdef, state, *args, dropout_rng=dropout_rng, capture=capture, edits=edits)
        return (out["logits"], out["captures"]) if capture else out["logits"]


CAPTURE_NAMES = ("residual", "attn_out", "mlp_out", "mlp_act", "attn_probs")


@functools.partial(jax.jit, static_argnums=0, static_argnames="capture")
def _jitted_run(graphdef, state, input_ids, attention_mask, position_ids, segment_ids, *, dropout_rng, capture, edits):
    model = nnx.merge(graphdef, state)
    out = model.run(input_ids, attention_mask, position_ids, segment_ids, dropout_rng=dropout_rng, capture=capture,
                    edits=edits)
    return {"logits": out["logits"], "captures": out["captures"]}


# ----------------------------------------------------------------------------- creation
def abstract_model(config: PhiConfig, mesh: Mesh | None = None) -> Phi:
    """The model with ShapeDtypeStructs instead of arrays: full-size shapes at no memory cost."""
    return nnx.eval_shape(lambda: Phi(config, rngs=nnx.Rngs(0), mesh=mesh))


def create_model(config: PhiConfig, *, mesh: Mesh | None = None, seed: int = 0) -> Phi:
    """A randomly initialised model, created directly in its sharded layout over `mesh`.

    Initialisation runs under `jax.jit` with `out_shardings`, so each device
    only ever materialises its own slice of every weight.
    """
    graphdef, abstract_state = nnx.split(abstract_model(config, mesh))
    out_shardings = state_shardings(abstract_state, mesh) if mesh is not None else None

    @functools.partial(jax.jit, out_shardings=out_shardings)
    def init():
        return nnx.state(Phi(config, rngs=nnx.Rngs(seed), mesh=mesh))

    return nnx.merge(graphdef, init())


def place_state(model_abstract: Phi, arrays: dict, mesh: Mesh | None) -> Phi:
    """A model whose weights are `arrays` (a pure dict shaped like `nnx.to_pure_dict(state)`), placed on `mesh`.

    Each array is put straight onto its sharding (host numpy -> device slices),
    never gathered whole on one device.
    """
    graphdef, abstract_state = nnx.split(model_abstract)
    if mesh is not None:
        shardings = nnx.to_pure_dict(state_shardings(abstract_state, mesh))
        arrays = jax.tree.map(lambda a, s: jax.device_put(a, s), arrays, shardings)
    else:
        arrays = jax.tree.map(jnp.asarray, arrays)
    state = abstract_state
    nnx.replace_by_pure_dict(state, arrays)
    return nnx.merge(graphdef, state)


def param_count(model: Phi) -> int:
    """Number of parameters (adapters included)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
