#!/usr/bin/env bash
# Train a recipe on several nodes: run this on every node (c10d rendezvous, no fixed node ranks).
#   MASTER_ADDR=node0 NNODES=4 NPROC=8 bash launch/train_multi_node.sh recipe=mixtral_8x7b parallel.dp=-1
#   bash launch/train_multi_node.sh --nnodes 4 --nproc 8 --master node0:29500 recipe=mixtral_8x7b ...
# Settings come from flags or the environment: --nnodes/NNODES, --nproc/NPROC (ranks per node),
# --master/MASTER_ADDR[:MASTER_PORT] (the rendezvous host, any one of the nodes; port 29500 by
# default), --rdzv-id/RDZV_ID (one per job: the same on all nodes), --node-rank/NODE_RANK
# (optional: fixes this node's rank order; c10d assigns ranks otherwise), --max-restarts/
# MAX_RESTARTS (restart all ranks after a failure, up to N times; they resume from the newest
# checkpoint). Every other argument is a Hydra override. The config is validated once on each
# node at world size NNODES * NPROC before the agent starts. `run.dir` must be on a file system
# that all nodes share (checkpoints are written by every rank).
set -euo pipefail
cd "$(dirname "$0")/.."
NNODES=${NNODES:-}; NPROC=${NPROC:-}; NODE_RANK=${NODE_RANK:-}; RDZV_ID=${RDZV_ID:-moeforge}
MAX_RESTARTS=${MAX_RESTARTS:-0}
ENDPOINT=${MASTER_ADDR:-}${MASTER_ADDR:+:${MASTER_PORT:-29500}}
overrides=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nnodes) NNODES=$2; shift 2 ;;
    --nproc) NPROC=$2; shift 2 ;;
    --master) ENDPOINT=$2; shift 2 ;;
    --node-rank) NODE_RANK=$2; shift 2 ;;
    --rdzv-id) RDZV_ID=$2; shift 2 ;;
    --max-restarts) MAX_RESTARTS=$2; shift 2 ;;
    *) overrides+=("$1"); shift ;;
  esac
done
: "${NNODES:?set NNODES or --nnodes}" "${NPROC:?set NPROC or --nproc (ranks per node)}"
: "${ENDPOINT:?set MASTER_ADDR[:MASTER_PORT] or --master host:port}"
case "$ENDPOINT" in *:*) ;; *) ENDPOINT=$ENDPOINT:29500 ;; esac
if [ -x .venv/bin/python ]; then PYTHON=${PYTHON:-.venv/bin/python}; fi
PYTHON=${PYTHON:-python}
MOEFORGE_CHECK_ONLY=1 WORLD_SIZE=$((NNODES * NPROC)) LOCAL_WORLD_SIZE=$NPROC "$PYTHON" -m trainer "${overrides[@]}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Restarted ranks (--max-restarts) must not read the dead attempt's gloo/NCCL addresses from the
# store torchrun shares with its workers (pytorch#135712): give the workers their own store.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
rank_args=()
if [ -n "$NODE_RANK" ]; then rank_args=(--node-rank "$NODE_RANK"); fi
exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$NPROC" \
  --rdzv-backend c10d --rdzv-endpoint "$ENDPOINT" --rdzv-id "$RDZV_ID" "${rank_args[@]}" \
  --max-restarts "$MAX_RESTARTS" -m trainer "${overrides[@]}"
