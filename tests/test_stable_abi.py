"""trainops._C is built on torch's stable ABI and CPython's limited API: one build for every
torch >= 2.11 and every Python >= 3.10. What that promises, and what it must not change."""
import os
import shutil
import subprocess

import pytest
import torch

import trainops

pytestmark = pytest.mark.skipif(not trainops.has_extension(), reason="C++ extension not built")


def _undefined_symbols(path):
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("binutils' nm is not installed")
    out = subprocess.run([nm, "-D", "--undefined-only", path], check=True, capture_output=True, text=True).stdout
    return [line.split()[-1] for line in out.splitlines() if line.strip()]


def test_built_as_an_abi3_module():
    import trainops._C as ext

    assert os.path.basename(ext.__file__) == "_C.abi3.so"


def test_imports_no_cpp_symbol_of_torch_only_the_c_shim():
    """A C++ symbol of libc10 / libtorch (at::, c10::, torch::) changes between releases; the
    stable C shim (aoti_torch_*, torch_*) does not. Python: the limited API only."""
    import trainops._C as ext

    symbols = _undefined_symbols(ext.__file__)
    cpp_torch = [s for s in symbols if s.startswith(("_ZN3c10", "_ZNK3c10", "_ZN2at", "_ZNK2at", "_ZN5torch",
                                                     "_ZNK5torch", "_ZTVN3c10", "_ZTIN3c10", "_ZTIN2at"))]
    assert cpp_torch == []
    assert any(s.startswith("aoti_torch_") for s in symbols)  # the shim is what it uses
    python = {s for s in symbols if s.startswith("Py")}
    assert python <= {"PyModule_Create2", "PyErr_SetString", "PyExc_TypeError"}


@pytest.mark.parametrize("call,exc,match", [
    (lambda: torch.ops.trainops.quantize(torch.randn(64), "int8", 48, False, 0), ValueError, "block_size"),
    (lambda: torch.ops.trainops.quantize(torch.randn(64), "fp3", 64, False, 0), ValueError, "unknown fmt 'fp3'"),
    (lambda: torch.ops.trainops.quantize(torch.arange(64), "int8", 64, False, 0), TypeError, "'x' must be float32"),
    (lambda: torch.ops.trainops.dequantize(torch.zeros(64, dtype=torch.uint8), torch.zeros(1), "int8", 64, 64,
                                           torch.int32), TypeError, "'dtype'"),
    (lambda: torch.ops.trainops.router_topk(torch.randn(4, 8), 9, "softmax", True, None, None, False), ValueError,
     "'k' must be in"),
    (lambda: torch.ops.trainops.router_topk_backward(torch.randn(2, 1), torch.randn(8), torch.randn(()),
                                                     torch.randn(2, 8), torch.full((2, 1), 8), None, "softmax", True,
                                                     False), IndexError, "'indices' holds 8"),
    (lambda: torch.ops.trainops.replay_update_priorities(
        torch.zeros(4), torch.zeros(4), torch.zeros(2, 1, dtype=torch.float64), torch.full((4,), -1, dtype=torch.int32),
        torch.zeros(4, dtype=torch.long), torch.zeros(1, dtype=torch.long), torch.zeros(1), None, 0.5, 0.01, 5),
     ValueError, "'size' must be in"),
])
def test_raw_op_errors_keep_their_python_type(call, exc, match):
    """ValueError / TypeError / IndexError from the C++ checks, as before the port (the stable
    ABI has no c10::Error: csrc/common/errors.h)."""
    with pytest.raises(exc, match=match):
        call()


def _resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _under_asan():
    with open("/proc/self/maps") as f:
        return "libasan" in f.read()


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_str_arguments_are_read_without_leaking():
    """A `str` argument comes through a string handle that the kernel frees
    (csrc/common/boxing.h): many calls with a long fmt string leave the resident size flat."""
    if _under_asan():
        pytest.skip("ASan's quarantine holds freed memory, so the resident size grows (scripts/asan_check.sh)")
    x = torch.randn(16)
    fmt = "fp3" + "x" * 4096  # an unknown format: the kernel reads the string, then raises

    def calls(n):
        for _ in range(n):
            with pytest.raises(ValueError):
                torch.ops.trainops.quantize(x, fmt, 16, False, 0)

    calls(200)
    before = _resident_bytes()
    calls(5000)  # 5000 x 4 KiB = 20 MiB if each call leaked its copy
    assert _resident_bytes() - before < 8 << 20
