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
# Then copy the tables into docs/benchmarks.md with the date and the device.
#
# Knobs (environment): CONFIG (phi-2), SEQ (2048), BATCH (2), REMAT (save_dots), REPEATS (3), NEW_TOKENS (128),
# COMPARE (transformers; 'none' on an 80 GB card, where both sides' phi-2 training state cannot fit),
# PYTHON (python3).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-gpu_check}}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
CONFIG=${CONFIG:-phi-2} SEQ=${SEQ:-2048} BATCH=${BATCH:-2} REMAT=${REMAT:-save_dots}
REPEATS=${REPEATS:-3} NEW_TOKENS=${NEW_TOKENS:-128} COMPARE=${COMPARE:-transformers} PYTHON=${PYTHON:-python3}

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
cat "$OUT/steps.txt"
