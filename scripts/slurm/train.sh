#!/bin/bash
# Multi-node training through torchrun's c10d rendezvous: one torchrun per node, started by srun.
#
#   sbatch --nodes=4 scripts/slurm/train.sh configs/train/reference-256.yaml \
#       'topology.loader_to_model={0: [2, 3, 4], 1: [5, 6, 7], 8: [10, 11, 12], 9: [13, 14, 15], 16: [18, 19, 20], 17: [21, 22, 23], 24: [26, 27, 28], 25: [29, 30, 31]}'
#
# Every rank validates the topology against WORLD_SIZE (nodes x GPUS_PER_NODE) before it starts: a map
# written for one node fails with the ranks it lacks. checkpoint.dir must be on a filesystem every node
# sees (each rank stages its own part of a checkpoint there). The job always passes --resume, so a
# requeued or restarted job continues from the last checkpoint (and a first start begins at step 0).
# Secrets (WANDB_API_KEY, HF_TOKEN) come from the environment of the submitting shell.
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
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
RDZV_PORT=${RDZV_PORT:-29500}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ${SLURM_CPUS_PER_TASK:-8} / GPUS_PER_NODE ))}

# --kill-on-bad-exit: one failed node ends the others at once (each rank also ends on its own within
# topology.timeout_s).
srun --kill-on-bad-exit=1 --ntasks-per-node=1 \
    torchrun \
    --nnodes="$SLURM_JOB_NUM_NODES" \
    --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv_id="$SLURM_JOB_ID" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="$HEAD_NODE:$RDZV_PORT" \
    trainer/train.py --config "$CONFIG" --resume "$@"
