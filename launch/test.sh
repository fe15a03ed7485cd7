#!/usr/bin/env bash
# README command 2: set up .venv, then run the whole test suite (lint and multi-rank included).
# Extra arguments go to pytest, e.g. `bash launch/test.sh -m "not slow"` for the quick subset.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
exec .venv/bin/python -m pytest "$@"
