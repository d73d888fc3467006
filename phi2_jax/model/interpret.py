"""Interpretability helpers: residual-stream edits (patching, steering) and the logit lens.

    logits, acts = model(ids, capture=["residual", "attn_probs"])     # acts["residual"]: [L, B, T, E]
    edits = Edits(model.config, batch=1, length=T)
    edits.replace(layer=5, position=3, value=other_acts["residual"][5, 0, 3])   # activation patching
    edits.add(layer=10, vector=steering_vector * 4.0)                          # steering, all positions
    patched = model(ids, edits=edits.arrays())
    lens = logit_lens(model, acts["residual"])                                 # [L, B, T, V]

Edits act on the residual stream right after the named layer, inside the
layer scan, so they work under `jax.jit` and on a sharded model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from phi2_jax.config import PhiConfig


class Edits:
    """Builds the dense edit arrays the model's scan consumes: {'replace_mask', 'replace_value', 'add'}."""

    def __init__(self, config: PhiConfig, batch: int, length: int):
        layers, hidden = config.num_hidden_layers, config.hidden_size
        self.num_layers = layers
        self.replace_mask = np.zeros((layers, batch, length), bool)
        self.replace_value = np.zeros((layers, batch, length, hidden), np.float32)
        self.additive = np.zeros((layers, batch, length, hidden), np.float32)

    def _check(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is outside the model's {self.num_layers} layers.")

    def replace(self, layer: int, position: int, value, row: int | None = None) -> "Edits":
        """Sets the residual stream after `layer` at `position` (of `row`, or every row) to `value` [E]."""
        self._check(layer)
        rows = slice(None) if row is None else row
        self.replace_mask[layer, rows, position] = True
        self.replace_value[layer, rows, position] = np.asarray(value, np.float32)
        return self

    def add(self, layer: int, vector, position: int | None = None, row: int | None = None) -> "Edits":
        """Adds `vector` [E] to the residual stream after `layer` (at `position`, or at every position)."""
        self._check(layer)
        rows = slice(None) if row is None else row
        positions = slice(None) if position is None else position
        self.additive[layer, rows, positions] += np.asarray(vector, np.float32)
        return self

    def arrays(self) -> dict[str, jax.Array]:
        return {"replace_mask": jnp.asarray(self.replace_mask), "replace_value": jnp.asarray(self.replace_value),
                "add": jnp.asarray(self.additive)}


def logit_lens(model, residuals: jax.Array) -> jax.Array:
    """Float32 logits [L, B, T, V] read off each layer's residual stream through the final LayerNorm and head."""
    dtype = jnp.dtype(model.config.compute_dtype)
    return jax.vmap(lambda h: model.lm_head(model.final_layernorm(h, dtype), out_dtype=jnp.float32))(residuals)
