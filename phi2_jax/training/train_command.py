"""`python -m phi2_jax.train [CONFIG.yaml] [section.key=value ...] [--dry-run [--target T] [--devices N]]`

With no arguments: trains the `tiny` Phi on the Python standard library's
source code (no download), with a sentencepiece tokenizer trained on first use.

    config -> mesh -> params + optimiser (sharded at init) -> Grain iterator
           -> jitted step -> progress / TensorBoard / checkpoints

The command's part: arguments, the distributed runtime, process-wide settings (allocator, logging,
SIGTERM), the config's validation, then `training/trainer.py`'s `Trainer` (or `training/dry_run.py`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from phi2_jax.checkpoint.run_checkpoints import CheckpointWriteError, await_acknowledgements
from phi2_jax.config import RUNTIME_FIELDS
from phi2_jax.errors import ConfigError, exit_on_user_error
from phi2_jax.training.preemption import StopRequest, install_sigterm_handler
from phi2_jax.training.run_config import RunConfig, load_run_config, validate
from phi2_jax.training.trainer import Trainer
from phi2_jax.util.host_memory import keep_freed_memory_on_cpu
from phi2_jax.util.progress import log_info_to_stderr


def initialize_distributed(dist) -> None:
    """`jax.distributed.initialize` from the config, or auto-detected on SLURM / Open MPI / Kubernetes."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU multi-process collectives
    # JAX's preemption notifier would take SIGTERM over from our handler (in C++, silently); the trainer
    # agrees on a stop step itself (training/preemption.py).
    jax.config.update("jax_enable_preemption_service", False)
    if dist.coordinator:
        process_id = dist.process_id
        if process_id < 0 and "JOB_COMPLETION_INDEX" in os.environ:  # a Kubernetes Indexed Job's pod
            process_id = int(os.environ["JOB_COMPLETION_INDEX"])
        jax.distributed.initialize(dist.coordinator, dist.num_processes or None, process_id if process_id >= 0 else None)
    else:
        multi = (int(os.environ.get("SLURM_NTASKS", "1")) > 1 or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
                 or "JOB_COMPLETION_INDEX" in os.environ and "JAX_COORDINATOR_ADDRESS" in os.environ)
        if multi:
            jax.distributed.initialize()
    if jax.process_count() > 1:
        use_barriers_for_async_checkpoints()


def use_barriers_for_async_checkpoints() -> None:
    """Orbax's barriers through the coordination service, not device collectives (an absl flag: process-wide).

    By default Orbax syncs processes with `multihost_utils.sync_global_devices`, an all-device collective,
    and an async save runs it from its background thread while the main thread's train step and stop vote
    run theirs: two programs' collectives in flight at once, which processes can order differently. On
    gloo (CPU) a two-process run aborted so ("Received data size doesn't match expected size"), and
    NCCL has the same ordering rule. The coordination service's barrier uses no device.
    """
    from absl import flags
    from orbax.checkpoint._src.multihost import multihost  # defines the flag

    del multihost
    flags.FLAGS.experimental_orbax_use_distributed_barrier = True


def source_model_config(config: RunConfig):
    """With `checkpoint.init_from`, the architecture comes from that model and the YAML sets run-time fields only."""
    if not config.checkpoint.init_from:
        return None
    from phi2_jax.hf.loading import load_config

    runtime = {k: v for k, v in config.model.overrides.items() if k in RUNTIME_FIELDS}
    return load_config(config.checkpoint.init_from).replace(**runtime)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m phi2_jax.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", help="YAML run config (default: the tiny run on the standard library)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=50")
    parser.add_argument("--dry-run", action="store_true",
                        help="compile the train step from shapes only, report per-device memory, kernels and "
                             "collectives, run nothing (docs/gpu_compile.md)")
    parser.add_argument("--target", default="cpu", metavar="{cpu,a100-80g,h100-80g,h200}",
                        help="with --dry-run: compile for this device (GPU targets need jax[cuda12], no GPU; "
                             "aliases a100, h100)")
    parser.add_argument("--devices", type=int, default=0,
                        help="with --dry-run: the device count of the planned run (default: the mesh's product, "
                             "else 8)")
    parser.add_argument("--dump-hlo", default="", metavar="FILE",
                        help="with --dry-run: write the compiled program's HLO text here")
    args = parser.parse_intermixed_args(argv)  # overrides may follow the options
    if args.config and "=" in args.config:  # only overrides were given
        args.overrides.insert(0, args.config)
        args.config = None
    return args


