#!/usr/bin/env bash
# The wheel built against torch 2.13 in a second fresh environment with torch 2.14.1 (a
# CUDA build, from local disk; several GB). A stable-ABI wheel declares torch <2.15 and
# must pass the op tests there. A wheel built for one torch release declares that release
# only; then what is checked is that trainops, loaded into the other torch anyway, says
# which torch it was built for instead of failing on a missing symbol.
# Usage: scripts/ci_torch214.sh <wheel>   (TRAINOPS_CI_VENV_214: where the venv goes)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
WHEEL=${1:?usage: scripts/ci_torch214.sh <trainops wheel>}
WHEEL=$(realpath "$WHEEL")
VENV=${TRAINOPS_CI_VENV_214:-/tmp/trainops_ci_torch214}
PY="$VENV/bin/python"
# TRAINOPS_CI_KEEP_VENV=1 reuses a venv made by an earlier run (the torch install is the
# slow part); CI always starts fresh.
if [ "${TRAINOPS_CI_KEEP_VENV:-0}" != 1 ] || [ ! -x "$PY" ]; then
  rm -rf "$VENV"
  nice -n 10 python3 -m venv "$VENV"
  t=$(date +%s)
  nice -n 10 "$PY" -m pip install -q "torch==2.14.1" numpy pytest hypothesis
  echo "ci_torch214: torch 2.14.1 + test deps installed in $(( $(date +%s) - t ))s" >&2
fi
# --no-deps: keep this torch whatever range the wheel declares (pip would swap it);
# --force-reinstall: a kept venv may hold an earlier build of the same version.
"$PY" -m pip install -q --no-deps --force-reinstall "$WHEEL"
status=0
if "$PY" -c "
import sys, torch
from trainops import _build_info as b
v = tuple(int(p) for p in torch.__version__.split('+')[0].split('.')[:2])
sys.exit(0 if b.TORCH_MINIMUM <= v < b.TORCH_BOUND else 1)"; then
  echo "ci_torch214: the wheel declares torch $("$PY" -c 'import torch; print(torch.__version__)'): op tests" >&2
  # Run from outside the checkout's python/ so the installed package is tested.
  "$PY" -m pytest -x -q -p no:cacheprovider tests/test_extension_loading.py tests/test_quantize.py \
    tests/test_router.py tests/test_replay.py tests/test_mora.py tests/test_mora_triton.py || status=$?
  # TorchRL 0.14.1's compiled parts need torch 2.14: here FusedPrioritizedSampler is compared
  # with TorchRL's own PrioritizedSampler (distribution, importance weights); none may skip.
  if [ "$status" = 0 ]; then
    "$PY" -m pip install -q "torchrl==0.14.1" safetensors
    log=$(mktemp)
    "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_replay_torchrl_stock.py tests/test_replay_torchrl.py \
      | tee "$log" || status=$?
    if grep -q "SKIPPED" "$log"; then echo "ci_torch214: TorchRL comparison skipped" >&2; status=1; fi
    rm -f "$log"
  fi
else
  echo "ci_torch214: the wheel does not declare torch 2.14 (not a stable-ABI build): checking its mismatch message" >&2
  "$PY" - <<'PY' || status=$?
import ctypes, glob, os, warnings

import torch

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import trainops
from trainops import _build_info as b

message = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
assert message and f"built with torch {b.TORCH_BUILT_WITH}" in message[0] and torch.__version__ in message[0], message
assert not trainops.has_extension()
try:
    trainops.ops.quantize(torch.ones(256), "int8")
    raise AssertionError("quantize ran with an extension built for another torch")
except RuntimeError as e:
    assert f"built with torch {b.TORCH_BUILT_WITH}" in str(e), e
print("ci_torch214: import warns and ops raise:", message[0])
# What loading it anyway would do (the failure the check above replaces):
so = glob.glob(os.path.join(os.path.dirname(trainops.__file__), "_C*.so"))[0]
try:
    ctypes.CDLL(so)
    print("ci_torch214: note: the extension loads into this torch at the linker level")
except OSError as e:
    print("ci_torch214: loading it anyway fails with:", e)
PY
fi
echo "ci_torch214: exit $status in $(( $(date +%s) - start ))s" >&2
exit "$status"
