#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install moeforge into it.
#
# On a machine without CUDA we install the pinned CPU build of torch first (this workplace's pip
# finds it on local disk); otherwise pip would resolve `torch` to the multi-GB CUDA build. DeepSpeed ships
# only as an sdist and must build against the torch already installed: --no-build-isolation.
# Idempotent: a second run with nothing changed takes a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${MOEFORGE_VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_CPU_VERSION=${MOEFORGE_TORCH_VERSION:-2.13.0}
STAMP="$VENV/.moeforge-installed"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# pip -q, minus this machine's noisy "Location ... is ignored" warnings; fails when pip fails.
pip_q() {
  local log rc=0
  log=$(mktemp)
  "$VENV/bin/python" -m pip install -q "$@" >"$log" 2>&1 || rc=$?
  grep -v "^WARNING: Location" "$log" || true
  rm -f "$log"
  return "$rc"
}

# Reinstall only when the package definition changed since the last successful install.
want=$(cat setup.cfg pyproject.toml launch/setup_env.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] CUDA GPU found: installing the default (CUDA) torch build"
    pip_q torch
  else
    echo "[setup] no GPU: installing the CPU build torch==$TORCH_CPU_VERSION"
    pip_q "torch==$TORCH_CPU_VERSION"
  fi
fi
echo "[setup] installing moeforge and its dependencies"
pip_q -e ".[dev,megatron,slurm,hf]"
DS_BUILD_OPS=0 pip_q --no-build-isolation "deepspeed==0.19.8"
"$VENV/bin/python" -c "import torch, hydra, pyarrow, deepspeed, megatron.core, transformers, safetensors" >/dev/null 2>&1 || {
  echo "[setup] dependency check failed: run '$VENV/bin/python -c \"import torch, hydra, pyarrow, deepspeed, megatron.core, transformers, safetensors\"' to see why" >&2
  exit 1
}
echo "$want" >"$STAMP"
echo "[setup] ready: $VENV (torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'))"
