#!/usr/bin/env bash
# Installs trainops and its dependencies into the current Python environment.
# CPU machines get the CPU build of torch 2.13.0; an existing torch (e.g. CUDA) is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q setuptools wheel ninja
# --no-build-isolation: build against the torch installed above, not a fresh download.
"$PY" -m pip install -q --no-build-isolation -e ".[test,runtime]"
