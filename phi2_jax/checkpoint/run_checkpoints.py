"""Orbax checkpoints: the training run's (async, keep K, resume) and the model-only format.

A step directory holds items:
  params     the model weights (tensorstore / OCDBT; each process writes, and on
             restore each device reads, only its own slices), stored one entry
             per layer (`layers/<i>/...`) so that a converter can write and read
             them a layer at a time; in memory they are stacked for `lax.scan`
  opt_state  the optimiser state (training checkpoints only)
  data       the Grain iterator state (training checkpoints only)
  meta       JSON: the model config, the step, and the run config
A converted checkpoint is a step directory with just `params` and `meta`, so
`from_pretrained` and `checkpoint.init_from` read both the same way.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from phi2_jax.errors import UserInputError, is_disk_full

log = logging.getLogger(__name__)

TRAIN_ITEMS = ("params", "opt_state", "data", "meta")


class RunCheckpoints:
    """`run_dir/checkpoints/<step>/`: async saves, keep the newest `keep`, restore the newest readable one."""

    def __init__(self, run_dir: str | Path, keep: int, async_save: bool = True):
        self.directory = Path(run_dir).absolute() / "checkpoints"
        # Several processes save through Orbax's asynchronous path even when asked to block (save then waits), so
        # that a failed write is noticed by polling (`_await_previous_save`), not inside one of Orbax's barriers.
        self.blocking = not async_save
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save or jax.process_count() > 1,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=TRAIN_ITEMS)
        self.failed = False  # a save failed: the manager's threads are not to be waited for
        self._background = _BackgroundFailures()
        # Orbax logs through absl; first in line, as a filter that drops the report (the command's) stops the rest.
        logging.getLogger("absl").filters.insert(0, self._background)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, params: Any, opt_state: Any, data_state: dict, meta: dict) -> None:
        """Starts saving `step` (asynchronously if so configured); a full disk is one sentence, not a traceback."""
        with self._disk_errors(step):
            self._await_previous_save()
            self.manager.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(split_layers(params)), opt_state=ocp.args.StandardSave(opt_state),
                data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)), force=True)
            if self.blocking and jax.process_count() > 1:
                self._finish_saving()

    def newest_meta(self) -> tuple[int, dict] | None:
        """(step, meta) of the newest checkpoint whose `meta` item reads, or None."""
        for step in reversed(self.steps()):
            try:
                return step, read_meta(self.directory / str(step))
            except Exception:  # a damaged meta: the checkpoint is unreadable and restore_latest will say so
                continue
        return None

    def _disk_errors(self, step: int):
        return _DiskErrors(self, step)

    def restore_latest(self, abstract_params: Any, abstract_opt_state: Any) -> tuple[int, Any, Any, dict, dict] | None:
        """(step, params, opt_state, data_state, meta) of the newest checkpoint that restores, or None.

        A damaged newest checkpoint is reported and the one before it used, so a
        crash during a save costs at most one checkpoint interval.
        """
        damaged = []
        for step in reversed(self.steps()):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(split_layers(abstract_params)),
                    opt_state=ocp.args.StandardRestore(abstract_opt_state),
                    data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
            except Exception as error:  # orbax / tensorstore raise many types for a damaged checkpoint
                log.warning("checkpoint at step %d in %s could not be restored (%s: %s); trying the previous one",
                            step, self.directory, type(error).__name__, str(error).splitlines()[0][:200])
                damaged.append(step)
                continue
            self._set_aside(damaged)
            params = stack_layers(restored["params"], abstract_params)
            return step, params, restored["opt_state"], restored["data"], restored["meta"]
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Moves damaged checkpoints to `checkpoints_damaged/` (kept for a post-mortem, out of the resume path)."""
        if not steps:
            return
        if jax.process_index() == 0:
            aside = self.directory.parent / "checkpoints_damaged"
            aside.mkdir(exist_ok=True)
            for step in steps:
                (self.directory / str(step)).rename(aside / f"{step}-{int(time.time())}")
                log.warning("moved the damaged checkpoint of step %d to %s", step, aside)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("phi2_jax: damaged checkpoints set aside")
        self.manager.reload()

    def wait(self) -> None:
        with self._disk_errors(-1):
            self._finish_saving()

    def _finish_saving(self) -> None:
        self._await_previous_save()
        self.manager.wait_until_finished()

    def close(self) -> None:
        logging.getLogger("absl").removeFilter(self._background)
        if self.failed and jax.process_count() > 1:  # Orbax's threads may wait at a barrier for processes that
            return                                      # have stopped: not joined
        self.manager.close()

    def _await_previous_save(self) -> None:
        """Several processes, asynchronous saves: waits for the save in flight by polling, so that a process whose
        write failed raises at once, and one whose write succeeded stops when another's failed.

        Orbax's own wait joins its background threads, and after a one-sided failure those wait at different
        barriers (the failed process's at the finalising one, the others' at the write-complete one) until
        Orbax's 20-minute barrier timeout: a two-process run with a full disk hung there. The failed process's
        error is then held by a thread that waits at that barrier, so it is read from Orbax's report of it.
        """
        if jax.process_count() == 1:
            return
        while self.manager.is_saving_in_progress():
            self.manager.check_for_errors()  # this process's background error, if not yet taken by Orbax
            if self._background.error is not None:
                raise self._background.error
            reported = failure_reported()
            if reported is not None:
                raise CheckpointWriteError(reported)
            time.sleep(0.2)
        self.manager.check_for_errors()


