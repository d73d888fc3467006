"""The dry run (`python -m phi2_jax.train CONFIG --dry-run --target T --devices N`).

CPU tests (any machine): the per-device bytes the dry run reports are the bytes
each device really holds, and a step that does not fit is refused.

CUDA tests (need `jax[cuda12]`, no GPU; .ci/run runs them in .venv-gpu): phi-2's
train step compiles with XLA's GPU compiler for 8 abstract H100s and fits, with
cuDNN flash attention (causal, no bias operand) and float32-result weight-gradient
matmuls, read from the compiled HLO text written by the command.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from phi2_jax.errors import ConfigError, UserInputError
from phi2_jax.training import dry_run
from phi2_jax.training.run_config import load_run_config, validate

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA_PLUGIN = importlib.util.find_spec("jax_cuda12_plugin") is not None
needs_cuda_plugin = pytest.mark.skipif(
    not HAS_CUDA_PLUGIN, reason="jax_cuda12_plugin is not installed: XLA's GPU compiler comes with jax[cuda12] "
                                "(.ci/run installs it in .venv-gpu; no GPU needed)")

TINY = ["model.num_hidden_layers=2", "model.hidden_size=64", "model.intermediate_size=256",
        "model.num_attention_heads=4", "model.vocab_size=512", "data.seq_len=32", "train.batch_size=16",
        "train.grad_accum=2", "mesh.data=2", "mesh.fsdp=4"]


def _tiny():
    config = load_run_config(None, TINY)
    return config, validate(config, 8)


def _device_bytes(tree, device) -> int:
    """Bytes of the buffers that live on `device`, read off the placed arrays themselves."""
    return sum(s.data.nbytes for leaf in jax.tree.leaves(tree) for s in leaf.addressable_shards if s.device == device)


def test_per_device_bytes_are_what_each_device_holds():
    from phi2_jax.sharding import make_mesh
    from phi2_jax.training.optim import make_optimizer
    from phi2_jax.training.step import build_steps
    from phi2_jax.model.transformer import create_model
    from flax import nnx

    config, model_config = _tiny()
    report = dry_run.compile_train_step(config, model_config, dry_run.resolve_target("cpu"), 8)

    # Independently: build the real state on 8 CPU devices and weigh what device 0 holds.
    mesh = make_mesh({"data": 2, "fsdp": 4, "tensor": 1}, devices=jax.devices()[:8])
    tx, schedule = make_optimizer(config.optim, config.train.steps)
    steps = build_steps(model_config.replace(attention_backend="xla"), mesh, tx, schedule, 0, 2, 0.0)
    params = nnx.to_pure_dict(nnx.state(create_model(model_config, mesh=mesh)))
    opt_state = steps.init_opt(params)
    device = jax.devices()[0]
    assert report["param_bytes_per_device"] == _device_bytes(params, device)
    assert report["optimizer_bytes_per_device"] == _device_bytes(opt_state, device)
    # [grad_accum 2, micro 8, T 32] int32 x 4 arrays, the micro-batch split 8 ways over data x fsdp
    assert report["batch_bytes_per_device"] == 4 * 2 * 1 * 32 * 4
    # Sharding does split: less than a whole copy of the parameters per device.
    assert report["param_bytes_per_device"] < model_config.num_params() * 4
    # XLA's own count of the program's arguments: params, optimiser state, batch and the int32 step number.
    total = report["param_bytes_per_device"] + report["optimizer_bytes_per_device"] + report["batch_bytes_per_device"]
    assert report["memory"]["argument"] == total + 4
    assert report["sequences_per_device"] == 1 and report["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}


def test_a_step_that_does_not_fit_is_refused_in_one_sentence(capsys):
    config, model_config = _tiny()
    small = dataclasses.replace(dry_run.resolve_target("cpu"), device_kind="small device", memory_bytes=2**20)
    with pytest.raises(ConfigError) as refused:
        dry_run.dry_run(config, model_config, small, 8, label="tiny.yaml")
    report = capsys.readouterr().out
    peak = re.search(r"peak +([\d.]+) MiB of 1\.00 MiB", report)
    assert peak, report
    assert str(refused.value) == (
        f"tiny.yaml does not fit 8 x small device: the train step needs {peak.group(1)} MiB per device of 1.00 MiB "
        f"(XLA's memory analysis) at 1 sequences of 32 tokens per device per micro-step; raise train.grad_accum, "
        f"lower train.batch_size, or plan more devices.")


def test_targets_resolve_to_the_package_files():
    assert [dry_run.resolve_target(n).memory_bytes for n in ("a100", "h100", "h200")] == [
        85100068864, 84929347584, 151397597184]
    assert dry_run.resolve_target("h100").compute_capability == (9, 0)
    assert dry_run.resolve_target("a100-80g").device_kind == "NVIDIA A100-SXM4-80GB"
    with pytest.raises(UserInputError, match=r"--target v100 is unknown; expected one of cpu, a100-80g"):
        dry_run.resolve_target("v100")


def test_the_gpu_attention_backend_is_decided_from_the_target():
    config = load_run_config(ROOT / "configs" / "phi2.yaml")
    model_config = validate(config, 8)
    assert dry_run.model_for_target(model_config, dry_run.resolve_target("h100")).attention_backend == "cudnn"
    assert dry_run.model_for_target(model_config, dry_run.resolve_target("cpu")).attention_backend == "xla"
    f32 = model_config.replace(compute_dtype="float32")
    assert dry_run.model_for_target(f32, dry_run.resolve_target("a100")).attention_backend == "xla"
    with pytest.raises(ConfigError, match="cannot run on h100-80g: compute_dtype float32 is not bfloat16/float16"):
        dry_run.model_for_target(f32.replace(attention_backend="cudnn"), dry_run.resolve_target("h100"))


# ----------------------------------------------------------------------------- XLA:GPU (jax[cuda12], no GPU)
def _train(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    return subprocess.run([sys.executable, "-m", "phi2_jax.train", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


def _dots(hlo: str) -> list[tuple[tuple[str, ...], str, tuple[int, ...], str]]:
    """(operand element types, result element type, result shape, stated algorithm) of every `dot` in the HLO
    text. An operand that is a `convert` inside the dot's fusion counts as its source: XLA:GPU widens the
    fusion's bf16 parameters there and states the algorithm (dot_bf16_bf16_f32); the GEMM reads bf16."""
    found = []
    for block in re.split(r"\n\}\n", hlo):
        types = dict(re.findall(r"%([\w.\-]+) = ([a-z0-9]+)\[", block))
        sources = dict(re.findall(r"%([\w.\-]+) = [a-z0-9]+\[[\d,]*\]\{[^}]*\} convert\(%([\w.\-]+)\)", block))
        for dtype, dims, operands, rest in re.findall(
                r"= ([a-z0-9]+)\[([\d,]*)\]\{[^}]*\} dot\(([^)]*)\)(.*)", block):
            names = [sources.get(n, n) for n in re.findall(r"%([\w.\-]+)", operands)]
            algorithm = re.search(r"algorithm=(\w+)", rest)
            found.append((tuple(types.get(n, "?") for n in names), dtype, tuple(int(d) for d in dims.split(",")),
                          algorithm.group(1) if algorithm else ""))
    return found


