#!/bin/bash
# Multi-node training on Slurm: srun starts scripts/train_node.sh (a torchrun agent) on every node.
#
#   sbatch --nodes=4 scripts/slurm/train.sh configs/train/reference-256.yaml \
#       'topology.loader_to_model={0: [2, 3, 4], 1: [5, 6, 7], 8: [10, 11, 12], 9: [13, 14, 15], 16: [18, 19, 20], 17: [21, 22, 23], 24: [26, 27, 28], 25: [29, 30, 31]}'
#
# Every rank validates the topology against WORLD_SIZE (nodes x GPUs per node) before it starts: a map
# written for one node fails with the ranks it lacks. checkpoint.dir must be on a filesystem every node
# sees (each rank stages its own part of a checkpoint there). The job always passes --resume, so a
# requeued or restarted job continues from the last checkpoint (and a first start begins at step 0).
# MAX_RESTARTS=N in the submitting shell lets torchrun restart every rank up to N times when one fails,
# within the job (scripts/train_node.sh). Secrets (WANDB_API_KEY, HF_TOKEN) come from the environment
# of the submitting shell.
#SBATCH --job-name=sd3-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --output=%x-%j.out          # in the submitting directory (Slurm does not create folders)
set -euo pipefail

CONFIG=${1:?usage: sbatch [--nodes=N] scripts/slurm/train.sh CONFIG [section.key=value ...]}
shift
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)  # sed reads it all: no SIGPIPE under pipefail

# The rendezvous port: the first one free here from 29500 + job id % 1000 on. Slurm runs this script on the
# allocation's first node, the head node, so a port another job (or anything else) listens on is skipped.
free_port() {
    python3 - "$1" <<'EOF'
import socket, sys
start = int(sys.argv[1])
for port in range(start, start + 1000):
    with socket.socket() as probe:
        try:
            probe.bind(("", port))
        except OSError:
            continue
    print(port)
    break
else:
    sys.exit(f"no free port in {start}-{start + 999} on this node: set RDZV_PORT")
EOF
}
RDZV_PORT=${RDZV_PORT:-$(free_port $((29500 + SLURM_JOB_ID % 1000)))}

# One scripts/train_node.sh per node (sbatch runs this file from a spool copy, so the path is the
# submitting directory's: submit from the repository root). --kill-on-bad-exit: one failed node ends the
# others at once (each rank also ends on its own within topology.timeout_s). Since Slurm 22.05 srun does
# not inherit --cpus-per-task from sbatch: without passing it on, a node's ranks and their decode workers
# would share one core. Ranks per node: GPUS_PER_NODE if set, else one per GPU the step sees
# (train_node.sh).
export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"
NNODES="$SLURM_JOB_NUM_NODES" NPROC_PER_NODE="${GPUS_PER_NODE:-}" RDZV_ID="$SLURM_JOB_ID" \
RDZV_ENDPOINT="$HEAD_NODE:$RDZV_PORT" \
    srun --kill-on-bad-exit=1 --ntasks-per-node=1 scripts/train_node.sh "$CONFIG" --resume "$@"
