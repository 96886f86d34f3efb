#!/usr/bin/env bash
# Builds and tests trainops against the GPU machine's software stack, on any Linux x86-64
# machine with nvcc: torch 2.11 (CUDA 13 build from PyPI, ~5 GB) with its Triton 3.6, in a
# fresh virtual environment. Both extensions are built (the CUDA one for sm_80/sm_90), so
# the C++/CUDA sources are checked against that torch's headers; the tests then run on the
# CPU (Triton through its interpreter; the `gpu` tests need a GPU and are skipped), and
# every Triton kernel specialization the tests launch is compiled for sm_80 and sm_90
# (scripts/triton_aot: Triton's own ptxas, no GPU).
# Triton 3.6's interpreter needs NumPy < 2.4. Takes ~10 minutes on 2 cores.
# Usage: [PYTHON=python3.12] scripts/check_gpu_stack.sh [venv dir, default .venv-gpu-stack]
# (the GPU machine runs Python 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-gpu-stack}
TORCH_VERSION=${TORCH_VERSION:-2.11.0}
"${PYTHON:-python3}" -m venv "$VENV"
"$VENV/bin/pip" install -q "torch==$TORCH_VERSION" "numpy<2.4"
PYTHON="$VENV/bin/python" ./scripts/install.sh  # the users' install, keeping this torch
"$VENV/bin/python" -c "import torch, triton, trainops._extension as e; assert e.HAS_CUDA_C, e._errors; print('torch', torch.__version__, 'triton', triton.__version__, '- both extensions load')"
"$VENV/bin/python" -m pytest -q tests
RECORD=$(mktemp)
TRAINOPS_AOT_RECORD=$RECORD PYTHONPATH=scripts/triton_aot "$VENV/bin/python" -m pytest -q -p record_launches \
  tests/test_quantize_triton.py tests/test_router_triton.py tests/test_mora.py tests/test_mora_triton.py
"$VENV/bin/python" scripts/triton_aot/compile_launches.py "$RECORD" 80 90
