#!/usr/bin/env bash
# Start N local training processes that form one JAX job over the loopback (gloo collectives on CPU).
#
#   launch/local.sh N [CONFIG.yaml] [section.key=value ...]
#
# Each process gets DEVICES_PER_PROCESS fake CPU devices (default 1; on a GPU host set
# CUDA_VISIBLE_DEVICES per process instead). Logs go to $RUN_LOGS/process_<i>.log; process 0
# also prints to this terminal. The script exits non-zero if any process fails.
set -euo pipefail
N="${1:?usage: launch/local.sh N [CONFIG.yaml] [section.key=value ...]}"
shift
PYTHON="${PYTHON:-python}"
PORT="${PORT:-$(${PYTHON} -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-1}"
RUN_LOGS="${RUN_LOGS:-$(mktemp -d)}"
mkdir -p "$RUN_LOGS"
pids=()
for ((i = 0; i < N; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS} ${XLA_FLAGS:-}" \
  JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}" \
    "${PYTHON}" -m phi2_jax.train "$@" \
      distributed.coordinator="127.0.0.1:${PORT}" distributed.num_processes="${N}" distributed.process_id="${i}" \
      > "${RUN_LOGS}/process_${i}.log" 2>&1 &
  pids+=($!)
done
# Follow process 0's log until it exits (tail --pid prints what is left, then stops).
tail -n +1 -f --pid="${pids[0]}" "${RUN_LOGS}/process_0.log" &
tail_pid=$!
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
wait "$tail_pid" || true
if [[ $status -ne 0 ]]; then
  echo "a process failed (exit ${status}); logs in ${RUN_LOGS}" >&2
fi
exit "$status"
