#!/usr/bin/env bash
# Memory-safety check of the C++ CPU kernels: builds trainops._C with AddressSanitizer and
# UndefinedBehaviorSanitizer (-O1 -g) into a scratch copy of the package, then runs the op
# tests and the fuzz suite against that copy. Exits non-zero on any test failure or any
# sanitizer report (a report aborts the Python process).
#
#   scripts/asan_check.sh [extra pytest args]
#
# The checkout is not touched: python/trainops is copied to a scratch tree
# ($TRAINOPS_ASAN_DIR, default a new /tmp/trainops_asan.XXXXXX), the instrumented _C*.so is
# built there (its own build directory, so an incremental rerun with TRAINOPS_ASAN_DIR set
# recompiles only what changed), and that tree comes first on PYTHONPATH (the editable
# install's import hook is consulted after PYTHONPATH). Only the CPU extension is built.
#
# Python itself is not instrumented, so libasan (and libstdc++, whose operator new/delete
# ASan must see from the start) are preloaded. UBSan runs in the same build with
# -fno-sanitize-recover=all (first report aborts); its vptr check is off because it needs the
# RTTI of every class whose objects it checks, and some come from uninstrumented libraries.
# Environment: PYTHON (default python), CXX (default g++), TRAINOPS_CPU_ARCH (as setup.py,
# default native), TRAINOPS_ASAN_TESTS (the test files, default below),
# TRAINOPS_FUZZ_SCALE (multiplier of the fuzz suite's example budgets, default 1).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python}"
CXX="${CXX:-g++}"
export CXX
start=$(date +%s)

WORK="${TRAINOPS_ASAN_DIR:-$(mktemp -d /tmp/trainops_asan.XXXXXX)}"
mkdir -p "$WORK/build"
rm -rf "$WORK/pkg"
mkdir -p "$WORK/pkg"
# The package as installed: python/trainops, no built .so.
cp -r "$ROOT/python/trainops" "$WORK/pkg/trainops"
find "$WORK/pkg" \( -name '*.so' -o -name '__pycache__' \) -prune -exec rm -rf {} +

echo "asan_check: building trainops._C with -fsanitize=address,undefined in $WORK"
# Run from the scratch directory: setuptools must not read the checkout's pyproject.toml.
cd "$WORK"
# The compiler's output goes to build.log, shown only when the build fails.
if ! ROOT="$ROOT" WORK="$WORK" "$PYTHON" - >"$WORK/build.log" 2>&1 <<'EOF'
import glob
import os
import shutil

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

root, work = os.environ["ROOT"], os.environ["WORK"]
arch = os.environ.get("TRAINOPS_CPU_ARCH", "native")
sources = sorted([os.path.join(root, "csrc", "trainops.cpp")] + glob.glob(os.path.join(root, "csrc", "cpu", "*.cpp")))
sanitize = ["-fsanitize=address,undefined", "-fno-sanitize=vptr", "-fno-sanitize-recover=all"]
cxx = (["-O1", "-g", "-fno-omit-frame-pointer", "-std=c++20", "-ffp-contract=off", "-fopenmp"] + sanitize
       + ([f"-march={arch}"] if arch else []))
# As setup.py: torch's stable ABI (targeting torch 2.11) and CPython's limited API.
macros = [("Py_LIMITED_API", "0x030A0000"), ("TORCH_TARGET_VERSION", "0x020B000000000000")]
setup(
    name="trainops_asan",
    packages=[],
    py_modules=[],
    ext_modules=[CppExtension("trainops._C", sources, include_dirs=[os.path.join(root, "csrc")], define_macros=macros,
                              py_limited_api=True, extra_compile_args={"cxx": cxx},
                              extra_link_args=["-fopenmp"] + sanitize)],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
    script_args=["-q", "build_ext", "--build-lib", os.path.join(work, "pkg"), "--build-temp", os.path.join(work, "build")],
)
EOF
then
  grep -E -B2 -A8 "error|Error" "$WORK/build.log" | tail -80 >&2 || tail -80 "$WORK/build.log" >&2
  echo "asan_check: build failed (log: $WORK/build.log)" >&2
  exit 1
fi
ls "$WORK"/pkg/trainops/_C*.so >/dev/null
built=$(date +%s)
echo "asan_check: built in $((built - start))s"

LIBASAN="$($CXX -print-file-name=libasan.so)"
LIBSTDCXX="$($CXX -print-file-name=libstdc++.so)"
[ -f "$LIBASAN" ] || { echo "asan_check: libasan not found ($LIBASAN)" >&2; exit 2; }

TESTS="${TRAINOPS_ASAN_TESTS:-tests/test_quantize.py tests/test_quantize_kernels.py tests/test_router.py tests/test_replay.py tests/test_cpu_buffer_pool.py tests/test_fuzz_quantize.py tests/test_fuzz_router.py tests/test_fuzz_replay.py}"
cd "$ROOT"
run() {
  env LD_PRELOAD="$LIBASAN $LIBSTDCXX" \
    ASAN_OPTIONS="detect_leaks=0:protect_shadow_gap=0:alloc_dealloc_mismatch=0:halt_on_error=1:exitcode=86:detect_odr_violation=0" \
    UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:exitcode=87" \
    PYTHONPATH="$WORK/pkg${PYTHONPATH:+:$PYTHONPATH}" \
    TRAINOPS_FUZZ_SCALE="${TRAINOPS_FUZZ_SCALE:-1}" \
    "$PYTHON" "$@"
}
# The instrumented build must be the one the tests import.
run -c "import sys, trainops._C as c; sys.exit(0 if c.__file__.startswith('$WORK/pkg/') else 'asan_check: tests would import ' + c.__file__)"
# torch.compile tests are left out: slow under ASan and they run no other kernel code.
# --capture=sys: a sanitizer report is written to fd 2 by the dying process; fd-level capture
# would swallow it.
# shellcheck disable=SC2086
run -m pytest -q -p no:cacheprovider --capture=sys -k "not compile" $TESTS "$@"
echo "asan_check: passed in $(($(date +%s) - start))s (build $((built - start))s)"
