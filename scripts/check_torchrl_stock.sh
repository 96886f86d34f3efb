#!/usr/bin/env bash
# FusedPrioritizedSampler next to TorchRL 0.14.1's own PrioritizedSampler:
# tests/test_replay_torchrl_stock.py, and with --bench benchmarks/bench_replay_torchrl.py.
#
# TorchRL 0.14.1's compiled segment trees (which its PrioritizedSampler needs) are built for
# torch 2.14; the main environment may have another torch. The trainops wheel loads into
# every torch from 2.11 (stable ABI), so this builds it once against the current
# environment's torch and runs the comparison in a torch 2.14.1 environment, the one CI's
# scripts/ci_torch214.sh makes (kept between runs here).
#
# Usage: scripts/check_torchrl_stock.sh [--bench]
# Environment: VENV (the torch 2.14.1 environment, default /tmp/venv-rl)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
VENV=${VENV:-/tmp/venv-rl}
wheel=$(./scripts/ci_build_wheel.sh "$(mktemp -d /tmp/trainops_wheel.XXXXXX)")
TRAINOPS_CI_VENV_214="$VENV" TRAINOPS_CI_KEEP_VENV=1 ./scripts/ci_torch214.sh "$wheel"
if [ "${1:-}" = "--bench" ]; then
  "$VENV/bin/python" benchmarks/bench_replay_torchrl.py
fi
