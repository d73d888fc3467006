"""`python -m phi2_jax.train [CONFIG.yaml] [section.key=value ...] [--dry-run [--target T] [--devices N]]`

With no arguments: trains the `tiny` Phi on the Python standard library's
source code (no download), with a sentencepiece tokenizer trained on first use.

    config -> mesh -> params + optimiser (sharded at init) -> Grain iterator
           -> jitted step -> progress / TensorBoard / checkpoints

Resumes from the newest checkpoint in `run_dir`; SIGTERM saves at the current
step and exits 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from phi2_jax.errors import ConfigError, exit_on_user_error
from phi2_jax.util.host_memory import keep_freed_memory_on_cpu
from phi2_jax.util.progress import log_info_to_stderr
from phi2_jax.training.run_config import RunConfig, load_run_config, validate

log = logging.getLogger("phi2_jax.training.trainer")

SAMPLE_PROMPTS = ("def fibonacci(n):\n", "import os\n\n\ndef list_files(path):\n", "class Stack:\n    def __init__(self):\n")


def initialize_distributed(dist) -> None:
    """`jax.distributed.initialize` from the config, or auto-detected on SLURM / Open MPI / Kubernetes."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU multi-process collectives
    if dist.coordinator:
        process_id = dist.process_id
        if process_id < 0 and "JOB_COMPLETION_INDEX" in os.environ:  # a Kubernetes Indexed Job's pod
            process_id = int(os.environ["JOB_COMPLETION_INDEX"])
        jax.distributed.initialize(dist.coordinator, dist.num_processes or None, process_id if process_id >= 0 else None)
        return
    multi = (int(os.environ.get("SLURM_NTASKS", "1")) > 1 or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
             or "JOB_COMPLETION_INDEX" in os.environ and "JAX_COORDINATOR_ADDRESS" in os.environ)
    if multi:
        jax.distributed.initialize()


