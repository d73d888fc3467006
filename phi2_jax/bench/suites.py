"""`python -m phi2_jax.bench [train|prefill|decode|convert|all] [--compare transformers]`, `... sft|dpo|grpo [--compare trl]`

Measures our implementation and, with `--compare transformers` (needs torch and
transformers), `PhiForCausalLM` on the same config, dtype and weights on the
same machine, alternating runs; prints medians and ratios as a markdown table
and writes JSON. Speed targets live here, never in timed tests. transformers
runs in a worker process of its own (`torch_worker.py`), so each side
runs as a user runs it and has its own peak memory.

    train    tokens/s and MFU of one optimizer step (AdamW + global-norm clipping)
    prefill  tokens/s of a forward pass over batch x seq
    decode   greedy tokens/s and MBU at batch 1 and 8, 128 new tokens, KV cache
    convert  a random full-size phi-2 folder to Orbax and back (bench_convert.py)
    sft, dpo one post-training optimizer step against TRL's SFTTrainer / DPOTrainer (post_training.py);
             run by name (`all` is the four above)
    grpo     rollout tokens/s and the full GRPO step (sampling, reward, advantages, update) against
             TRL's GRPOTrainer (grpo_suite.py); run by name

MFU is the FLOPs' share of the device's peak; MBU (memory-bandwidth
utilisation, decoding's counterpart) is the share of its memory bandwidth that
reading every weight and the live KV cache once per token takes. On the CPU
both denominators are measured in the run (a float32 matmul, a matrix-vector
product over 256 MB); on a GPU they are its datasheet figures.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from phi2_jax.config import REMAT_POLICIES, preset
from phi2_jax.inference.generate import generate
from phi2_jax.util.host_memory import keep_freed_memory_on_cpu
from phi2_jax.training.metrics import (decode_bytes_per_token, device_memory_bandwidth, device_peak_flops,
                              measured_cpu_bandwidth, measured_cpu_peak, train_flops_per_token)
from phi2_jax.model.transformer import create_model
from phi2_jax.training.step import cross_entropy, tuned_for_backend

SUITES = ("train", "prefill", "decode", "convert")
POST_SUITES = ("sft", "dpo", "grpo")  # post_training.py, grpo_suite.py; compared with TRL, not transformers' model


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 10 ms), in MB."""

    def __enter__(self):
        import psutil

        self._process, self._stop, self.peak = psutil.Process(), threading.Event(), 0
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(0.01)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mb = self.peak / 2**20


def device_peak_memory_mb() -> float | None:
    """This process's peak device memory so far (JAX keeps no per-case peak), or None off a GPU."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else None


class TorchWorker:
    """The other framework's side of a case, in a process of its own: `script` is torch_worker.py
    (transformers' PhiForCausalLM) or trl_worker.py (TRL's trainers), each holding exactly our weights.

    One worker per case, so its peak RSS is that case's. The weights come from
    `export_twin_weights`, our own Hugging Face export, which the converter tests hold exact.
    """

    def __init__(self, weights_dir: Path, compute_dtype: str, setup: dict, script: str = "torch_worker.py"):
        script_path = Path(__file__).with_name(script)
        self.process = subprocess.Popen([sys.executable, str(script_path), str(weights_dir), compute_dtype],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        # Its answer is read with the first request's: the worker imports and loads (seconds) while ours compiles.
        self._send(op="setup", **setup)
        self._setup_pending = True

    def _send(self, **request) -> None:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()

    def _answer(self) -> dict:
        answer = self.process.stdout.readline()
        if not answer:
            script = Path(self.process.args[1]).name
            raise RuntimeError(f"the {script} worker exited (code {self.process.wait()}); its error is above.")
        return json.loads(answer)

    def ask(self, **request) -> dict:
        if self._setup_pending:
            self._setup_pending = False
            self._answer()
        self._send(**request)
        return self._answer()

    def run(self) -> dict:
        """One repetition; the worker's answer (the post-training workers report the step's loss in it)."""
        return self.ask(op="run")

    def close(self) -> dict:
        """Stops the worker; returns its peak memory in MB, {'peak_rss_mb', 'peak_device_mb' (None off a GPU)}."""
        peak = self.ask(op="peak_memory")
        self.process.stdin.close()
        self.process.wait()
        return peak


def torch_follows_to_the_gpu() -> bool:
    """Whether transformers' side can run where ours does: on a GPU only with a CUDA build of torch."""
    if jax.default_backend() != "gpu":
        return True
    check = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True)
    return check.stdout.strip() == "True"


