#!/usr/bin/env bash
# Train a recipe on this machine's GPUs (or CPU ranks): torchrun --standalone.
#   bash launch/train_one_node.sh recipe=mixtral_8x7b parallel.dp=-1 ...   # NPROC = number of GPUs
#   NPROC=4 bash launch/train_one_node.sh recipe=tiny_cpu parallel=pp2_ep2
# Arguments are Hydra overrides (as for `python -m trainer`); the config is validated once, in one
# process, at world size NPROC before any rank starts. MAX_RESTARTS=N lets torchrun restart failed
# ranks (they resume from the newest checkpoint). PYTHON / TORCHRUN pick the environment (default:
# .venv if present, else what is on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PYTHON=${PYTHON:-.venv/bin/python}; fi
PYTHON=${PYTHON:-python}
if [ -z "${NPROC:-}" ]; then
  NPROC=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() or 1)")
fi
MOEFORGE_CHECK_ONLY=1 WORLD_SIZE=$NPROC "$PYTHON" -m trainer "$@"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Restarted ranks (--max-restarts) must not read the dead attempt's gloo/NCCL addresses from the
# store torchrun shares with its workers (pytorch#135712): give the workers their own store.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
  --max-restarts "${MAX_RESTARTS:-0}" -m trainer "$@"
