"""Rows for post-training: SFT examples packed with their loss weights, preference pairs padded side by side.

SFT rows have the pre-training batch's keys (input_ids, targets, segment_ids,
positions) plus `weights` (float32): the loss weight of each target. Examples
are packed whole, in order, into rows of `length` inputs (a new row when the
next one does not fit); segment ids keep attention inside each example and
positions restart at each, so a packed row computes what the examples would
one by one. The tail of a row is padding: segment 0, weight 0.

Preference rows: `chosen_*` and `rejected_*` [B, length] (input_ids, targets,
weights), right-padded with weight 0. Causal attention never lets a real token
see the padding after it, so no mask is needed.
"""

from __future__ import annotations

import numpy as np

from phi2_jax.data.formats import Example, PreferencePair
from phi2_jax.model.transformer import default_positions


def pack_examples(examples: list[Example], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Packed SFT rows [N, length] of input_ids, targets, weights, segment_ids, positions."""
    rows: list[list[Example]] = [[]]
    used = 0
    for example in examples:
        need = len(example.ids) - 1
        if need > length:
            raise ValueError(f"an example of {len(example.ids)} tokens does not fit rows of {length} inputs.")
        if used + need > length:
            rows.append([])
            used = 0
        rows[-1].append(example)
        used += need
    rows = [r for r in rows if r]
    out = {"input_ids": np.full((len(rows), length), pad_id, np.int32),
           "targets": np.full((len(rows), length), pad_id, np.int32),
           "weights": np.zeros((len(rows), length), np.float32),
           "segment_ids": np.zeros((len(rows), length), np.int32)}
    for r, row in enumerate(rows):
        at = 0
        for segment, example in enumerate(row, start=1):
            n = len(example.ids) - 1
            out["input_ids"][r, at:at + n] = example.ids[:-1]
            out["targets"][r, at:at + n] = example.ids[1:]
            out["weights"][r, at:at + n] = example.weights[1:]
            out["segment_ids"][r, at:at + n] = segment
            at += n
    out["positions"] = default_positions(len(rows), length, segment_ids=out["segment_ids"], xp=np).astype(np.int32)
    return out


def preference_rows(pairs: list[PreferencePair], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """{chosen,rejected}_{input_ids,targets,weights} [B, length] for a list of preference pairs."""
    out = {}
    for side, rows in zip(("chosen", "rejected"), zip(*(pair.rows() for pair in pairs))):
        ids = np.full((len(rows), length + 1), pad_id, np.int32)
        weights = np.zeros((len(rows), length + 1), np.float32)
        for r, example in enumerate(rows):
            if len(example.ids) > length + 1:
                raise ValueError(f"a {side} row of {len(example.ids)} tokens does not fit {length} inputs.")
            ids[r, :len(example.ids)] = example.ids
            weights[r, :len(example.ids)] = example.weights
        out[f"{side}_input_ids"], out[f"{side}_targets"], out[f"{side}_weights"] = ids[:, :-1], ids[:, 1:], weights[:, 1:]
    return out
