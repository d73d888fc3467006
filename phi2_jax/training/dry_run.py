"""`python -m phi2_jax.train CONFIG --dry-run [--target T] [--devices N]`: compile the train step, run nothing.

Compiles the real train step from shapes alone (no weights, no data, no run
folder) and reports what it needs per device, before anyone books a pod:

  * `--target cpu` (the default): XLA:CPU over N fake CPU devices; the memory
    figures are the CPU compiler's, a check that the config and mesh compile.
  * `--target a100-80g | h100-80g | h200` (aliases a100, h100): XLA's GPU
    compiler for N abstract GPUs described by the target files in
    `gpu_targets/`, on any machine, no GPU needed (it needs `jax[cuda12]`, the
    `gpu` extra). The program is the one a pod would run: cuDNN attention,
    NCCL collectives, XLA:GPU's fusion and buffer assignment.

`--devices N` is the device count of the run being planned, what
`jax.device_count()` will be there: the mesh resolves over N as in training
(an axis of -1 takes what the others leave) and the global batch is the
config's `train.batch_size`, split over mesh.data x mesh.fsdp, so a batch that
does not divide is refused as training would refuse it. Default: the mesh's
product when no axis is -1, else 8 (one node). GPU targets are laid out
8 per node (N up to 8, or a multiple of 8).

Per-device bytes of parameters, optimiser state and batch come from each
array's shard shape under its sharding; beside them, XLA's memory analysis of
the compiled program (arguments, outputs, donated aliases, temporaries,
generated code). On a GPU target the step must fit the device's memory
(`device_memory_size` in the target file) or the config is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.resources
import importlib.util
import math
import os
import re
import time
from pathlib import Path

from phi2_jax.errors import ConfigError, UserInputError
from phi2_jax.training.compiled_hlo import HloProgram

GPU_TARGETS = ("a100-80g", "h100-80g", "h200")
TARGETS = ("cpu", *GPU_TARGETS)
ALIASES = {"a100": "a100-80g", "h100": "h100-80g", "h200-141g": "h200"}
GPUS_PER_NODE = 8
# JAX's allocator takes this share of a GPU unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise.
DEFAULT_MEMORY_FRACTION = 0.75
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Target:
    """What the dry run compiles for: the CPU, or a GPU described by an XLA `GpuTargetConfig` text proto."""

    name: str
    proto: str | None = None            # the GpuTargetConfig text; None for the CPU
    device_kind: str = "cpu"
    memory_bytes: int | None = None     # per device; None: no capacity to check against
    compute_capability: tuple[int, int] = (0, 0)

    @property
    def is_gpu(self) -> bool:
        return self.proto is not None


def target_names() -> list[str]:
    """Every name --target accepts, aliases included."""
    return [*TARGETS, *ALIASES]


def resolve_target(name: str) -> Target:
    """The `Target` called `name` (or an alias); the GPU ones are read from the package's gpu_targets/ files."""
    canonical = ALIASES.get(name, name)
    if canonical not in TARGETS:
        raise UserInputError(f"--target {name} is unknown; expected one of {', '.join(target_names())}.")
    if canonical == "cpu":
        return Target("cpu")
    proto = (importlib.resources.files("phi2_jax.training") / "gpu_targets" / f"{canonical}.txtpb").read_text()
    memory = re.search(r"^\s*device_memory_size:\s*(\d+)", proto, re.M)
    kind = re.search(r'^device_description_str:\s*"([^"]*)"', proto, re.M)
    capability = re.search(r"cuda_compute_capability\s*\{([^}]*)\}", proto)
    major = re.search(r"major:\s*(\d+)", capability.group(1)) if capability else None
    minor = re.search(r"minor:\s*(\d+)", capability.group(1)) if capability else None
    return Target(canonical, proto, kind.group(1) if kind else canonical, int(memory.group(1)) if memory else None,
                  (int(major.group(1)) if major else 0, int(minor.group(1)) if minor else 0))