def export_twin_weights(model, twin_dir: Path) -> None:
    """Writes `model` once as a Hugging Face folder under `twin_dir`, for every case's worker to load."""
    from phi2_jax.hf.convert import save_pretrained

    save_pretrained(model, twin_dir / "weights", dtype=model.config.param_dtype, overwrite=True)


def _compare(model, twin_dir: Path | None, suite: str, ids, new_tokens: int = 0) -> TorchWorker | None:
    if twin_dir is None:
        return None
    np.save(twin_dir / "ids.npy", np.asarray(ids))
    setup = {"suite": suite, "ids": str(twin_dir / "ids.npy"), "new_tokens": new_tokens}
    return TorchWorker(twin_dir / "weights", model.config.compute_dtype, setup)


def _measure(ours, twin: TorchWorker | None, repeats: int) -> tuple[list[float], list[float], dict, dict | None]:
    """Alternated timings of ours and the twin's, and each side's peak memory (MB) over the runs."""
    with PeakRSS() as memory:
        a, b = alternate(ours, twin.run if twin else None, repeats)
    ours_peak = {"peak_rss_mb": memory.peak_mb, "peak_device_mb": device_peak_memory_mb()}
    return a, b, ours_peak, twin.close() if twin else None


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def alternate(ours, theirs, repeats: int) -> tuple[list[float], list[float]]:
    """Interleaved timings (ours, theirs, ours, ...), after one warm-up call each, so drift hits both alike."""
    ours()
    if theirs:
        theirs()
    a, b = [], []
    for _ in range(repeats):
        a += timed(ours, 1)
        if theirs:
            b += timed(theirs, 1)
    return a, b


def bench_train(model, batch: int, seq: int, repeats: int, twin_dir: Path | None, peak: float) -> list[dict]:
    cfg = model.config
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4, weight_decay=0.1))
    graphdef, params = nnx.split(model)
    params = jax.tree.map(jnp.copy, nnx.to_pure_dict(params))  # the step donates them; the model keeps its own
    opt_state = tx.init(params)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, seq + 1)), jnp.int32)

    @functools.partial(jax.jit, donate_argnums=(0, 1))  # updated in place, as the trainer's step and torch do
    def step(params, opt_state):
        def loss_fn(p):
            return cross_entropy(nnx.merge(graphdef, p)(ids[:, :-1]), ids[:, 1:])[0]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    state = {"p": params, "o": opt_state}

    def ours():
        state["p"], state["o"], loss = step(state["p"], state["o"])
        loss.block_until_ready()

    a, b, our_peak, their_peak = _measure(ours, _compare(model, twin_dir, "train", ids), repeats)
    flops = train_flops_per_token(cfg, seq) * batch * seq
    return _rows("train", f"batch {batch} x seq {seq}", batch * seq, a, b, our_peak, their_peak, mfu_s=flops / peak)


def bench_prefill(model, batch: int, seq: int, repeats: int, twin_dir: Path | None, peak: float) -> list[dict]:
    cfg = model.config
    ids = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (batch, seq)), jnp.int32)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))

    def ours():
        forward(state, ids).block_until_ready()

    a, b, our_peak, their_peak = _measure(ours, _compare(model, twin_dir, "prefill", ids), repeats)
    flops = train_flops_per_token(cfg, seq) / 3 * batch * seq  # forward only: a third of 6N + attention
    return _rows("prefill", f"batch {batch} x seq {seq}", batch * seq, a, b, our_peak, their_peak, mfu_s=flops / peak)


def bench_decode(model, batch: int, new_tokens: int, repeats: int, twin_dir: Path | None, bandwidth: float,
                 prompt_len: int = 16) -> list[dict]:
    cfg = model.config
    ids = np.random.default_rng(2).integers(1, cfg.vocab_size, (batch, prompt_len))

    def ours():
        generate(model, ids, max_new_tokens=new_tokens, eos_token_id=-1)

    a, b, our_peak, their_peak = _measure(ours, _compare(model, twin_dir, "decode", ids, new_tokens), repeats)
    # The whole call is timed, the prompt's prefill included, so this slightly understates the steps' MBU.
    read = decode_bytes_per_token(cfg, batch, prompt_len, new_tokens) * new_tokens
    return _rows("decode", f"batch {batch}, {new_tokens} new tokens", batch * new_tokens, a, b, our_peak, their_peak,
                 mbu_s=read / bandwidth)


