#!/usr/bin/env bash
# README command 1: set up .venv, then pretrain the tiny MoE recipe on the embedded corpus
# (the Python standard library, tokenized on first use). Extra arguments are Hydra overrides,
# e.g. `bash launch/quickstart.sh train.steps=50 optim.lr=1e-3`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
exec .venv/bin/python -m trainer recipe=tiny_cpu "$@"