def default_device_count(config) -> int:
    """The mesh's product when it fixes every axis, else one node of 8."""
    sizes = (config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    return math.prod(sizes) if all(isinstance(s, int) and s >= 1 for s in sizes) else GPUS_PER_NODE


def cuda_plugin_available() -> bool:
    """Whether JAX's CUDA plugin (`jax[cuda12]`) is installed: XLA's GPU compiler comes with it."""
    return importlib.util.find_spec("jax_cuda12_plugin") is not None


def prepare_command(target: Target, devices: int) -> None:
    """Process-wide settings the dry run needs before JAX starts its backends. For command entry points only.

    Either way only JAX's CPU backend starts: a GPU target's devices are abstract
    (a topology), and with the CPU as the only platform the CUDA plugin loads its
    compiler without probing for a GPU (which fails on a machine without one).
    """
    import jax

    if not target.is_gpu:
        # Only the CPU backend reads this, and only before its first use.
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    jax.config.update("jax_platforms", "cpu")


def target_devices(target: Target, devices: int) -> list:
    """`devices` devices to compile for: the first CPU devices, or abstract GPUs of the target, 8 per node."""
    import jax

    if devices < 1:
        raise UserInputError(f"--devices must be at least 1, got {devices}.")
    if not target.is_gpu:
        available = jax.devices("cpu")
        if len(available) < devices:
            raise UserInputError(f"--devices {devices} needs {devices} CPU devices but JAX started with "
                                 f"{len(available)}; run `python -m phi2_jax.train ... --dry-run`, which sets "
                                 f"--xla_force_host_platform_device_count before JAX starts.")
        return available[:devices]
    if not cuda_plugin_available():
        raise UserInputError(f"--target {target.name} needs XLA's GPU compiler, which comes with JAX's CUDA plugin: "
                             f"pip install 'jax[cuda12]=={jax.__version__}' (no GPU needed).")
    if devices > GPUS_PER_NODE and devices % GPUS_PER_NODE:
        raise UserInputError(f"--devices {devices} is not 1 to {GPUS_PER_NODE} or a multiple of {GPUS_PER_NODE}; "
                             f"GPU targets are laid out {GPUS_PER_NODE} to a node.")
    from jax.experimental import topologies

    nodes, per_node = (devices // GPUS_PER_NODE, GPUS_PER_NODE) if devices > GPUS_PER_NODE else (1, devices)
    topology = topologies.get_topology_desc(target.name, "cuda", target_config=target.proto,
                                            topology=f"1x{nodes}x{per_node}")
    return list(topology.devices)


def model_for_target(model_config, target: Target):
    """The model config with the attention backend the target would use, decided from the target, never by
    asking the runtime (a machine compiling for a GPU has none): cuDNN flash attention on a GPU for
    bfloat16/float16 compute and a head_dim it supports (multiple of 8, up to 128 on sm80, 256 on sm90)."""
    backend = model_config.attention_backend
    if not target.is_gpu:
        if backend == "cudnn":
            raise ConfigError(f"model.attention_backend 'cudnn' cannot compile for the cpu target; use "
                              f"--target {' / '.join(GPU_TARGETS)} or attention_backend 'xla'.")
        return model_config.replace(attention_backend="xla")
    head_limit = 256 if target.compute_capability >= (9, 0) else 128
    why = None
    if model_config.compute_dtype not in ("bfloat16", "float16"):
        why = f"compute_dtype {model_config.compute_dtype} is not bfloat16/float16"
    elif model_config.head_dim % 8 or model_config.head_dim > head_limit:
        why = f"head_dim {model_config.head_dim} is not a multiple of 8 up to {head_limit}"
    if backend == "cudnn" and why:
        raise ConfigError(f"model.attention_backend 'cudnn' cannot run on {target.name}: {why}; use 'auto' or 'xla'.")
    if backend == "auto":
        backend = "xla" if why else "cudnn"
    return model_config.replace(attention_backend=backend)


@contextlib.contextmanager
def cudnn_checks_answer_for(target: Target):
    """While tracing for a GPU target, JAX's cuDNN attention wrapper is told the target's compute capability.

    The wrapper (jax._src.cudnn.fused_attention_stablehlo) checks features against the compute capability of
    the running backend's first GPU: with none (this machine compiles for a GPU it does not have) every
    check says no, and packed documents ("Packed layout requires a GPU with at least Hopper architecture")
    fail to trace even for an H100. Its two checks answer from the target instead, and are put back after.
    """
    if not target.is_gpu:
        yield
        return
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

    def parse(capability: str) -> tuple[int, ...]:
        return tuple(int(x) for x in capability.split("."))

    saved = cudnn_attention.check_compute_capability, cudnn_attention.is_cuda_compute_capability_equal
    cudnn_attention.check_compute_capability = lambda capability: target.compute_capability >= parse(capability)
    cudnn_attention.is_cuda_compute_capability_equal = lambda capability: target.compute_capability == parse(capability)
    try:
        yield
    finally:
        cudnn_attention.check_compute_capability, cudnn_attention.is_cuda_compute_capability_equal = saved


def shard_bytes(tree, shardings) -> int:
    """Bytes one device holds of `tree`: each leaf's shard shape under its sharding, times its item size."""
    import jax

    leaves, shards = jax.tree.leaves(tree), jax.tree.leaves(shardings)
    assert len(leaves) == len(shards), (len(leaves), len(shards))
    return sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize for x, s in zip(leaves, shards))


def abstract_batch(objective: str, shape: tuple[int, int, int], mesh, with_reference: bool,
                   with_old_logps: bool = False) -> dict:
    """The train step's batch [grad_accum, micro, seq] per key as ShapeDtypeStructs, for `objective`: packed text
    (lm), packed text with loss weights (sft), chosen / rejected rows (dpo; with their reference log-probs when
    the run fine-tunes every weight, training/reference.py), or rollout rows (grpo; per-token reference and
    sampling-policy log-probs when a frozen reference / several passes need them, training/rollouts.py)."""
    import jax
    import jax.numpy as jnp

    from phi2_jax.training.step import batch_sharding

    def leaf(dtype, dims=3):
        return jax.ShapeDtypeStruct(shape[:dims], dtype, sharding=batch_sharding(mesh, dims))

    if objective == "dpo":
        batch = {f"{side}_{k}": leaf(jnp.float32 if k == "weights" else jnp.int32)
                 for side in ("chosen", "rejected") for k in ("input_ids", "targets", "weights")}
        if with_reference:
            batch.update(ref_chosen_logps=leaf(jnp.float32, 2), ref_rejected_logps=leaf(jnp.float32, 2))
        return batch
    batch = {k: leaf(jnp.int32) for k in ("input_ids", "targets", "segment_ids", "positions")}
    if objective == "grpo":
        batch.update(completion_mask=leaf(jnp.float32), advantages=leaf(jnp.float32, 2))
        for key, wanted in (("ref_logps", with_reference), ("old_logps", with_old_logps)):
            if wanted:
                batch[key] = leaf(jnp.float32)
        return batch
    if objective == "sft":
        batch["weights"] = leaf(jnp.float32)
    return batch


def compile_train_step(config, model_config, target: Target, devices: int) -> dict:
    """Compiles the train step for `devices` devices of `target` from shapes alone; returns the report
    (see `format_report`) with the compiled program's HLO text under "hlo"."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from phi2_jax.sharding import make_mesh
    from phi2_jax.training.metrics import run_update_flops
    from phi2_jax.training.optim import make_optimizer
    from phi2_jax.training.run_config import objective_options, row_length
    from phi2_jax.training.step import build_steps

    model_config = model_for_target(model_config, target)
    mesh = make_mesh(config.mesh,
                     devices=target_devices(target, devices))
    t = config.train
    micro = t.batch_size // t.grad_accum
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    if micro % data_parallel:
        raise ConfigError(f"the micro-batch of {micro} sequences (train.batch_size / train.grad_accum) is not divisible "
                          f"by the {data_parallel}-way data parallelism of {devices} devices.")
    tx, schedule = make_optimizer(config.optim, t.steps)
    steps = build_steps(model_config, mesh, tx, schedule, t.seed, t.grad_accum, config.optim.z_loss, t.objective,
                        objective_options(config))
    g, seq = config.grpo, row_length(config)
    batch = abstract_batch(t.objective, (t.grad_accum, micro, seq), mesh,
                           with_reference=not model_config.lora_rank and (t.objective == "dpo" or g.beta > 0),
                           with_old_logps=g.num_iterations > 1)
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec()))
    platform = "cuda" if target.is_gpu else "cpu"
    start = time.perf_counter()
    try:
        with cudnn_checks_answer_for(target):
            lowered = steps.train_step.trace(steps.abstract_params, steps.abstract_opt_state, batch, step).lower(
                lowering_platforms=(platform,))
    except NotImplementedError as error:  # JAX's cuDNN wrapper refusing a shape or feature for this GPU
        raise ConfigError(f"model.attention_backend '{model_config.attention_backend}' cannot compile for "
                          f"{target.device_kind} (target {target.name}): JAX's cuDNN attention says \"{error}\"; "
                          f"set model.attention_backend=xla for this target.") from None
    lower_seconds = time.perf_counter() - start
    compiled = lowered.compile()
    compile_seconds = time.perf_counter() - start - lower_seconds

    analysis = compiled.memory_analysis()
    memory = {key: int(getattr(analysis, f"{key}_size_in_bytes", 0) or 0)
              for key in ("argument", "output", "alias", "temp", "generated_code")}
    # What the program holds at once: its inputs, the outputs that do not reuse a donated input, the
    # temporaries and the code; the runtime's own (CUDA context, NCCL buffers) comes on top.
    memory["peak"] = memory["argument"] + memory["output"] - memory["alias"] + memory["temp"] + memory["generated_code"]
    hlo = compiled.as_text()
    program = HloProgram(hlo)
    return {
        "target": target.name, "device_kind": target.device_kind, "devices": devices, "platform": platform,
        "mesh": dict(mesh.shape), "params": model_config.num_params(), "param_dtype": model_config.param_dtype,
        "compute_dtype": model_config.compute_dtype, "remat": model_config.remat,
        "attention_backend": model_config.attention_backend,
        "objective": t.objective, "global_batch": t.batch_size, "grad_accum": t.grad_accum, "seq_len": seq,
        "sequences_per_device": micro // data_parallel,
        "param_bytes_per_device": shard_bytes(steps.abstract_params, steps.param_shardings),
        "optimizer_bytes_per_device": shard_bytes(steps.abstract_opt_state, steps.opt_shardings),
        "batch_bytes_per_device": shard_bytes(batch, {k: v.sharding for k, v in batch.items()}),
        "memory": memory, "capacity_bytes": target.memory_bytes,
        "attention_kernels": program.attention_kernels(),
        "collectives": program.collectives(),
        "dots": [dataclasses.asdict(d) for d in program.dots()],
        "model_flops_per_step": run_update_flops(config, model_config),
        "lower_seconds": lower_seconds, "compile_seconds": compile_seconds, "hlo": hlo,
    }


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 8 or n == 0 else f"{n / 2**20:.2f} MiB"


def _attention_line(report: dict) -> str:
    kernels = report["attention_kernels"]
    if not kernels:
        return f"XLA ops (attention_backend {report['attention_backend']}; no cuDNN fused attention in the program)"
    calls: dict[str, int] = {}
    for k in kernels:
        calls[k["target"]] = calls.get(k["target"], 0) + k["count"]
    masks = sorted({str(k["mask_type"]) for k in kernels})
    bias = "yes" if any(k["bias"] for k in kernels) else "no"
    listed = ", ".join(f"{name} x{n}" for name, n in calls.items())
    return f"cuDNN flash attention: {listed} per step; mask {'/'.join(masks)}; bias operand: {bias}"


def _dots_line(report: dict) -> str:
    kinds: dict[str, int] = {}
    for d in report["dots"]:
        key = f"{' x '.join(d['operand_dtypes'])} -> {d['result_dtype']}"
        kinds[key] = kinds.get(key, 0) + d["count"]
    return "; ".join(f"{k}: {n}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1])) or "none"


def format_report(report: dict, label: str) -> str:
    """The dry run's printout: what is compiled, per-device bytes, XLA's memory analysis, kernels, collectives."""
    m, cap = report["memory"], report["capacity_bytes"]
    where = (f"{report['devices']} x {report['device_kind']} (target {report['target']})" if report["platform"] != "cpu"
             else f"{report['devices']} fake CPU devices (target cpu)")
    # A DPO row is a pair (chosen and rejected side by side); GRPO's a completion with its prompt.
    rows = {"dpo": "pairs", "grpo": "completions"}.get(report["objective"], "sequences")
    lines = [
        f"dry run: {label} on {where}",
        f"  compiled the train step for mesh {report['mesh']} ({report['devices']} devices) in "
        f"{report['compile_seconds']:.1f}s (lowering {report['lower_seconds']:.1f}s), from shapes only, for "
        f"{report['platform']}",
        f"  batch           {report['global_batch']} {rows} x {report['seq_len']} tokens per step, grad_accum "
        f"{report['grad_accum']}: {report['sequences_per_device']} {rows} per device per micro-step",
        f"  parameters      {report['params']:,} ({report['param_dtype']}, compute {report['compute_dtype']}, remat "
        f"{report['remat']}): {_gib(report['param_bytes_per_device'])}/device",
        f"  optimizer state {_gib(report['optimizer_bytes_per_device'])}/device",
        f"  batch arrays    {_gib(report['batch_bytes_per_device'])}/device   (all three from shard shapes)",
        "  XLA memory analysis, per device:",
        f"    arguments     {_gib(m['argument'])}",
        f"    outputs       {_gib(m['output'])}, of which {_gib(m['alias'])} reuse donated arguments",
        f"    temporaries   {_gib(m['temp'])}",
        f"    code          {_gib(m['generated_code'])}",
    ]
    if cap:
        share = m["peak"] / cap
        lines.append(f"    peak          {_gib(m['peak'])} of {_gib(cap)} ({share:.0%} of the device; JAX's allocator "
                     f"takes {DEFAULT_MEMORY_FRACTION:.0%} unless XLA_PYTHON_CLIENT_MEM_FRACTION says more)")
    else:
        lines.append(f"    peak          {_gib(m['peak'])} (XLA:CPU's figures; --target a100-80g|h100-80g|h200 for a GPU's)")
    lines.append(f"  attention       {_attention_line(report)}")
    collectives = ", ".join(f"{kind} {c['count']} ({_gib(c['bytes'])})"
                            for kind, c in report["collectives"].items() if c["count"])
    lines.append(f"  collectives     per step, count (bytes of the full buffers): {collectives or 'none'}")
    lines.append(f"  matmuls         per step, operands -> result: {_dots_line(report)}")
    lines.append(f"  model FLOPs     {report['model_flops_per_step']:.3e} per step (6N + 12 L T d per token; a DPO "
                 f"row is two sequences; a reference forward adds a third)")
    return "\n".join(lines)


def check_fits(report: dict, label: str) -> None:
    """Refuses (ConfigError, one sentence) a step whose peak exceeds the target device's memory."""
    cap, peak = report["capacity_bytes"], report["memory"]["peak"]
    if cap and peak > cap:
        raise ConfigError(
            f"{label} does not fit {report['devices']} x {report['device_kind']}: the train step needs {_gib(peak)} per "
            f"device of {_gib(cap)} (XLA's memory analysis) at {report['sequences_per_device']} sequences of "
            f"{report['seq_len']} tokens per device per micro-step; raise train.grad_accum, lower train.batch_size, "
            f"or plan more devices.")


def dry_run(config, model_config, target: Target | str = "cpu", devices: int | None = None, *,
            label: str = "the config", hlo_path: str | None = None) -> dict:
    """Compiles the train step for `devices` devices of `target`, prints the report, writes the HLO text to
    `hlo_path` if given, and refuses a step that does not fit the device; returns the report."""
    target = resolve_target(target) if isinstance(target, str) else target
    report = compile_train_step(config, model_config, target, devices or default_device_count(config))
    print(format_report(report, label), flush=True)
    if hlo_path:
        Path(hlo_path).write_text(report["hlo"])
        print(f"  HLO             {hlo_path}", flush=True)
    check_fits(report, label)
    return report
