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

`model(ids, ...)` is the public call; `Phi.run` the one internal entry, which
also threads a KV cache (`kv_cache.py`), captures intermediates per layer and
applies residual-stream edits (`interpret.py`). Its pieces (`embed`,
`layer_inputs`, `DecoderLayer`, `head`) are what `inference/` recomposes for
fast decoding.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from phi2_jax.config import PhiConfig
from phi2_jax.model.attention import attention, attention_mask, attention_probs
from phi2_jax.model.dense import dense
from phi2_jax.model.kv_cache import KVCache
from phi2_jax.model.lora import init_lora_a
from phi2_jax.sharding import constrain, state_shardings

Array = jax.Array
CAPTURE_NAMES = ("residual", "attn_out", "mlp_out", "mlp_act", "attn_probs")


# ----------------------------------------------------------------------------- pieces
_GELU_C = math.sqrt(2.0 / math.pi)


@jax.custom_jvp
def gelu_new(x: Array) -> Array:
    """GPT-2 / Phi gelu, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

    A custom JVP (not a VJP, which would block forward-mode autodiff) whose
    tangent is slope(x) * dx: reverse mode then keeps one [.., 4E] array per
    layer (the slope) where autodiff of the formula kept five.
    """
    return 0.5 * x * (1.0 + jnp.tanh(_GELU_C * (x + 0.044715 * x**3)))


@gelu_new.defjvp
def _gelu_new_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    t = jnp.tanh(_GELU_C * (x + 0.044715 * x**3))
    # d/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
    slope = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _GELU_C * (1.0 + 3 * 0.044715 * x * x)
    return 0.5 * x * (1.0 + t), slope * dx


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