@needs_cuda_plugin
def test_cuda_phi2_step_for_8_h100s_compiles_fits_and_uses_cudnn_attention(tmp_path):
    hlo_path = tmp_path / "step.hlo"
    # configs/phi2.yaml's model and optimiser; 96 sequences = its 12 per GPU per step on one node of 8.
    proc = _train("configs/phi2.yaml", "train.batch_size=96", "--dry-run", "--target", "h100", "--devices", "8",
                  "--dump-hlo", str(hlo_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "on 8 x NVIDIA H100 80GB HBM3 (target h100-80g)" in out
    assert "for cuda" in out and "6 sequences per device per micro-step" in out
    peak = re.search(r"peak +([\d.]+) GiB of 79\.10 GiB", out)
    assert peak and float(peak.group(1)) < 79.10, out
    hlo = hlo_path.read_text()

    # cuDNN flash attention, forward and backward, causal (packed documents as segment ids), no bias operand.
    targets = set(re.findall(r'custom_call_target="(__cudnn\$fmha[^"]*)"', hlo))
    assert any(t.endswith("Backward") for t in targets) and any(not t.endswith("Backward") for t in targets), targets
    assert not [t for t in targets if "Bias" in t], targets
    masks = set(re.findall(r'"mask_type":\s*"([A-Z_]+)"', hlo))
    assert masks and masks <= {"CAUSAL", "PADDING_CAUSAL"}, masks

    # Weight gradients: every matmul whose result is shaped like a layer's weight matrix (only a weight
    # gradient is: the others carry the 6 x 2048 tokens) reads bf16 operands and returns float32.
    h, f = 2560, 10240
    weight_shapes = {(h, h), (h, f), (f, h)}
    grads = [d for d in _dots(hlo) if d[2] in weight_shapes]
    assert {d[2] for d in grads} == weight_shapes, _dots(hlo)[:20]
    assert {(d[0], d[1]) for d in grads} == {(("bf16", "bf16"), "f32")}, grads
    assert {d[3] for d in grads} <= {"", "dot_bf16_bf16_f32"}, grads


@needs_cuda_plugin
def test_cuda_phi2_global_batch_on_one_node_is_refused():
    # configs/phi2.yaml's 1152 sequences are for 96 GPUs; on 8 that is 72 per device per micro-step.
    proc = _train("configs/phi2.yaml", "--dry-run", "--target", "h100-80g", "--devices", "8")
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"error: configs/phi2\.yaml does not fit 8 x NVIDIA H100 80GB HBM3: the train step needs "
                     r"[\d.]+ GiB per device of 79\.10 GiB \(XLA's memory analysis\) at 72 sequences of 2048 tokens "
                     r"per device per micro-step; raise train\.grad_accum, lower train\.batch_size, or plan more "
                     r"devices\.\n$", proc.stderr), proc.stderr[-2000:]


@needs_cuda_plugin
@pytest.mark.parametrize("config,fused_forwards", [("dpo", 384), ("grpo", 256)])
def test_cuda_post_training_steps_compile_for_8_h100s_with_cudnn_attention(config, fused_forwards):
    """The shipped DPO (LoRA: the reference is a second forward with the adapters off, so three fused forwards
    per layer and micro-step against two) and GRPO recipes compile for the GPU, fit and keep cuDNN attention."""
    proc = _train(f"configs/{config}.yaml", "checkpoint.init_from=", "--dry-run", "--target", "h100", "--devices", "8")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    peak = re.search(r"peak +([\d.]+) GiB of 79\.10 GiB", out)
    assert peak and float(peak.group(1)) < 79.10, out
    assert f"__cudnn$fmhaSoftmax x{fused_forwards}, __cudnn$fmhaSoftmaxBackward x128 per step" in out, out
