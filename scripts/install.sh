#!/usr/bin/env bash
# Installs trainops and its dependencies into the current Python environment, the way a
# user's pip install does: a regular (non-editable) install built against the torch that
# is installed. CPU machines get the CPU build of torch 2.13.0; an existing torch (e.g.
# CUDA) is kept. TRAINOPS_WHEEL=<path>: install that prebuilt wheel instead of building.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
if [ -n "${TRAINOPS_WHEEL:-}" ]; then
  "$PY" -m pip install -q "${TRAINOPS_WHEEL}[test,runtime]"
  exit 0
fi
"$PY" -m pip install -q setuptools wheel ninja
# --no-build-isolation: build against the torch installed above, not a fresh download.
"$PY" -m pip install -q --no-build-isolation ".[test,runtime]"
