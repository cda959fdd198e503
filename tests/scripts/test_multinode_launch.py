"""The multi-node launch scripts, run with stand-ins for the cluster's own commands (srun, scontrol,
torchrun) that print what they were given: no Slurm or GPUs here, but the arguments, quoting and
environment the scripts hand on are what a cluster would get."""

import os
import shlex
import socket
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OVERRIDE = "topology.loader_to_model={0: [2, 3, 4], 1: [5, 6, 7]}"


def _stand_in(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


def _run(script: str, env: dict, tmp_path: Path, *args: str) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _stand_in(bin_dir, "scontrol", 'echo head-node; echo node-2\n')
    _stand_in(bin_dir, "srun", 'echo "srun $SRUN_CPUS_PER_TASK $NNODES [$NPROC_PER_NODE] $RDZV_ID $RDZV_ENDPOINT"\n'
                               'printf "%s\\n" "$@"\n')
    _stand_in(bin_dir, "torchrun", 'echo "OMP_NUM_THREADS=$OMP_NUM_THREADS"; printf "%s\\n" "$@"\n')
    full_env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), **env}
    out = subprocess.run(["bash", str(REPO / script), *args], env=full_env, capture_output=True, text=True,
                         cwd=REPO, check=True)
    return out.stdout.splitlines()


def test_slurm_passes_the_cpus_on_and_takes_the_port_from_the_job(tmp_path):
    lines = _run("scripts/slurm/train.sh", {"SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_NUM_NODES": "2",
                                            "SLURM_JOB_ID": "123456", "SLURM_CPUS_PER_TASK": "64"},
                 tmp_path, "configs/train/reference-256.yaml", OVERRIDE)
    # ranks per node left to train_node.sh (one per GPU the step sees) unless GPUS_PER_NODE is set
    assert lines[0] == "srun 64 2 [] 123456 head-node:29956"
    assert lines[1:] == ["--kill-on-bad-exit=1", "--ntasks-per-node=1", "scripts/train_node.sh",
                         "configs/train/reference-256.yaml", "--resume", OVERRIDE]


def test_slurm_skips_a_rendezvous_port_in_use_on_the_head_node(tmp_path):
    job_id, taken = _listen_on_a_job_port()
    with taken:  # another job's rendezvous, on the port this job's id maps to
        port = taken.getsockname()[1]
        lines = _run("scripts/slurm/train.sh", {"SLURM_JOB_NODELIST": "node1", "SLURM_JOB_NUM_NODES": "1",
                                                "SLURM_JOB_ID": str(job_id), "SLURM_CPUS_PER_TASK": "8"},
                     tmp_path, "c.yaml")
    host, _, chosen = lines[0].split()[-1].rpartition(":")
    assert host == "head-node" and port < int(chosen) < port + 1000


def _listen_on_a_job_port() -> tuple[int, socket.socket]:
    for job_id in range(123456, 124456):
        probe = socket.socket()
        try:
            probe.bind(("", 29500 + job_id % 1000))
        except OSError:
            probe.close()
            continue
        probe.listen()
        return job_id, probe
    raise AssertionError("no port in 29500-30499 is free here")


def test_train_node_starts_one_rank_per_visible_gpu_and_resumes_when_it_may_restart(tmp_path):
    lines = _run("scripts/train_node.sh", {"NNODES": "2", "RDZV_ENDPOINT": "head-node:29500",
                                           "CUDA_VISIBLE_DEVICES": "0,1,2,3", "MAX_RESTARTS": "2"},
                 tmp_path, "configs/train/reference-256.yaml", OVERRIDE)
    assert lines[0] == f"OMP_NUM_THREADS={max(os.cpu_count() // 4, 1)}"
    assert lines[1:] == ["--nnodes=2", "--nproc_per_node=4", "--max-restarts=2", "--rdzv_id=sd3-train",
                         "--rdzv_backend=c10d", "--rdzv_endpoint=head-node:29500", str(REPO / "trainer/train.py"),
                         "--config", "configs/train/reference-256.yaml", "--resume", OVERRIDE]


def test_train_node_without_a_gpu_or_nproc_says_so(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "NNODES": "1", "RDZV_ENDPOINT": "h:1"}
    out = subprocess.run(["bash", str(REPO / "scripts/train_node.sh"), "c.yaml"], env=env, capture_output=True,
                         text=True, cwd=REPO)
    assert out.returncode == 2 and "no GPU found; set NPROC_PER_NODE" in out.stderr, shlex.join([out.stdout, out.stderr])