class _BackgroundFailures(logging.Filter):
    """Keeps the error of a failed background write, which Orbax logs (with the exception) as it happens."""

    def __init__(self):
        super().__init__()
        self.error: BaseException | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if (record.exc_info and record.exc_info[1] is not None and self.error is None
                and "in background save thread" in record.getMessage()):
            self.error = record.exc_info[1]
        return True


class CheckpointWriteError(UserInputError):
    """A checkpoint could not be written. In a multi-process job every process stops with the same sentence, and
    the command ends the process without joining Orbax's threads (training/train_command.py)."""


_FAILURE_KEY = "phi2_jax/checkpoint_write_failed"  # in the job's coordination service


def _coordination_client():
    from jax._src import distributed  # the key-value store jax.distributed's coordination service keeps

    return distributed.global_state.client


def report_failure(sentence: str) -> None:
    """Tells the job's other processes that a checkpoint write failed, with the sentence they should stop with."""
    client = _coordination_client()
    if client is not None:
        try:
            client.key_value_set(_FAILURE_KEY, sentence)
        except Exception:  # noqa: BLE001 - another process reported first; theirs is the one everyone reads
            pass
        _acknowledge(client)  # it knows: no one waits for it to read the report


def failure_reported() -> str | None:
    """The sentence of a checkpoint write another process reported as failed, if any (then acknowledged)."""
    client = _coordination_client()
    if client is None:
        return None
    try:
        sentence = client.key_value_try_get(_FAILURE_KEY)
    except Exception:  # noqa: BLE001 - NOT_FOUND: nothing reported
        return None
    _acknowledge(client)
    return sentence


def _acknowledge(client) -> None:
    """Marks this process as knowing of the reported failure (`await_acknowledgements` counts the marks)."""
    client.key_value_set(f"{_FAILURE_KEY}/seen/{jax.process_index()}", "1")


def await_acknowledgements(seconds: float = 10.0) -> None:
    """Waits (a bounded time) until every other process has read the reported failure: the coordination service
    ends the others as soon as one process exits, which would cut their sentence off."""
    client = _coordination_client()
    deadline = time.monotonic() + seconds
    while client is not None and time.monotonic() < deadline:
        try:
            seen = client.key_value_dir_get(f"{_FAILURE_KEY}/seen/")
        except Exception:  # noqa: BLE001 - none yet
            seen = []
        if len(seen) >= jax.process_count():
            return
        time.sleep(0.1)