class Trainer:
    """One training run: data, mesh, compiled steps and checkpoints for a validated `RunConfig`."""

    def __init__(self, config: RunConfig, model_config):
        import jax

        from phi2_jax.data.pipeline import build_splits, train_dataset, validation_batches
        from phi2_jax.training.optim import make_optimizer
        from phi2_jax.sharding import make_mesh
        from phi2_jax.training.step import build_steps, tuned_for_backend

        self.config, self.jax = config, jax
        t = config.train
        self.is_main = jax.process_index() == 0
        self.mesh = make_mesh({"data": config.mesh.data, "fsdp": config.mesh.fsdp, "tensor": config.mesh.tensor})
        self.model_config = model_config
        d = config.data
        # Everything that can refuse the config runs before run_dir is created.
        self.splits = build_splits(d.sources, d.tokenizer, d.seq_len, d.val_fraction, self.model_config.vocab_size,
                                   d.max_documents, jax.process_index(), jax.process_count())
        pc = jax.process_count()
        self.local_batch = t.batch_size // pc
        self.dataset = train_dataset(self.splits, self.local_batch, d.shuffle_seed, jax.process_index(), pc, d.workers)
        self.val_batches = validation_batches(self.splits, self.local_batch, t.eval_batches, jax.process_index(), pc)
        self.tx, self.schedule = make_optimizer(config.optim, t.steps)
        self.steps = build_steps(tuned_for_backend(self.model_config, jax.default_backend()), self.mesh, self.tx,
                                 self.schedule, t.seed, t.grad_accum, config.optim.z_loss)
        self.run_dir = Path(config.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.stop_requested = False

    # ------------------------------------------------------------------ state
    def _initial_params(self):
        from flax import nnx

        from phi2_jax.model.transformer import create_model

        source, seed = self.config.checkpoint.init_from, self.config.train.seed
        if not source:
            return nnx.to_pure_dict(nnx.state(create_model(self.model_config, mesh=self.mesh, seed=seed)))
        from phi2_jax.hf.layout import flatten, unflatten
        from phi2_jax.hf.loading import from_pretrained

        runtime = {k: getattr(self.model_config, k) for k in RUNTIME_FIELDS if k not in ("param_dtype",)}
        base = from_pretrained(source, mesh=self.mesh, dtype=self.model_config.param_dtype, **{**runtime, "lora_rank": 0})
        log.info("initialised from %s", source)
        params = nnx.to_pure_dict(nnx.state(base))
        if self.model_config.lora_rank:  # the base weights come from the source; adapters start fresh (B = 0)
            fresh = nnx.to_pure_dict(nnx.state(create_model(self.model_config, mesh=self.mesh, seed=seed)))
            params = unflatten({**flatten(fresh), **flatten(params)})
        return params

    def _global_batch(self, local: dict) -> dict:
        """This process's rows -> one global array per key, split [grad_accum, micro, T] over the mesh."""
        jax, t = self.jax, self.config.train
        out = {}
        for key, value in local.items():
            value = value.reshape(t.grad_accum, self.local_batch // t.grad_accum, *value.shape[1:])
            shape = (t.grad_accum, t.batch_size // t.grad_accum, *value.shape[2:])
            out[key] = jax.make_array_from_process_local_data(self.steps.batch_sharding, value, shape)
        return out

    def _eval_batch(self, local: dict) -> dict:
        jax = self.jax
        return {k: jax.make_array_from_process_local_data(self.steps.eval_sharding, v, (self.config.train.batch_size, *v.shape[1:]))
                for k, v in local.items()}

    def evaluate(self, params) -> float | None:
        if not self.val_batches:
            return None
        losses = [float(self.steps.eval_loss(params, self._eval_batch(b))) for b in self.val_batches]
        return sum(losses) / len(losses)

    # ------------------------------------------------------------------ loop
    def run(self) -> dict:
        """Resumes or initialises, trains to `train.steps` (or SIGTERM), and returns a summary."""
        import numpy as np

        from phi2_jax.checkpoint.run_checkpoints import RunCheckpoints
        from phi2_jax.training.metrics import EventWriter, device_peak_flops, plot_loss_curve, progress_line, train_flops_per_token

        jax, cfg, t = self.jax, self.config, self.config.train
        checkpoints = RunCheckpoints(self.run_dir, cfg.checkpoint.keep, cfg.checkpoint.async_save)
        iterator = iter(self.dataset)
        restored = checkpoints.restore_latest(self.steps.abstract_params, self.steps.abstract_opt_state)
        if restored is not None:
            start, params, opt_state, data_state, saved_meta = restored
            saved_workers = saved_meta.get("run_config", {}).get("data", {}).get("workers", cfg.data.workers)
            if saved_workers != cfg.data.workers:  # Grain's iterator state differs with and without workers
                raise ConfigError(f"{self.run_dir} was trained with data.workers={saved_workers}; resume it with the same "
                                  f"value (got {cfg.data.workers}) so the data iterator continues where it stopped.")
            iterator.set_state(data_state)
            self._say(f"resumed from step {start} in {checkpoints.directory}")
        else:
            start = 0
            params = self._initial_params()
            opt_state = self.steps.init_opt(params)
        if self.is_main:
            (self.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        meta = {"model_config": self.model_config.to_dict(), "run_config": cfg.to_dict(),
                "tokenizer": self.splits.tokenizer.source}
        events = EventWriter(self.run_dir, self.is_main)
        history = self._load_history()
        peak, peak_source = device_peak_flops(self.model_config.compute_dtype)
        flops_per_step = train_flops_per_token(self.model_config, cfg.data.seq_len) * t.batch_size * cfg.data.seq_len
        self._say(f"model {self.model_config.num_params():,} params | mesh {dict(self.mesh.shape)} | "
                  f"{jax.device_count()} devices, {jax.process_count()} processes | peak {peak / 1e9:,.1f} GFLOP/s "
                  f"per device ({peak_source})")

        previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        step, window_start, window_steps = start, time.perf_counter(), 0
        run_start = time.perf_counter()
        try:
            while step < t.steps and not self.stop_requested:
                batch = self._global_batch(next(iterator))
                params, opt_state, metrics = self.steps.train_step(params, opt_state, batch, step)
                step += 1
                window_steps += 1
                if step % t.log_every == 0 or step == t.steps:
                    metrics = jax.device_get(metrics)
                    elapsed = time.perf_counter() - window_start
                    tokens_per_s = window_steps * t.batch_size * cfg.data.seq_len / elapsed
                    mfu = window_steps * flops_per_step / elapsed / (peak * jax.device_count())
                    eta = (t.steps - step) * elapsed / window_steps
                    self._say(progress_line(step, t.steps, float(metrics["loss"]), float(metrics["lr"]),
                                            float(metrics["grad_norm"]), tokens_per_s, mfu, eta))
                    values = {"train/loss": float(metrics["loss"]), "train/lr": float(metrics["lr"]),
                              "train/grad_norm": float(metrics["grad_norm"]), "perf/tokens_per_s": tokens_per_s,
                              "perf/mfu": mfu}
                    events.scalars(step, values)
                    history["train"].append((step, float(metrics["loss"])))
                    self._append_metrics({"step": step, **values})
                    window_start, window_steps = time.perf_counter(), 0
                if step % t.eval_every == 0 or step == t.steps:
                    val = self.evaluate(params)
                    if val is not None:
                        self._say(f"step {step}  val_loss {val:.4f}  val_ppl {np.exp(val):.2f}")
                        events.scalars(step, {"val/loss": val, "val/perplexity": float(np.exp(val))})
                        history["validation"].append((step, val))
                        self._append_metrics({"step": step, "val/loss": val})
                if step % cfg.checkpoint.every == 0 or step == t.steps or self.stop_requested:
                    checkpoints.save(step, params, opt_state, iterator.get_state(), {**meta, "step": step})
            if self.stop_requested:
                self._say(f"SIGTERM: saved a checkpoint at step {step}; exiting")
            checkpoints.wait()
        finally:
            signal.signal(signal.SIGTERM, previous_handler)
            checkpoints.close()
            events.close()
        result = {"step": step, "seconds": time.perf_counter() - run_start,
                  "final_loss": history["train"][-1][1] if history["train"] else None}
        if step >= t.steps and self.is_main:
            plot_loss_curve(history, self.run_dir / "loss_curve.png")
            self._say(f"loss curve: {self.run_dir / 'loss_curve.png'}")
            if t.samples:
                self._print_samples(params)
        return result

    def _on_sigterm(self, signum, frame):
        self.stop_requested = True

    def _say(self, line: str) -> None:
        if self.is_main:
            print(line, flush=True)

    def _append_metrics(self, record: dict) -> None:
        if self.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _load_history(self) -> dict:
        """Loss history from metrics.jsonl, so a resumed run's plot covers the whole run."""
        history = {"train": [], "validation": []}
        path = self.run_dir / "metrics.jsonl"
        if path.is_file():
            for line in path.read_text().splitlines():
                record = json.loads(line)
                if "train/loss" in record:
                    history["train"].append((record["step"], record["train/loss"]))
                if "val/loss" in record:
                    history["validation"].append((record["step"], record["val/loss"]))
        return history

    def _print_samples(self, params) -> None:
        from flax import nnx

        from phi2_jax.inference.greedy import greedy_complete

        model = nnx.merge(self.steps.graphdef, self.jax.device_get(params))
        tok = self.splits.tokenizer
        print("samples (greedy):", flush=True)
        for prompt in SAMPLE_PROMPTS:
            ids = greedy_complete(model, tok.encode(prompt), 48, tok.eos_id)
            print("-" * 60 + "\n" + prompt + tok.decode(ids), flush=True)


def source_model_config(config: RunConfig):
    """With `checkpoint.init_from`, the architecture comes from that model and the YAML sets run-time fields only."""
    if not config.checkpoint.init_from:
        return None
    from phi2_jax.hf.loading import load_config

    runtime = {k: v for k, v in config.model.overrides.items() if k in RUNTIME_FIELDS}
    return load_config(config.checkpoint.init_from).replace(**runtime)


# Fields of the model config a fine-tune may set on top of the architecture it starts from.
RUNTIME_FIELDS = ("param_dtype", "compute_dtype", "remat", "attention_backend", "resid_pdrop", "embd_pdrop",
                  "attention_dropout", "lora_rank", "lora_alpha", "lora_targets")


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


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    command_line = argv is None  # a command owns its process; a call from Python leaves the process as it is
    log_info_to_stderr(command_line)
    if command_line:
        keep_freed_memory_on_cpu("train")  # before JAX starts its threads
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
    result = Trainer(config, model_config).run()
    if jax.process_index() == 0:
        print(f"done: {result['step']} steps in {result['seconds']:.0f}s, final loss {result['final_loss']}")


if __name__ == "__main__":
    main()
