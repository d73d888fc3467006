"""DPO's reference log-probs for full fine-tuning: computed in one pass before training, kept with the run.

With LoRA the reference is the policy with its adapters off (training/objectives.py), free. Without
adapters it is the starting model, which training overwrites: rather than hold a second, frozen copy
of every weight through the run, its log-probs of every pair's chosen and rejected responses are
computed once, before the first step, and ride in the rows as `ref_chosen_logps` /
`ref_rejected_logps` (shuffled and sharded with them). They are saved to
`run_dir/reference_logps.npz` (numpy, no pickle) so a resumed run, whose weights are no longer the
reference, reads them back instead of reloading the starting model.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FILE = "reference_logps.npz"


def _fingerprint(sources, start: str = "") -> str:
    """Names the rows the log-probs belong to and the model that computed them (`start`: its description, e.g.
    checkpoint.init_from and the model config): a change of data, seq_len or starting model computes them again."""
    digest = hashlib.sha256(start.encode())
    for source in sources:
        for key in ("chosen_input_ids", "rejected_input_ids", "chosen_weights", "rejected_weights"):
            if key in source.rows:
                digest.update(np.ascontiguousarray(source.rows[key]).tobytes())
    return digest.hexdigest()


def attach_reference_logps(splits, run_dir: Path, initial_params: Callable[[], dict], graphdef, mesh,
                           batch_size: int, is_main: bool, start: str = "") -> dict | None:
    """Adds ref_{chosen,rejected}_logps to every row source of `splits` (train sources, then validation).

    Reads them from run_dir when they were computed for these rows; else computes them with
    `initial_params()` (the starting weights) and saves them (process 0). Returns the parameters it
    computed with (to start training from without loading them twice), or None when it read the file.
    """
    sources = [*splits.train, splits.validation]
    fingerprint = _fingerprint(sources, start)
    path = Path(run_dir) / FILE
    if path.is_file():
        saved = _read(path)
        if saved is not None and saved.get("fingerprint") != fingerprint:
            log.warning("%s was computed for other rows or another starting model (the data, data.seq_len, "
                        "checkpoint.init_from or the model settings changed); computing them again", path)
        elif saved is None or not _fits(saved, sources):
            log.warning("%s cannot be read (damaged or not written by phi2_jax); computing the reference log-probs "
                        "again with the starting weights", path)
        else:
            for i, source in enumerate(sources):
                if len(source):
                    source.rows["ref_chosen_logps"] = saved[f"chosen_{i}"]
                    source.rows["ref_rejected_logps"] = saved[f"rejected_{i}"]
            log.info("DPO reference log-probs read from %s", path)
            return None
    params = initial_params()
    logps = pair_logps_of_rows(graphdef, params, mesh, sources, batch_size)
    arrays = {"fingerprint": np.asarray(fingerprint)}
    for i, (source, (chosen, rejected)) in enumerate(zip(sources, logps)):
        if len(source):
            source.rows["ref_chosen_logps"], source.rows["ref_rejected_logps"] = chosen, rejected
            arrays[f"chosen_{i}"], arrays[f"rejected_{i}"] = chosen, rejected
    if is_main:
        tmp = path.with_name(f".{FILE}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        tmp.replace(path)  # never a half-written file where a resume would read it
    log.info("DPO reference log-probs of %d pairs computed with the starting weights and saved to %s",
             sum(len(s) for s in sources), path)
    return params


def _read(path: Path) -> dict | None:
    """The saved arrays ({'fingerprint': str, 'chosen_<i>': ..., ...}), or None when the file is not a readable
    .npz with a fingerprint (truncated, empty, something else)."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            out = {name: saved[name] for name in saved.files}
        out["fingerprint"] = str(out["fingerprint"])
        return out
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def _fits(saved: dict, sources) -> bool:
    """Whether the saved file holds [N] float log-probs for both sides of every non-empty source."""
    return all(np.shape(saved.get(f"{side}_{i}")) == (len(source),)
               for i, source in enumerate(sources) if len(source) for side in ("chosen", "rejected"))


def pair_logps_of_rows(graphdef, params: dict, mesh, sources, batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(chosen, rejected) summed log-probs [N] of every row of each source, in global batches of `batch_size`.

    Every process holds every row; each passes its share of a batch and receives the whole result.
    """
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from phi2_jax.training.objectives import pair_logps
    from phi2_jax.training.step import batch_sharding

    compute = jax.jit(lambda p, batch: pair_logps(nnx.merge(graphdef, p), batch),
                      out_shardings=NamedSharding(mesh, PartitionSpec()))
    processes, index = jax.process_count(), jax.process_index()
    local = batch_size // processes
    out = []
    for source in sources:
        n = len(source)
        chosen, rejected = np.zeros(n, np.float32), np.zeros(n, np.float32)
        for start in range(0, n, batch_size):
            rows = [(start + index * local + r) % n for r in range(local)]  # the last batch wraps round
            batch = {k: jax.make_array_from_process_local_data(
                        batch_sharding(mesh, 2, accumulated=False), source.rows[k][rows], (batch_size, *v.shape[1:]))
                     for k, v in source.rows.items() if k.startswith(("chosen_", "rejected_"))}
            c, r = compute(params, batch)
            take = min(batch_size, n - start)
            chosen[start:start + take], rejected[start:start + take] = np.asarray(c)[:take], np.asarray(r)[:take]
        out.append((chosen, rejected))
    return out