def _rows(suite, case, tokens, ours_times, their_times, our_peak, their_peak, *, mfu_s: float | None = None,
          mbu_s: float | None = None, theirs: str = "transformers") -> list[dict]:
    """One row per implementation. mfu_s / mbu_s: the case's seconds at the device's peak FLOP/s / bandwidth;
    theirs: the implementation compared against ('transformers', or 'trl' for the post-training suites)."""
    rows = []
    for impl, times, peak in (("phi2_jax", ours_times, our_peak), (theirs, their_times, their_peak)):
        if not times:
            continue
        median = statistics.median(times)
        row = {"suite": suite, "case": case, "impl": impl, "median_s": median, "tokens_per_s": tokens / median,
               "repeats": len(times), "peak_rss_mb": peak["peak_rss_mb"]}
        if peak["peak_device_mb"] is not None:
            row["peak_device_mb"] = peak["peak_device_mb"]
        for key, bound_s in (("mfu", mfu_s), ("mbu", mbu_s)):
            if bound_s is not None:
                row[key] = bound_s / median
        rows.append(row)
    if len(rows) == 2:
        rows[0][f"speedup_vs_{theirs}"] = rows[1]["median_s"] / rows[0]["median_s"]
    return rows


def markdown(rows: list[dict]) -> str:
    device = any("peak_device_mb" in r for r in rows)  # a column of its own only where there is a device
    references = sorted({key[len("speedup_vs_"):] for r in rows for key in r if key.startswith("speedup_vs_")})
    lines = ["| suite | case | impl | median s | tokens/s | MFU | MBU | peak RSS MB |"
             + (" peak device MB |" if device else "") + f" ours / {' or '.join(references) or 'transformers'} |",
             "|---|---|---|---|---|---|---|---|" + ("---|" if device else "") + "---|"]
    for r in rows:
        mfu, mbu = (f"{100 * r[key]:.1f}%" if key in r else "-" for key in ("mfu", "mbu"))
        speed = next((f"{value:.2f}x" for key, value in r.items() if key.startswith("speedup_vs_")), "")
        tokens = f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "-"
        median = r.get("median_s", r.get("seconds"))
        memory = f"{r['peak_rss_mb']:,.0f} |"
        if device:
            memory += f" {r['peak_device_mb']:,.0f} |" if "peak_device_mb" in r else " - |"
        lines.append(f"| {r['suite']} | {r['case']} | {r['impl']} | {median:.3f} | {tokens} | {mfu} | {mbu} | "
                     f"{memory} {speed} |")
    return "\n".join(lines)


