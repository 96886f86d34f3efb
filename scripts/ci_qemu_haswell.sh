#!/usr/bin/env bash
# Runs a focused subset of the C++ CPU op tests, from the installed trainops, under
# qemu-x86_64 -cpu Haswell: a CPU with AVX2 + FMA and no AVX-512, where torch's CPU build
# runs. A binary compiled for a wider CPU (-march=native on an AVX-512 machine) dies here
# with SIGILL; the portable build must pass, with its AVX2 kernels chosen at run time.
# Usage: scripts/ci_qemu_haswell.sh   ($PYTHON: the environment trainops is installed in;
# QEMU_CPU overrides the emulated CPU, e.g. Nehalem for a CPU without AVX2.)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
PY=${PYTHON:-python3}
QEMU_CPU=${QEMU_CPU:-Haswell}
if ! command -v qemu-x86_64 >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get install -y -qq qemu-user >/dev/null
fi
if ! command -v qemu-x86_64 >/dev/null 2>&1; then
  echo "ci_qemu_haswell: qemu-x86_64 not found; install it with: apt-get install -y qemu-user" >&2
  exit 1
fi
# The tests must see the installed package, not the checkout's python/ directory.
origin=$("$PY" -c "import trainops, os; print(os.path.dirname(trainops.__file__))")
case "$origin" in
  "$PWD"/python/*) echo "ci_qemu_haswell: trainops is imported from the checkout ($origin), not an installed wheel" >&2; exit 1 ;;
esac
# The interpreter's own ELF file: qemu-user runs that, not the venv's symlink. VIRTUAL_ENV
# and the venv's site-packages on PYTHONPATH keep the environment the same as native.
exe=$("$PY" -c "import os, sys; print(os.path.realpath(sys.executable))")
site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# One small slice per C++ CPU op: byte equality with the reference (quantize, replay),
# kernels against the reference (router, with the run-time-chosen and portable kernels;
# MoRA's CPU path). opcheck, torch.compile and Triton-interpreter tests are left to the
# native run (minutes each under emulation).
tests=(
  tests/test_quantize.py::test_nibble_ties_and_signs_match_reference
  tests/test_quantize.py::test_shapes_non_contiguous_and_partial_blocks
  tests/test_quantize.py::test_error_feedback_matches_reference
  tests/test_quantize.py::test_dequantize_accumulate_matches_reference
  tests/test_router.py
  tests/test_replay.py
  tests/test_mora.py
)
echo "ci_qemu_haswell: trainops from $origin under qemu-x86_64 -cpu $QEMU_CPU" >&2
status=0
PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$site" \
  nice -n 10 qemu-x86_64 -cpu "$QEMU_CPU" "$exe" -m pytest -x -q -p no:cacheprovider \
  -k "not opcheck and not compile and not triton" "${tests[@]}" 2> >(grep -v "TCG doesn't support requested feature" >&2) || status=$?
if [ "$status" -eq 132 ] || [ "$status" -eq 4 ]; then
  echo "ci_qemu_haswell: SIGILL: the binary uses instructions a $QEMU_CPU CPU lacks" >&2
fi
echo "ci_qemu_haswell: exit $status in $(( $(date +%s) - start ))s" >&2
exit "$status"
