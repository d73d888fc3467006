"""The static KV cache that decoding writes in place, in one of two memory layouts.

  'bskd'        [B, S, K, D] per layer: the layout attention reads directly (and cuDNN's);
                the default everywhere except XLA:CPU.
  'heads_flat'  [B*K, S, D] per layer: XLA:CPU reads it with plain batched matmuls and
                updates it in place; reshaping it back to [B, K, S, D] made XLA copy the
                whole cache at every step there (measured: docs/benchmarks.md, "Decoding:
                the CPU KV-cache layout").

Layers' caches are either stacked along a leading axis (the scanned layers index them
dynamically) or kept as a list of per-layer arrays (decoding's unrolled layer copies, which
read their own array without slicing a stack). `inference/` chooses the layout and form.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array
LAYOUTS = ("bskd", "heads_flat")


@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer; `layout` and the stacked/list form are static."""

    k: Array | list[Array]
    v: Array | list[Array]
    layout: str = "bskd"

    @classmethod
    def empty(cls, num_layers: int, batch: int, max_length: int, num_kv_heads: int, head_dim: int, dtype,
              layout: str = "bskd", per_layer: bool = False) -> KVCache:
        assert layout in LAYOUTS, layout
        shape = ((batch, max_length, num_kv_heads, head_dim) if layout == "bskd"
                 else (batch * num_kv_heads, max_length, head_dim))
        if per_layer:
            return cls([jnp.zeros(shape, dtype) for _ in range(num_layers)],
                       [jnp.zeros(shape, dtype) for _ in range(num_layers)], layout)
        return cls(jnp.zeros((num_layers, *shape), dtype), jnp.zeros((num_layers, *shape), dtype), layout)

    def write(self, layer: Array | int, k: Array, v: Array, index: Array | int) -> tuple[KVCache, Array, Array]:
        """Stores this call's k/v [B, T, K, D] at slots [index, index + T) of `layer`; returns the updated
        cache and that layer's keys and values over all slots, in this cache's layout."""
        k_store, k_all = self._write(self.k, layer, k, index)
        v_store, v_all = self._write(self.v, layer, v, index)
        return KVCache(k_store, v_store, self.layout), k_all, v_all

    def _write(self, store, layer, new: Array, index):
        if self.layout == "heads_flat":
            batch, length, heads, head_dim = new.shape
            new = new.transpose(0, 2, 1, 3).reshape(batch * heads, length, head_dim)
        start = (0, index) + (0,) * (new.ndim - 2)  # the slot axis is the second in both layouts
        if isinstance(store, list):  # unrolled layers: `layer` is a Python int
            written = jax.lax.dynamic_update_slice(store[layer], new.astype(store[layer].dtype), start)
            return [*store[:layer], written, *store[layer + 1:]], written
        store = jax.lax.dynamic_update_slice(store, new[None].astype(store.dtype), (layer, *start))
        return store, jax.lax.dynamic_index_in_dim(store, layer, keepdims=False)


jax.tree_util.register_dataclass(KVCache, data_fields=["k", "v"], meta_fields=["layout"])