def quiet_repeated_orbax_reports() -> None:
    """Drops the echoes of a failed Orbax read or write (a command's process-wide change).

    When one fails (a damaged checkpoint being set aside, a full disk), Orbax closes its event loop
    while tensorstore still holds callbacks for it, and each prints `RuntimeError: Event loop is
    closed`, dozens in all; Orbax's worker threads and asyncio's collected tasks also log the error
    with a traceback each. The failure itself reaches the main thread, which reports (or handles) it once.
    """
    from phi2_jax.errors import is_disk_full

    def first_report(record: logging.LogRecord) -> bool:
        if "_SignalingThread.run() raised an exception" in record.getMessage():
            return False  # re-raised where the caller waits for the thread
        return not (record.exc_info and record.exc_info[1] is not None and is_disk_full(record.exc_info[1]))

    logging.getLogger("absl").addFilter(first_report)  # Orbax logs through absl
    # Orbax's write tasks that failed alongside the reported one are collected at exit, and asyncio
    # logs each as "Task exception was never retrieved" with its traceback.
    logging.getLogger("asyncio").addFilter(first_report)
    previous = sys.unraisablehook  # tensorstore reports an exception in its callback as "unraisable"

    def hook(report):
        if isinstance(report.exc_value, RuntimeError) and str(report.exc_value) == "Event loop is closed":
            return
        previous(report)

    sys.unraisablehook = hook


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    command_line = argv is None  # a command owns its process; a call from Python leaves the process as it is
    log_info_to_stderr(command_line)
    if command_line:
        keep_freed_memory_on_cpu("train")  # before JAX starts its threads
        quiet_repeated_orbax_reports()
    from phi2_jax.data.pipeline import allow_grain_workers

    allow_grain_workers()  # a process-wide change (absl flags), which the command, not the library, makes
    config = load_run_config(args.config, args.overrides)
    if args.dry_run:  # compiles for the planned devices; starts no distributed runtime, writes no run folder
        from phi2_jax.training import dry_run

        target = dry_run.resolve_target(args.target)
        devices = args.devices or dry_run.default_device_count(config)
        dry_run.prepare_command(target, devices)
        model_config = validate(config, devices, source_model_config(config))
        dry_run.dry_run(config, model_config, target, devices, label=args.config or "the default config",
                        hlo_path=args.dump_hlo or None)
        return
    initialize_distributed(config.distributed)
    import jax

    model_config = validate(config, jax.device_count(), source_model_config(config))
    if Path(config.run_dir).exists() and not Path(config.run_dir).is_dir():
        raise ConfigError(f"run_dir {config.run_dir} exists and is not a folder.")
    stop = StopRequest()
    if command_line:
        install_sigterm_handler(stop)  # from here on a SIGTERM stops at an agreed step (or before the first)
        if jax.process_index() != 0:  # one process's INFO lines speak for the job
            logging.getLogger("phi2_jax").setLevel(logging.WARNING)
    try:
        result = Trainer(config, model_config, stop).run()
    except CheckpointWriteError as error:
        if not command_line or jax.process_count() == 1:
            raise
        # Every process stops with the same sentence (checkpoint/run_checkpoints.py). The failed save's Orbax
        # threads may wait at a barrier for processes that have stopped, and Python would join them at exit:
        # the process ends here instead, its logs closed and its run lock released on the way out of run().
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        await_acknowledgements()
        os._exit(2)
    if jax.process_index() == 0 and result["steps_run"]:
        print(f"done: {result['step']} steps in {result['seconds']:.0f}s, final loss {result['final_loss']}")


if __name__ == "__main__":
    main()
