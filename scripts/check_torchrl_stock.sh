#!/usr/bin/env bash
# FusedPrioritizedSampler next to TorchRL 0.14.1's own PrioritizedSampler:
# tests/test_replay_torchrl_stock.py, and with --bench benchmarks/bench_replay_torchrl.py.
#
# TorchRL 0.14.1's compiled segment trees (which its PrioritizedSampler needs) are built for
# torch 2.14; the main environment has torch 2.13. So this makes a separate environment
# (torch 2.14.1 + torchrl 0.14.1) and builds trainops' C++ extension against it in a scratch
# copy of the working tree (incremental on later runs), then runs the comparison there.
#
# Usage: scripts/check_torchrl_stock.sh [--bench]
# Environment: VENV (default /tmp/venv-rl), WORK (scratch copy, default /tmp/trainops-torchrl-stock)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-/tmp/venv-rl}
WORK=${WORK:-/tmp/trainops-torchrl-stock}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchrl==0.14.1" safetensors pytest hypothesis numpy setuptools ninja
mkdir -p "$WORK"
# Sources only (not the main environment's extension .so files); tar keeps modification times,
# so the extension build stays incremental on later runs.
(cd "$ROOT" && tar --exclude="*.so" --exclude="__pycache__" -cf - setup.py pyproject.toml csrc kernels python tests \
  benchmarks) | tar -C "$WORK" -xf -
ln -sfn "$WORK/kernels" "$WORK/python/trainops/kernels"  # setup.py installs kernels/ as trainops.kernels
# torch 2.14's full headers need C++20 (setup.py asks for C++17, which torch 2.13 builds with).
sed -i 's/-std=c++17/-std=c++20/g' "$WORK/setup.py"
(cd "$WORK" && TRAINOPS_SKIP_CUDA=1 "$VENV/bin/python" setup.py build_ext --inplace > "$WORK/build.log" 2>&1) \
  || { tail -30 "$WORK/build.log"; exit 1; }
cd "$WORK"
PYTHONPATH="$WORK/python" "$VENV/bin/python" -m pytest -q -rs tests/test_replay_torchrl_stock.py tests/test_replay_torchrl.py
if [ "${1:-}" = "--bench" ]; then
  PYTHONPATH="$WORK/python" TRAINOPS_RESULTS_DIR="$ROOT/benchmarks/results" "$VENV/bin/python" -m benchmarks.bench_replay_torchrl
fi
