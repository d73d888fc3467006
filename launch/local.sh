#!/usr/bin/env bash
# Start N local training processes that form one JAX job over the loopback (gloo collectives on CPU).
#
#   launch/local.sh N [CONFIG.yaml] [section.key=value ...]
#
# Each process gets DEVICES_PER_PROCESS fake CPU devices (default 1; on a GPU host set
# CUDA_VISIBLE_DEVICES per process instead). Logs go to $RUN_LOGS/process_<i>.log; process 0
# also prints to this terminal. The script exits non-zero if any process fails.
#
# The coordinator's port: PORT if set, else a free one below the OS's ephemeral range (where the
# OS never hands out ports for outgoing connections, so nothing takes it between the probe and the
# coordinator's bind); if it was taken all the same, the job is started again on another port (3 tries).
set -euo pipefail
N="${1:?usage: launch/local.sh N [CONFIG.yaml] [section.key=value ...]}"
shift
# The repository's venv when there is one (what the README sets up), else the python on PATH.
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [[ -z "${PYTHON:-}" && -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; fi
PYTHON="${PYTHON:-python}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-1}"
RUN_LOGS="${RUN_LOGS:-$(mktemp -d)}"
mkdir -p "$RUN_LOGS"

free_port() {
  "${PYTHON}" - <<'PY'
import random, socket
try:
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
except OSError:
    low = 32768
for _ in range(200):
    port = random.randrange(max(low - 12000, 1024), low)
    try:  # the coordinator binds every interface ([::]), so probe the same way
        with socket.socket(socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET) as s:
            s.bind(("::" if socket.has_ipv6 else "", port))
    except OSError:
        continue
    print(port)
    break
else:
    raise SystemExit("local.sh: found no free port below the ephemeral range; set PORT")
PY
}

wait_for() {  # a pid's exit status, waiting on through the SIGTERM trap's interruptions
  local rc=0
  wait "$1" || rc=$?
  while (( rc > 128 )) && kill -0 "$1" 2>/dev/null; do rc=0; wait "$1" || rc=$?; done
  return "$rc"
}

stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}

for attempt in 1 2 3; do
  port="${PORT:-$(free_port)}"
  pids=()
  for ((i = 0; i < N; i++)); do
    : > "${RUN_LOGS}/process_${i}.log"  # made here, not by the background job's redirect, which tail could outrun
    XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS} ${XLA_FLAGS:-}" \
    JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}" \
      "${PYTHON}" -m phi2_jax.train "$@" \
        distributed.coordinator="127.0.0.1:${port}" distributed.num_processes="${N}" distributed.process_id="${i}" \
        > "${RUN_LOGS}/process_${i}.log" 2>&1 &
    pids+=($!)
  done
  # A SIGTERM to this script (a scheduler's preemption notice) goes to every process; they agree on a step.
  trap 'for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done' TERM
  # Follow process 0's log until it exits (tail --pid prints what is left, then stops).
  tail -n +1 -f --pid="${pids[0]}" "${RUN_LOGS}/process_0.log" &
  tail_pid=$!
  status=0
  wait_for "${pids[0]}" || status=$?
  wait "$tail_pid" || true
  if [[ $status -ne 0 && -z "${PORT:-}" && $attempt -lt 3 ]] \
      && grep -q "Failed to add port to server" "${RUN_LOGS}/process_0.log"; then
    echo "local.sh: port ${port} was taken after all; starting again on another" >&2
    stop_all
    continue
  fi
  for pid in "${pids[@]:1}"; do
    wait_for "$pid" || status=$?
  done
  break
done
if [[ $status -ne 0 ]]; then
  echo "a process failed (exit ${status}); logs in ${RUN_LOGS}" >&2
fi
exit "$status"