class _DiskErrors:
    """Turns a save's full-disk error into one sentence naming the folder and what to do; with several processes,
    any write error, told to the other processes so that they stop too."""

    def __init__(self, checkpoints: RunCheckpoints, step: int):
        self.checkpoints, self.step = checkpoints, step

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        several = jax.process_count() > 1
        if isinstance(error, CheckpointWriteError):  # another process's failure, reported: already a sentence
            self.checkpoints.failed = True
            return False
        if error is None or not (is_disk_full(error) or several):
            return False
        self.checkpoints.failed = True
        saved = [s for s in self.checkpoints.steps() if s != self.step]
        # An asynchronous save's error surfaces at the next save or wait: name the step it surfaced at.
        which = f" (by step {self.step})" if self.step >= 0 else ""
        newest = f"the newest complete checkpoint is {saved[-1] if saved else 'none'}"
        if is_disk_full(error):
            sentence = (f"writing a checkpoint{which} to {self.checkpoints.directory} failed: the disk is full (or a "
                        f"quota or file-size limit was reached); {newest}. Free space and run the same command again "
                        f"to resume.")
        else:
            sentence = (f"writing a checkpoint{which} to {self.checkpoints.directory} failed on process "
                        f"{jax.process_index()}: {type(error).__name__}: {error}; {newest}.")
        if several:
            report_failure(sentence)
        raise CheckpointWriteError(sentence) from None


# ----------------------------------------------------------------------------- model-only reads
def is_step_dir(path: Path) -> bool:
    return (path / "params").is_dir() and (path / "meta").is_dir()


def step_dirs(path: str | Path) -> list[Path]:
    """The step directories a path offers, newest first: a step directory itself, or a run / checkpoints folder's steps.

    Readers that may fall back past a damaged newest checkpoint (as the trainer does) try them in this order.
    """
    path = Path(path)
    if is_step_dir(path):
        return [path]
    for folder in (path / "checkpoints", path):
        if folder.is_dir():
            steps = sorted((int(p.name), p) for p in folder.iterdir() if p.name.isdigit() and is_step_dir(p))
            if steps:
                return [p for _, p in reversed(steps)]
    return []


def resolve_step_dir(path: str | Path) -> Path | None:
    """The step directory for a run folder (its newest step), a checkpoints folder, or a step directory."""
    found = step_dirs(path)
    return found[0] if found else None


def read_meta(step_dir: Path) -> dict:
    return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir.absolute() / "meta")


def restore_params(step_dir: Path, abstract_params: Any) -> Any:
    """Restores `params` onto the shardings carried by `abstract_params` (stacked ShapeDtypeStructs with .sharding)."""
    stored = ocp.StandardCheckpointer().restore(step_dir.absolute() / "params", split_layers(abstract_params))
    return stack_layers(stored, abstract_params)


def save_meta(step_dir: Path, meta: dict) -> None:
    ocp.Checkpointer(ocp.JsonCheckpointHandler()).save(step_dir.absolute() / "meta", args=ocp.args.JsonSave(meta))


# ----------------------------------------------------------------------------- stacked <-> per-layer
def _drop_layer_axis(x: Any) -> Any:
    sharding = x.sharding
    if isinstance(sharding, NamedSharding):
        sharding = NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sharding)


def split_layers(params: dict) -> dict:
    """{'layers': stacked [L, ...]} -> {'layers': {'0': [...], ..., 'L-1': [...]}}; arrays or ShapeDtypeStructs."""
    stacked = params["layers"]
    first = jax.tree.leaves(stacked)[0]
    out = {k: v for k, v in params.items() if k != "layers"}
    if isinstance(first, jax.ShapeDtypeStruct):
        layer = jax.tree.map(_drop_layer_axis, stacked)
        out["layers"] = {str(i): layer for i in range(first.shape[0])}
    else:
        out["layers"] = {str(i): jax.tree.map(lambda x: x[i], stacked) for i in range(first.shape[0])}
    return out


def stack_layers(stored: dict, abstract_params: dict) -> dict:
    """Inverse of `split_layers`, placed on `abstract_params`' shardings (jitted: no host round trip)."""
    per_layer = stored["layers"]
    layers = [per_layer[str(i)] for i in range(len(per_layer))]
    shardings = jax.tree.map(lambda x: x.sharding, abstract_params["layers"])

    @functools.partial(jax.jit, out_shardings=shardings)
    def stack(layers):
        return jax.tree.map(lambda *xs: jnp.stack(xs), *layers)

    return {**{k: v for k, v in stored.items() if k != "layers"}, "layers": stack(layers)}