def default_positions(batch: int, length: int, attention_mask=None, segment_ids=None, xp=jnp):
    """Position ids when none are given (`xp` = jnp or np: the data pipeline computes them on the host).

    Plain batch: 0..T-1. With a padding mask: the count of real tokens before
    each token, so a left-padded row gets the positions it would have alone
    (what transformers' `generate` does). With segment ids (packed documents):
    the offset inside each document.
    """
    index = xp.broadcast_to(xp.arange(length)[None, :], (batch, length))
    if segment_ids is not None:
        starts = xp.concatenate([xp.ones((batch, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
        starts_at = xp.where(starts, index, 0)
        return index - (jax.lax.cummax(starts_at, axis=1) if xp is jnp else np.maximum.accumulate(starts_at, axis=1))
    if attention_mask is not None:
        return xp.maximum(xp.cumsum(attention_mask.astype(xp.int32), axis=1) - 1, 0)
    return index


def dropout(x: Array, rate: float, rng: Array | None) -> Array:
    """Inverted dropout; identity when `rng` is None (evaluation) or rate is 0."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class LayerInputs:
    """What every layer reads besides the residual stream, computed once per call."""

    cos: Array                     # rotary tables [B, T, rotary_dim], float32
    sin: Array
    attention_mask: Array | None   # [B, S]: real tokens (or, decoding, filled cache slots)
    segment_ids: Array | None      # [B, T]: packed documents never attend across each other
    cache_index: Array | int       # decoding: this call's first cache slot
    capture: tuple[str, ...]       # names from CAPTURE_NAMES to return per layer


# ----------------------------------------------------------------------------- parameter modules
def _normal(std: float):
    return jax.nn.initializers.normal(std)


class LoRAParam(nnx.Param):
    """A low-rank adapter weight: the only parameters a LoRA fine-tune trains."""


def affine(x: Array, kernel: Array, bias: Array, compute_dtype, out_dtype, weight_grad: str = "native") -> Array:
    """x @ kernel + bias with the matmul in `compute_dtype` (float32 accumulation), the result in `out_dtype`."""
    y = dense(x, kernel, compute_dtype, out_dtype, weight_grad)
    return y + bias.astype(y.dtype)


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
        self.weight_grad = config.weight_grad
        self.lora_scale = 0.0
        if lora and config.lora_rank:
            rank = config.lora_rank
            self.lora_a = LoRAParam(init_lora_a(rngs.params(), (*stack, d_in, rank), pdt),
                                    logical_axes=(*stack_names, names[0], "lora_rank"))
            self.lora_b = LoRAParam(jnp.zeros((*stack, rank, d_out), pdt), logical_axes=(*stack_names, "lora_rank", names[1]))
            self.lora_scale = config.lora_alpha / rank

    def __call__(self, x: Array, out_dtype=None) -> Array:
        dtype = self.compute_dtype
        y = affine(x, self.kernel.get_value(), self.bias.get_value(), dtype, out_dtype or dtype, self.weight_grad)
        if self.lora_scale:
            low = jnp.einsum("...i,ir->...r", x.astype(dtype), self.lora_a.get_value().astype(dtype))
            y = y + (self.lora_scale * jnp.einsum("...r,ro->...o", low, self.lora_b.get_value().astype(dtype))).astype(y.dtype)
        return y


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

    def __call__(self, q: Array, k: Array, v: Array, inputs: LayerInputs, mesh: Mesh | None,
                 cache: tuple[KVCache, Array | int] | None) -> tuple[Array, KVCache | None, Array | None]:
        """(output [B, T, E], updated cache or None, probabilities [B, N, T, S] or None) from projected q/k/v [B, T, *].

        cache: (the KV cache, this layer's index) while decoding.
        """
        cfg = self.config
        batch, length, _ = q.shape
        q = q.reshape(batch, length, cfg.num_attention_heads, cfg.head_dim)
        k = k.reshape(batch, length, cfg.num_key_value_heads, cfg.head_dim)
        v = v.reshape(batch, length, cfg.num_key_value_heads, cfg.head_dim)
        if cfg.qk_layernorm:
            q = self.q_layernorm(q, q.dtype)
            k = self.k_layernorm(k, k.dtype)
        q = apply_rotary(q, inputs.cos, inputs.sin)
        k = apply_rotary(k, inputs.cos, inputs.sin)
        q = constrain(q, ("act_batch", "act_length", "act_heads", "act_head_dim"), mesh)
        k = constrain(k, ("act_batch", "act_length", "act_kv_heads", "act_head_dim"), mesh)
        q_offset, kv_layout, new_cache = 0, "bskd", None
        if cache is not None:
            # Decoding: this call's keys/values go into the cache, then attention reads all of its slots.
            kv_cache, layer = cache
            new_cache, k, v = kv_cache.write(layer, k, v, inputs.cache_index)
            q_offset, kv_layout = inputs.cache_index, kv_cache.layout
        out = attention(q, k, v, backend=cfg.attention_backend, q_offset=q_offset, kv_mask=inputs.attention_mask,
                        q_segment_ids=inputs.segment_ids, kv_segment_ids=inputs.segment_ids, kv_layout=kv_layout)
        probs = None
        if "attn_probs" in inputs.capture:
            assert cache is None, "attention probabilities are captured by a full forward pass, not while decoding"
            mask = attention_mask(batch, length, length, kv_mask=inputs.attention_mask,
                                  q_segment_ids=inputs.segment_ids, kv_segment_ids=inputs.segment_ids)
            probs = attention_probs(q, k, mask)
        return self.dense(out.reshape(batch, length, -1)), new_cache, probs


class MLP(nnx.Module):
    """fc1 -> activation (gelu_new for Phi) -> fc2, both with bias."""

    def __init__(self, config: PhiConfig, *, stack: tuple[int, ...], rngs: nnx.Rngs):
        self.fc1 = Linear(config.hidden_size, config.intermediate_size, ("embed", "mlp"), stack=stack, config=config,
                          rngs=rngs, lora="fc1" in config.lora_targets)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size, ("mlp", "embed"), stack=stack, config=config,
                          rngs=rngs, lora="fc2" in config.lora_targets)
        self.activation = config.hidden_act

    def __call__(self, fc1_out: Array, mesh: Mesh | None) -> tuple[Array, Array]:
        """(output [B, T, E], activation after the nonlinearity [B, T, F]) from fc1(x) [B, T, F]."""
        y = constrain(fc1_out, ("act_batch", "act_length", "act_mlp"), mesh)
        act = ACTIVATION_FNS[self.activation](y)
        return self.fc2(act), act


class DecoderLayer(nnx.Module):
    """The parallel block. Built with `stack=(L,)` it holds all L layers' weights stacked."""

    def __init__(self, config: PhiConfig, *, stack: tuple[int, ...], rngs: nnx.Rngs):
        self.input_layernorm = LayerNorm(config.hidden_size, "norm", stack=stack, config=config)
        self.self_attn = Attention(config, stack=stack, rngs=rngs)
        self.mlp = MLP(config, stack=stack, rngs=rngs)
        self.resid_pdrop = config.resid_pdrop

    def project_inputs(self, x: Array) -> tuple[Array, Array, Array, Array]:
        """q, k, v and fc1(x): the four projections of the normed input."""
        return self.self_attn.q_proj(x), self.self_attn.k_proj(x), self.self_attn.v_proj(x), self.mlp.fc1(x)

    def __call__(self, h: Array, inputs: LayerInputs, rng: Array | None, mesh: Mesh | None,
                 cache: tuple[KVCache, Array | int] | None = None) -> tuple[Array, KVCache | None, dict[str, Array]]:
        """(new residual stream [B, T, E], updated cache, this layer's captured intermediates)."""
        x = self.input_layernorm(h, h.dtype)
        q, k, v, fc1_out = self.project_inputs(x)
        attn_out, cache, probs = self.self_attn(q, k, v, inputs, mesh, cache)
        mlp_out, mlp_act = self.mlp(fc1_out, mesh)
        attn_rng, mlp_rng = jax.random.split(rng) if rng is not None else (None, None)
        attn_out = dropout(attn_out, self.resid_pdrop, attn_rng)
        mlp_out = dropout(mlp_out, self.resid_pdrop, mlp_rng)
        h = h + attn_out.astype(h.dtype) + mlp_out.astype(h.dtype)
        available = {"attn_out": attn_out, "mlp_out": mlp_out, "mlp_act": mlp_act, "attn_probs": probs}
        return h, cache, {name: available[name] for name in inputs.capture if name in available}


_REMAT_POLICIES = {
    "full": None,  # save nothing inside a layer: recompute all of it in the backward pass
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class ForwardOutput(NamedTuple):
    logits: Array                  # float32 [B, T, V]
    cache: KVCache | None          # the updated KV cache when one was given
    captures: dict[str, Array]     # name -> [L, ...] stacked over layers


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

    def __call__(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None, *, dropout_rng=None,
                 capture: tuple[str, ...] | list[str] = (), edits: dict | None = None):
        """Float32 logits [B, T, V] for input_ids [B, T] (numpy or jax; traceable inside your own jit / grad).

        attention_mask [B, T]: 1 for real tokens, 0 for padding (left or right).
        segment_ids [B, T]: document ids of packed sequences; no attention across them.
        dropout_rng: a PRNG key turns dropout on (training); None means deterministic.
        capture: names from CAPTURE_NAMES; then returns (logits, {name: [L, ...] array}).
        edits: residual-stream interventions after each layer (build them with `phi2_jax.model.interpret`).
        Outside a trace it runs a cached jitted forward pass.
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
        return (out.logits, out.captures) if capture else out.logits

    def run(self, input_ids: Array, attention_mask: Array | None = None, position_ids: Array | None = None,
            segment_ids: Array | None = None, *, dropout_rng: Array | None = None, cache: KVCache | None = None,
            cache_index: Array | int = 0, capture: tuple[str, ...] = (), edits: dict[str, Array] | None = None
            ) -> ForwardOutput:
        """The forward pass with everything optional (traced code only).

        cache: a `KVCache`; the T new tokens are written at slots [cache_index, cache_index + T)
          and `attention_mask` is then the [B, S] mask of valid cache slots (this step's included).
        edits: {'replace_mask' [L, B, T], 'replace_value' [L, B, T, E], 'add' [L, B, T, E]}.
        """
        inputs = self.layer_inputs(input_ids.shape, attention_mask, position_ids, segment_ids, cache_index, capture)
        embed_rng, layers_rng = jax.random.split(dropout_rng) if dropout_rng is not None else (None, None)
        h = self.embed(input_ids, embed_rng)
        h, cache, captures = self.scan_layers(h, inputs, layers_rng, cache, edits)
        return ForwardOutput(self.head(h), cache, captures)

    def layer_inputs(self, shape: tuple[int, int], attention_mask=None, position_ids=None, segment_ids=None,
                     cache_index: Array | int = 0, capture: tuple[str, ...] = ()) -> LayerInputs:
        if position_ids is None:
            position_ids = default_positions(*shape, attention_mask, segment_ids)
        cos, sin = rotary_tables(position_ids, self.config.rotary_dim, self.config.rope_theta)
        return LayerInputs(cos, sin, attention_mask, segment_ids, cache_index, tuple(capture))

    def embed(self, input_ids: Array, rng: Array | None = None) -> Array:
        """The residual stream's start [B, T, E] in the compute dtype."""
        h = jnp.take(self.embed_tokens.get_value(), input_ids, axis=0).astype(self.config.compute_dtype)
        h = dropout(h, self.config.embd_pdrop, rng)
        return constrain(h, ("act_batch", "act_length", "act_embed"), self.mesh)

    def scan_layers(self, h: Array, inputs: LayerInputs, rng: Array | None, cache: KVCache | None,
                    edits: dict[str, Array] | None = None) -> tuple[Array, KVCache | None, dict[str, Array]]:
        """All layers over the stacked weights in one `lax.scan` (rematerialised per the config)."""
        mesh = self.mesh
        graphdef, stacked = nnx.split(self.layers)

        def one_layer(carry, xs):
            h, cache = carry
            layer = nnx.merge(graphdef, xs["params"])
            index = xs["index"]
            layer_rng = jax.random.fold_in(rng, index) if rng is not None else None
            # The cache rides in the carry so that XLA updates it in place (as a scan output it would be
            # copied whole at every decoding step).
            h, cache, captured = layer(h, inputs, layer_rng, mesh, (cache, index) if cache is not None else None)
            if "edits" in xs:
                e = xs["edits"]
                h = jnp.where(e["replace_mask"][..., None], e["replace_value"].astype(h.dtype), h)
                h = h + e["add"].astype(h.dtype)
            h = constrain(h, ("act_batch", "act_length", "act_embed"), mesh)
            if "residual" in inputs.capture:
                captured["residual"] = h
            return (h, cache), captured

        if self.config.remat != "none":
            one_layer = jax.checkpoint(one_layer, policy=_REMAT_POLICIES[self.config.remat], prevent_cse=False)
        xs = {"params": stacked, "index": jnp.arange(self.config.num_hidden_layers)}
        if edits is not None:
            xs["edits"] = edits
        (h, cache), captures = jax.lax.scan(one_layer, (h, cache), xs)
        return h, cache, captures

    def head(self, h: Array) -> Array:
        """Float32 logits [B, T, V] from the residual stream."""
        h = self.final_layernorm(h, self.config.compute_dtype)
        logits = self.lm_head(h, out_dtype=jnp.float32)
        return constrain(logits, ("act_batch", "act_length", "act_vocab"), self.mesh)

    def init_cache(self, batch: int, max_length: int, *, layout: str = "bskd", per_layer: bool = False,
                   dtype=None) -> KVCache:
        """An empty KV cache for `batch` sequences of up to `max_length` tokens, in the compute dtype."""
        cfg = self.config
        return KVCache.empty(cfg.num_hidden_layers, batch, max_length, cfg.num_key_value_heads, cfg.head_dim,
                             dtype or jnp.dtype(cfg.compute_dtype), layout, per_layer)


@functools.partial(jax.jit, static_argnums=0, static_argnames="capture")
def _jitted_run(graphdef, state, input_ids, attention_mask, position_ids, segment_ids, *, dropout_rng, capture, edits):
    model = nnx.merge(graphdef, state)
    out = model.run(input_ids, attention_mask, position_ids, segment_ids, dropout_rng=dropout_rng, capture=capture,
                    edits=edits)
    return out._replace(cache=None)


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
