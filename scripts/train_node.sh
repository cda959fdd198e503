#!/bin/bash
# One node's share of a multi-node training run: a torchrun agent that meets the other nodes' agents
# through torchrun's c10d rendezvous and starts this node's ranks. Run it once on every node, with the
# same NNODES, RDZV_ENDPOINT and RDZV_ID (by hand, over ssh/pdsh, or from scripts/slurm/train.sh):
#
#   NNODES=2 RDZV_ENDPOINT=node0:29500 scripts/train_node.sh configs/train/reference-256.yaml --resume \
#       'topology.loader_to_model={0: [2, 3, 4], 1: [5, 6, 7], 8: [10, 11, 12], 9: [13, 14, 15]}'
#
# The rendezvous numbers the nodes in the order they join, so a node's ranks are not fixed in advance:
# every rank reads its role from the map, and the map is checked against WORLD_SIZE (NNODES x
# NPROC_PER_NODE) before any rank works. checkpoint.dir must be on a filesystem every node sees.
# Optional: RDZV_ID (the job's name), NPROC_PER_NODE (default: one rank per visible GPU), MAX_RESTARTS.
set -euo pipefail

CONFIG=${1:?usage: NNODES=N RDZV_ENDPOINT=HOST:PORT scripts/train_node.sh CONFIG [--resume] [section.key=value ...]}
shift
: "${NNODES:?set NNODES to the number of nodes in the run}"
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT to host:port of one node that every node reaches}"
RDZV_ID=${RDZV_ID:-sd3-train}
if [ -z "${NPROC_PER_NODE:-}" ]; then  # one rank per visible GPU
    if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then  # set, even empty (no GPU), it says what this node may use
        NPROC_PER_NODE=$(tr ',' '\n' <<< "$CUDA_VISIBLE_DEVICES" | grep -c . || true)
    else  # whole GPUs only: on a MIG host the list also names each GPU's instances, indented
        NPROC_PER_NODE=$(nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU ' || true)
    fi
    [ "$NPROC_PER_NODE" -gt 0 ] || { echo "train_node.sh: no GPU found; set NPROC_PER_NODE" >&2; exit 2; }
fi
# Split the node's cores between its ranks unless the caller chose (DataLoader workers add their own).
CORES=$(nproc)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CORES > NPROC_PER_NODE ? CORES / NPROC_PER_NODE : 1 ))}

# MAX_RESTARTS > 0: torchrun restarts every rank of the job when one fails, and they continue from the
# last checkpoint (--resume). Each restart gets a fresh rendezvous store: torch's shared one would hand
# the restarted ranks the dead ranks' addresses (trainer/train.py explains).
MAX_RESTARTS=${MAX_RESTARTS:-0}
if [ "$MAX_RESTARTS" -gt 0 ]; then set -- --resume "$@"; fi
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

# Paths in CONFIG and the overrides stay relative to the caller's directory; only train.py is found from here.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
exec torchrun \
    --nnodes="$NNODES" \
    --nproc_per_node="$NPROC_PER_NODE" \
    --max-restarts="$MAX_RESTARTS" \
    --rdzv_id="$RDZV_ID" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="$RDZV_ENDPOINT" \
    "$REPO/trainer/train.py" --config "$CONFIG" "$@"