def environment() -> dict:
    import flax

    env = {"date": time.strftime("%Y-%m-%d"), "device": str(jax.devices()[0].device_kind),
           "devices": jax.device_count(), "platform": platform.platform(), "python": platform.python_version(),
           "jax": jax.__version__, "flax": flax.__version__, "command": " ".join(["python -m phi2_jax.bench", *sys.argv[1:]])}
    for package in ("torch", "transformers", "trl"):  # versions without importing them into the measuring process
        try:
            env[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return env


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m phi2_jax.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("suite", nargs="?", default="all", choices=[*SUITES, *POST_SUITES, "all"])
    parser.add_argument("--config", default="phi-small", help="model preset (default phi-small: 512 x 8 layers)")
    parser.add_argument("--compare", choices=["transformers", "trl", "none"], default="none",
                        help="transformers for train/prefill/decode/convert, trl for sft/dpo/grpo")
    parser.add_argument("--dtype", default=None, help="compute dtype (default float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--remat", choices=REMAT_POLICIES, default="none",
                        help="rematerialisation policy of the train suite (configs/phi2.yaml trains with save_dots)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128, help="decode's new tokens; grpo's completion length")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="grpo: each prompt's length in tokens")
    parser.add_argument("--generations", type=int, default=8, help="grpo: completions per prompt (G)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--convert-preset", default="phi-2", help="model size for the convert suite")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/phi2_jax_bench"))
    parser.add_argument("--output", type=Path, default=Path("bench.json"))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    post = args.suite in POST_SUITES
    if args.compare != "none" and post != (args.compare == "trl"):
        print(f"--compare {args.compare} does not apply to suite {args.suite}; expected --compare "
              f"{'trl' if post else 'transformers'} (or none): sft, dpo and grpo compare with TRL's trainers, the other "
              f"suites with transformers' PhiForCausalLM.", file=sys.stderr)
        raise SystemExit(2)
    if args.compare != "none":
        # The other framework's worker shares the GPU: JAX must not take 75% of it up front. Read when JAX first
        # touches the GPU, which is below (nothing in phi2_jax does at import).
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if argv is None and args.suite in ("train", *POST_SUITES):
        keep_freed_memory_on_cpu(f"bench {args.suite}")  # what `python -m phi2_jax.train` runs with (host_memory.py)
    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    suites = SUITES if args.suite == "all" else (args.suite,)
    peak, peak_source = device_peak_flops(dtype)
    # Only decoding's MBU needs it; on the CPU it is a 256 MB measurement.
    bandwidth, bandwidth_source = device_memory_bandwidth() if "decode" in suites else (None, None)
    compare = args.compare != "none"
    needs = ("torch", "transformers", "trl") if args.compare == "trl" else ("torch", "transformers")
    if compare and not all(importlib.util.find_spec(p) for p in needs):
        print(f"--compare {args.compare} needs {', '.join(needs)} (pip install 'phi2_jax[bench]')", file=sys.stderr)
        raise SystemExit(2)
    if compare and set(suites) - {"convert"} and not torch_follows_to_the_gpu():  # convert's side is CPU work
        print(f"--compare {args.compare} on a GPU needs a CUDA build of torch (torch.cuda.is_available() is False "
              "here), or it would run on the CPU; install one, or use --compare none.", file=sys.stderr)
        raise SystemExit(2)
    twin_dir = args.work_dir / "twin" if compare else None
    if twin_dir is not None:
        twin_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    if post:
        from phi2_jax.bench.post_training import bench_post

        # Dropout off: both sides' first steps must be deterministic to be compared (post_training.py).
        config = preset(args.config, compute_dtype=dtype, remat=args.remat).replace(resid_pdrop=0.0, embd_pdrop=0.0)
        model = create_model(tuned_for_backend(config, jax.default_backend()), seed=0)
        if twin_dir is not None:
            export_twin_weights(model, twin_dir)
        if args.suite == "grpo":
            from phi2_jax.bench.grpo_suite import bench_grpo

            rows += bench_grpo(model, args.batch, args.prompt_tokens, args.generations, args.new_tokens,
                               args.repeats, twin_dir)
        else:
            rows += bench_post(args.suite, model, args.batch, args.seq, args.repeats, twin_dir, peak)
    elif set(suites) - {"convert"}:
        # The model config the trainer runs on this backend (its weight-gradient form is chosen per backend).
        config = tuned_for_backend(preset(args.config, compute_dtype=dtype, remat=args.remat), jax.default_backend())
        model = create_model(config, seed=0)
        if twin_dir is not None:
            export_twin_weights(model, twin_dir)
        if "train" in suites:
            rows += bench_train(model, args.batch, args.seq, args.repeats, twin_dir, peak)
        if "prefill" in suites:
            rows += bench_prefill(model, args.batch, args.seq, args.repeats, twin_dir, peak)
        if "decode" in suites:
            for batch in (1, 8):
                rows += bench_decode(model, batch, args.new_tokens, args.repeats, twin_dir, bandwidth)
    if "convert" in suites:
        from phi2_jax.bench.convert import bench_convert

        rows += bench_convert(args.work_dir / "convert", args.convert_preset, compare, min(args.repeats, 3))
    if rows and jax.default_backend() == "cpu":
        # A shared VM's speed drifts within a run; a peak measured in a slow moment gave MFU above 100%.
        # Each denominator the rows use is the best of the start and the end of the run.
        measured = {"mfu": peak, "mbu": bandwidth}
        again = {"mfu": (measured_cpu_peak, lambda: device_peak_flops(dtype)[0]),
                 "mbu": (measured_cpu_bandwidth, lambda: device_memory_bandwidth()[0])}
        for key, (cached, measure) in again.items():
            if not any(key in row for row in rows):
                continue
            cached.cache_clear()  # measured again, not the start's cached figure
            later = measure()
            if later > measured[key]:
                for row in rows:
                    if key in row:
                        row[key] *= measured[key] / later
                measured[key] = later
        peak, bandwidth = measured["mfu"], measured["mbu"]
    result = {"environment": environment(), "config": args.config, "compute_dtype": dtype, "remat": args.remat,
              "peak_flops_per_device": peak, "peak_source": peak_source,
              "memory_bandwidth_per_device": bandwidth, "bandwidth_source": bandwidth_source, "rows": rows}
    args.output.write_text(json.dumps(result, indent=2))
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
