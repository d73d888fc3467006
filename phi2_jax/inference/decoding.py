"""How a decoding step runs on each backend: the KV cache's layout, and layer copies made once per call.

Decoding reads every weight once per token, so its speed is the bytes it moves.
Two choices were measured on XLA:CPU (docs/benchmarks.md, "Why the code is as it
is") and are made there only; other backends run the model's own path (scanned
layers, the 'bskd' cache) until they are measured:
  * the cache layout: 'heads_flat' [B*K, S, D] on the CPU (read and updated in place
    by plain batched matmuls), 'bskd' [B, S, K, D] elsewhere (what attention reads
    with no per-token transpose);
  * layer copies: scanning over the stacked weights makes XLA copy each layer's
    slice out before its matmuls, so a step moves the weights twice. A copy of the
    layers made once per `generate` call, unrolled, reads each weight once; each
    copy's q/k/v/fc1 kernels are concatenated into one (`FusedInputLayer`), since
    all four read the same normed input: one matrix-vector product instead of four.
These are transformations of the parameter tree; the model's forward pass is unchanged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from phi2_jax.model.kv_cache import KVCache
from phi2_jax.model.transformer import DecoderLayer, Phi, affine

_MEASURED_CACHE_LAYOUTS = {"cpu": "heads_flat"}
_LAYER_COPIES_MEASURED_ON = ("cpu",)


def cache_layout(backend: str) -> str:
    return _MEASURED_CACHE_LAYOUTS.get(backend, "bskd")


def use_layer_copies(model: Phi, backend: str, requested: bool | None) -> bool:
    """`requested` when given; else on the backends where copies were measured to pay, if memory allows."""
    if requested is not None:
        return requested
    return backend in _LAYER_COPIES_MEASURED_ON and layer_copy_fits(model)


def layer_copy_fits(model: Phi) -> bool:
    """Whether a second copy of the layer weights takes at most half of the first device's free memory."""
    arrays = jax.tree.leaves(nnx.state(model.layers))
    needed = sum(int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize for a in arrays)
    return needed <= free_device_memory() / 2


def free_device_memory() -> float:
    """Bytes free on the first device: its allocator's limit less what is in use, or the host's free RAM on the CPU."""
    stats = jax.local_devices()[0].memory_stats() or {}  # addressable here
    if "bytes_limit" in stats:
        return stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return float("inf")  # not Linux: no reading, so no reason to refuse


def can_fuse_input_projections(model: Phi) -> bool:
    """Not where those projections carry LoRA adapters, nor on a mesh that splits them over a 'tensor' axis
    (concatenating sharded kernels would interleave the shards)."""
    cfg = model.config
    adapted = cfg.lora_rank and set(cfg.lora_targets) & {"q_proj", "k_proj", "v_proj", "fc1"}
    return not adapted and (model.mesh is None or model.mesh.shape.get("tensor", 1) == 1)


class FusedInputLayer(DecoderLayer):
    """A decoding copy of one layer whose q/k/v/fc1 kernels are one [E, E + 2 kv_dim + F] matrix.

    Built from a per-layer `DecoderLayer`, whose modules it takes over; their own
    q/k/v/fc1 kernels are emptied, so the copy costs no more memory than the layer.
    """

    def __init__(self, layer: DecoderLayer):  # reuses the layer's modules rather than building new ones
        self.input_layernorm, self.self_attn, self.mlp = layer.input_layernorm, layer.self_attn, layer.mlp
        self.resid_pdrop = layer.resid_pdrop
        linears = (self.self_attn.q_proj, self.self_attn.k_proj, self.self_attn.v_proj, self.mlp.fc1)
        self.input_kernel = nnx.Variable(jnp.concatenate([lin.kernel.get_value() for lin in linears], axis=-1))
        self.input_bias = nnx.Variable(jnp.concatenate([lin.bias.get_value() for lin in linears], axis=-1))
        self.split_at = tuple(int(s) for s in np.cumsum([lin.kernel.get_value().shape[-1] for lin in linears[:3]]))
        for lin in linears:
            lin.kernel.set_value(jnp.zeros((0,), lin.kernel.get_value().dtype))

    def project_inputs(self, x):
        dtype = self.mlp.fc1.compute_dtype
        y = affine(x, self.input_kernel.get_value(), self.input_bias.get_value(), dtype, dtype)
        return tuple(jnp.split(y, self.split_at, axis=-1))


def _unstacked_layers(model: Phi, fuse: bool) -> list[DecoderLayer]:
    graphdef, stacked = nnx.split(model.layers)
    layers = [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], stacked))
              for i in range(model.config.num_hidden_layers)]
    return [FusedInputLayer(layer) for layer in layers] if fuse else layers


@functools.partial(jax.jit, static_argnums=(0, 2))
def _copied_layer_states(graphdef, state, fuse: bool) -> list:
    # A program of its own, so that each copy is a buffer of its own: as temporaries of the decoding
    # program they would share one large block, mapped (and page-faulted) afresh at every call.
    return [nnx.state(layer) for layer in _unstacked_layers(nnx.merge(graphdef, state), fuse)]


def layer_copies(model: Phi) -> tuple[nnx.GraphDef, list]:
    """(the per-layer graphdef, each layer's weights as arrays of their own), input projections fused where allowed."""
    fuse = can_fuse_input_projections(model)
    graphdef, state = nnx.split(model)
    key = (graphdef, fuse)
    if key not in _LAYER_GRAPHDEFS:  # tracing the unstacking costs more than the copy: once per model structure
        abstract = nnx.eval_shape(lambda m: _unstacked_layers(m, fuse), model)
        _LAYER_GRAPHDEFS[key] = nnx.split(abstract[0])[0]
    return _LAYER_GRAPHDEFS[key], _copied_layer_states(graphdef, state, fuse)


_LAYER_GRAPHDEFS: dict = {}


def decode_forward(model: Phi, layers: tuple[nnx.GraphDef, list] | None, ids, kv_mask, positions, cache: KVCache,
                   cache_index) -> tuple[jax.Array, KVCache]:
    """Float32 logits [B, V] of the last of ids [B, T] (written at cache slots cache_index...), and the cache.

    layers: `layer_copies(model)` to run the unrolled copies, None for the model's scanned layers.
    """
    if layers is None:
        out = model.run(ids, kv_mask, positions, cache=cache, cache_index=cache_index)
        return out.logits[:, -1], out.cache
    layer_graphdef, layer_states = layers
    inputs = model.layer_inputs(ids.shape, kv_mask, positions, None, cache_index)
    h = model.embed(ids)
    for index, state in enumerate(layer_states):
        h, cache, _ = nnx.merge(layer_graphdef, state)(h, inputs, None, model.mesh, (cache, index))
    return model.head(h[:, -1:])[:, 0], cache
