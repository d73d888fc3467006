#!/usr/bin/env bash
# The checks only a GPU can make, in one go: a lent GPU comes with minutes of device time, not hours.
#
#   bash launch/gpu_check.sh [OUT]        (OUT defaults to $OUT, else ./gpu_check)
#
# Runs from the repository root with the machine's python3 (the package need not be
# installed: PYTHONPATH is set here), each step under a time limit, each writing its own files to
# OUT, so that a step that fails or runs out of time leaves the others' results:
#   gpu.txt                  the device, driver and software versions
#   tests.txt                tests/test_gpu.py (cuDNN attention against the xla backend, forward and
#                            backward, at phi-2's head_dim) and generation against transformers
#   train.{md,json,err}      the bench's train suite at full phi-2 size, seq 2048, bfloat16 compute
#   decode.{md,json,err}     greedy decoding of full phi-2 at batch 1 and 8, with MBU
#   packed.{json,err}        the trainer's own step (training/step.py) at full phi-2 size on ONE GPU with packed
#                            documents (DOCS per row: segment ids, positions restarting per document) on the cuDNN
#                            attention path: compile time, XLA's memory analysis on the real GPU (to hold against
#                            `--dry-run --target`), the attention kernels compiled, two steps' time and MFU
#   dryrun.txt               the same shape through `--dry-run --target $TARGET --devices 1` (compiled without the
#                            GPU): its memory analysis beside packed.json's says how far the GPU-less compile is off
# Then copy the tables into docs/benchmarks.md with the date and the device.
#
# Knobs (environment): CONFIG (phi-2), SEQ (2048), BATCH (2), REMAT (save_dots), REPEATS (3), NEW_TOKENS (128), DOCS (4),
# TARGET (h200: the --dry-run target matching the lent GPU),
# COMPARE (transformers; 'none' on an 80 GB card, where both sides' phi-2 training state cannot fit),
# PYTHON (python3).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-gpu_check}}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
CONFIG=${CONFIG:-phi-2} SEQ=${SEQ:-2048} BATCH=${BATCH:-2} REMAT=${REMAT:-save_dots}
REPEATS=${REPEATS:-3} NEW_TOKENS=${NEW_TOKENS:-128} COMPARE=${COMPARE:-transformers} PYTHON=${PYTHON:-python3}
DOCS=${DOCS:-4} TARGET=${TARGET:-h200}

step() {  # step NAME LIMIT_S COMMAND...: runs COMMAND with a time limit and says how it ended
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    timeout "$limit" "$@"
    local code=$?
    echo "gpu_check: $name exit $code after $((SECONDS - start)) s" >> "$OUT/steps.txt"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PYTHON" -c 'import jax, flax, torch, transformers; print("devices", jax.devices()); print("jax", jax.__version__, "flax", flax.__version__, "torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__)' 2>&1
} > "$OUT/gpu.txt"

# The generation tests compare float32 tokens with transformers on the CPU: full float32 matmuls, not TF32.
step tests 240 env JAX_DEFAULT_MATMUL_PRECISION=highest "$PYTHON" -m pytest -q -p no:cacheprovider \
    tests/test_gpu.py tests/test_generate.py -k "cudnn or greedy_equals_transformers" > "$OUT/tests.txt" 2>&1

for suite in train decode; do
    step "$suite" 300 "$PYTHON" -m phi2_jax.bench "$suite" --config "$CONFIG" --seq "$SEQ" --batch "$BATCH" \
        --remat "$REMAT" --new-tokens "$NEW_TOKENS" --dtype bfloat16 --repeats "$REPEATS" --compare "$COMPARE" \
        --work-dir "${TMPDIR:-/tmp}/phi2_jax_bench" --output "$OUT/$suite.json" > "$OUT/$suite.md" 2> "$OUT/$suite.err"
done
# Two train steps of the trainer's own jitted step with packed documents, cuDNN attention forced (not 'auto').
step packed 300 "$PYTHON" - "$CONFIG" "$SEQ" "$BATCH" "$REMAT" "$DOCS" > "$OUT/packed.json" 2> "$OUT/packed.err" <<'PY'
import json, sys, time

import jax, jax.numpy as jnp, numpy as np
from flax import nnx

from phi2_jax.config import preset
from phi2_jax.model.transformer import create_model
from phi2_jax.sharding import make_mesh
from phi2_jax.training.compiled_hlo import HloProgram
from phi2_jax.training.metrics import device_peak_flops, train_flops_per_token
from phi2_jax.training.optim import make_optimizer
from phi2_jax.training.run_config import OptimSection
from phi2_jax.training.step import build_steps

name, seq, batch, remat, docs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
cfg = preset(name, compute_dtype="bfloat16", remat=remat, attention_backend="cudnn")
mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
tx, schedule = make_optimizer(OptimSection(lr=1e-4, warmup_steps=1), 100)
steps = build_steps(cfg, mesh, tx, schedule, 0, 1, 1e-4)
params = nnx.to_pure_dict(nnx.state(create_model(cfg, mesh=mesh)))
opt_state = steps.init_opt(params)
rng = np.random.default_rng(0)
# Packed rows: `docs` documents of random lengths per row, each with its own segment id and positions from 0.
segments = np.stack([np.searchsorted(np.sort(rng.choice(np.arange(1, seq), docs - 1, replace=False)), np.arange(seq),
                                     side="right") for _ in range(batch)])
starts = np.maximum.accumulate(np.where(np.diff(segments, prepend=-1, axis=1) != 0, np.arange(seq), 0), axis=1)
ids = rng.integers(0, cfg.vocab_size, (batch, seq + 1))
batch_arrays = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": segments, "positions": np.arange(seq) - starts}
batch_arrays = {k: jax.device_put(jnp.asarray(v, jnp.int32)[None], steps.batch_sharding) for k, v in batch_arrays.items()}
start = time.perf_counter()
compiled = steps.train_step.lower(params, opt_state, batch_arrays, 0).compile()
compile_s = time.perf_counter() - start
memory = compiled.memory_analysis()
times, losses = [], []
for i in range(2):
    start = time.perf_counter()
    params, opt_state, metrics = compiled(params, opt_state, batch_arrays, i + 1)  # step 0 has lr 0
    losses.append(float(metrics["loss"]))  # waits for the step
    times.append(time.perf_counter() - start)
peak, peak_source = device_peak_flops("bfloat16")
flops = train_flops_per_token(cfg, seq) * batch * seq
print(json.dumps({
    "device": jax.devices()[0].device_kind, "config": name, "batch": batch, "seq": seq, "docs_per_row": docs,
    "remat": remat, "compile_s": compile_s, "step_s": times, "losses": losses,
    "tokens_per_s": batch * seq / times[-1], "mfu": flops / times[-1] / peak, "peak_flops": peak,
    "peak_source": peak_source, "attention_kernels": HloProgram(compiled.as_text()).attention_kernels(),
    "memory": {k: getattr(memory, f"{k}_size_in_bytes", None) for k in ("argument", "output", "alias", "temp")},
}, indent=2))
PY
step dryrun 300 "$PYTHON" -m phi2_jax.train configs/phi2.yaml --dry-run --target "$TARGET" --devices 1 \
    "train.batch_size=$BATCH" train.grad_accum=1 mesh.fsdp=1 "data.seq_len=$SEQ" "model.remat=$REMAT" \
    > "$OUT/dryrun.txt" 2>&1
cat "$OUT/steps.txt"
