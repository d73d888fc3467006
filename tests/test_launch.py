"""The pod launchers, run against stand-ins for SLURM and read as Kubernetes would read them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# What each task's `python` records: its environment and what jax's own SLURM detection makes of it.
RECORDER = """
import json, os, sys, time
from jax._src.clusters.slurm_cluster import SlurmCluster
out = os.path.join(os.environ["RECORD_DIR"], "task-%s.json" % os.environ["SLURM_PROCID"])
detected = SlurmCluster.is_env_present()
record = {"argv": sys.argv[1:], "env": {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "JAX_PLATFORMS")},
          "detected": detected}
if detected:
    record.update(coordinator=SlurmCluster.get_coordinator_address(None, None),
                  process_count=SlurmCluster.get_process_count(), process_id=SlurmCluster.get_process_id(),
                  local_process_id=SlurmCluster.get_local_process_id())
with open(out, "w") as f:
    json.dump(record, f)
if os.environ.get("RECORD_SLEEP"):
    import signal
    signal.signal(signal.SIGTERM, lambda *a: (open(out + ".term", "w").close(), sys.exit(0)))
    time.sleep(60)
"""

# srun for 2 tasks on one node, as SLURM sets their variables (and binds no GPUs: --gpu-bind=none).
SRUN = """#!/usr/bin/env bash
args=(); for a in "$@"; do case "$a" in --*) ;; *) args+=("$a");; esac; done
pids=()
for i in 0 1; do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NTASKS=2 SLURM_STEP_NUM_NODES=1 SLURM_STEP_NODELIST="gpu[007-008]" \\
    "${args[@]}" & pids+=($!)
done
trap 'kill -TERM "${pids[@]}"' TERM
for p in "${pids[@]}"; do wait "$p"; done
wait
"""


def stub_slurm(tmp_path: Path) -> dict:
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (tmp_path / "record.py").write_text(RECORDER)
    scripts = {
        "srun": SRUN,
        "python": f'#!/usr/bin/env bash\nexec {sys.executable} {tmp_path / "record.py"} "$@"\n',
        "scontrol": f'#!/usr/bin/env bash\necho "$@" >> {tmp_path / "scontrol.log"}\n',
    }
    for name, text in scripts.items():
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "activate").write_text("")  # the job's venv: nothing to do here
    records = tmp_path / "records"
    records.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CUDA_VISIBLE"))}
    env.update(PATH=f"{stubs}:{env['PATH']}", PHI2_JAX_VENV=str(tmp_path / "venv"), RECORD_DIR=str(records),
               SLURM_JOB_ID="4242", CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
    return env


def test_slurm_tasks_see_every_gpu_and_jax_finds_its_slurm_job(tmp_path):
    env = stub_slurm(tmp_path)
    proc = subprocess.run(["bash", "launch/slurm.sbatch", "configs/phi2.yaml", "run_dir=/shared/runs/x"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    tasks = [json.loads((tmp_path / "records" / f"task-{i}.json").read_text()) for i in (0, 1)]
    for i, task in enumerate(tasks):
        assert task["argv"] == ["-m", "phi2_jax.train", "configs/phi2.yaml", "run_dir=/shared/runs/x"]
        assert task["env"]["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"  # not narrowed: GPU SLURM_LOCALID exists
        assert task["env"]["JAX_PLATFORMS"] == "cuda"  # a failed CUDA start fails instead of training on the CPU
        assert task["detected"] and task["process_count"] == 2
        assert (task["process_id"], task["local_process_id"]) == (i, i)
        # jax's own rule: the first node of the step's list, a port derived from the job id.
        assert task["coordinator"] == f"gpu007:{4242 % 2**12 + 65535 - 2**12 + 1}"
    assert not (tmp_path / "scontrol.log").exists()  # a run that ends by itself is not requeued


def test_slurm_time_limit_signal_stops_the_tasks_and_requeues(tmp_path):
    env = {**stub_slurm(tmp_path), "RECORD_SLEEP": "1"}
    proc = subprocess.Popen(["bash", "launch/slurm.sbatch", "configs/phi2.yaml"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    records = tmp_path / "records"
    deadline = time.time() + 60
    while len(list(records.glob("task-*.json"))) < 2 and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # what `--signal=B:TERM@300` sends the batch script
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert sorted(p.name for p in records.glob("*.term")) == ["task-0.json.term", "task-1.json.term"]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert "requeueing job 4242" in out


def test_slurm_script_asks_for_a_time_ordinary_partitions_accept():
    lines = (ROOT / "launch/slurm.sbatch").read_text().splitlines()
    time_limit = next(line.split("=")[1].split()[0] for line in lines if line.startswith("#SBATCH --time="))
    hours = int(time_limit.split(":")[0]) if "-" not in time_limit else 24 * int(time_limit.split("-")[0])
    assert hours <= 48
    assert "#SBATCH --requeue" in "\n".join(lines)


def test_jobset_coordinator_is_its_own_first_pod_and_all_pods_restart_together():
    jobset = yaml.safe_load((ROOT / "launch/k8s-jobset.yaml").read_text())
    assert (jobset["apiVersion"], jobset["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
    spec = jobset["spec"]
    (replicated,) = spec["replicatedJobs"]
    job = replicated["template"]["spec"]
    pod = job["template"]["spec"]
    (container,) = pod["containers"]
    args = dict(a.split("=", 1) for a in container["command"] if "=" in a)
    # JobSet names pods <jobset>-<replicatedJob>-<job index>-<pod index>.<subdomain>; process 0 is index 0.
    subdomain = spec["network"].get("subdomain", jobset["metadata"]["name"])
    pod0 = f"{jobset['metadata']['name']}-{replicated['name']}-0-0.{subdomain}"
    assert args["distributed.coordinator"].split(":")[0] == pod0
    assert spec["network"]["enableDNSHostnames"] and spec["network"]["publishNotReadyAddresses"]
    assert int(args["distributed.num_processes"]) == job["parallelism"] == job["completions"]
    assert replicated.get("replicas", 1) == 1 and job["completionMode"] == "Indexed"
    # One pod failing must restart every pod: no per-pod retries, the JobSet's failure policy restarts all.
    assert job["backoffLimit"] == 0 and pod["restartPolicy"] == "Never" and spec["failurePolicy"]["maxRestarts"] >= 1
    env = {e["name"]: e for e in container["env"]}
    assert env["JAX_PLATFORMS"]["value"] == "cuda"
    assert float(env["XLA_PYTHON_CLIENT_MEM_FRACTION"]["value"]) > 0.75
    index = env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert index == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    requests = container["resources"]["requests"]
    assert requests["nvidia.com/gpu"] == container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert {"cpu", "memory"} <= set(requests)
    assert pod["terminationGracePeriodSeconds"] >= 120  # time for every process to save after SIGTERM
