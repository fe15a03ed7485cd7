#!/usr/bin/env bash
# README command 1: set up .venv, then pretrain the tiny MoE recipe on the embedded corpus (the
# Python standard library, tokenized on first use) on 4 simulated ranks: gloo processes on this
# machine, 2 pipeline stages x 2 data-parallel ranks with the experts sharded over those 2 (ep=2).
# Extra arguments are Hydra overrides, e.g. `bash launch/quickstart.sh train.steps=50`. One process:
# `.venv/bin/python -m trainer recipe=tiny_cpu`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
NPROC=${NPROC:-4}
args=(recipe=tiny_cpu parallel=pp2_ep2 "$@")
# Validate once, in one process, so a bad override is one line before any rank starts.
MOEFORGE_CHECK_ONLY=1 WORLD_SIZE=$NPROC .venv/bin/python -m trainer "${args[@]}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # ranks share the cores
exec .venv/bin/torchrun --standalone --nproc-per-node "$NPROC" -m trainer "${args[@]}"
