"""One recipe per op: every schema declared once, in Python (trainops.ops._schemas); the C++
code only registers kernels; autograd in Python; the Triton kernels, the fakes and the
Python CPU kernels are there even when the C++ extension does not load."""
import json
import os
import re
import subprocess
import sys

import torch

import trainops  # noqa: F401
from trainops.ops import _schemas

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _defined_ops() -> set[str]:
    return {s.name.split("::", 1)[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("trainops::")}


def _ops_with_python_kernel(key: str) -> list[str]:
    """Ops whose ``key`` kernel (CUDA, Autograd) is registered from Python (torch.library)."""
    found = []
    for name in sorted(_defined_ops()):
        lines = [ln for ln in torch._C._dispatch_dump(f"trainops::{name}").splitlines() if ln.startswith(key)]
        if lines and all(".py:" in ln for ln in lines):
            found.append(name)
    return found


def test_every_op_is_declared_in_the_schema_module():
    declared = {name.split("::", 1)[1] for name in _schemas.LIBRARY._op_defs}
    assert _defined_ops() == declared
    assert set(_schemas.NEEDS_CPP_ON_CPU) <= declared
    for name in declared:  # the dispatcher records where each schema was declared
        debug = next(ln for ln in torch._C._dispatch_dump(f"trainops::{name}").splitlines() if ln.startswith("debug:"))
        assert os.path.join("trainops", "ops", "_schemas.py") in debug, (name, debug)


def test_cpp_sources_declare_no_schema():
    """A TORCH_LIBRARY / _FRAGMENT block (stable or not) would declare schemas a second time."""
    block = re.compile(r"\b(STABLE_)?TORCH_LIBRARY(_FRAGMENT)?\s*\(")
    offenders = []
    for folder, _, files in os.walk(os.path.join(ROOT, "csrc")):
        for name in files:
            if name.endswith((".cpp", ".cu", ".h", ".cuh")):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    if block.search(f.read()):
                        offenders.append(os.path.relpath(path, ROOT))
    assert offenders == []


def test_cpp_cpu_kernels_are_registered():
    for name in _schemas.NEEDS_CPP_ON_CPU:
        op = getattr(torch.ops.trainops, name).default
        takes_tensors = any("Tensor" in str(a.type) for a in op._schema.arguments)
        key = "CPU" if takes_tensors else "CompositeExplicitAutograd"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"trainops::{name}", key), name


def test_autograd_is_registered_in_python():
    """Every autograd kernel of a trainops op comes from torch.library.register_autograd."""
    with_autograd = [name for name in sorted(_defined_ops())
                     if torch._C._dispatch_has_kernel_for_dispatch_key(f"trainops::{name}", "Autograd")]
    assert {"router_topk", "mora_fwd"} <= set(with_autograd)
    assert with_autograd == _ops_with_python_kernel("Autograd")


# Runs in a fresh interpreter in which `import trainops._C` (and _C_cuda) fails; prints facts.
_WITHOUT_EXTENSION = r"""
import importlib.abc, json, sys

class BlockExtensions(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in ("trainops._C", "trainops._C_cuda"):
            raise ImportError(f"{name} is blocked by the test")
        return None

sys.meta_path.insert(0, BlockExtensions())
import torch
import trainops
from torch._subclasses.fake_tensor import FakeTensorMode

facts = {"has_c": trainops.has_extension()}
facts["cuda_kernels"] = {name: torch._C._dispatch_has_kernel_for_dispatch_key(f"trainops::{name}", "CUDA")
                         for name in sys.argv[1].split(",")}
with FakeTensorMode():
    data, scales = torch.ops.trainops.quantize(torch.empty(300), "int8", 128, False, 0)
    w, idx, counts, prob_sum, z = torch.ops.trainops.router_topk(torch.empty(5, 8), 2, "softmax", True, None, None,
                                                                 False)
    x, A = torch.empty(4, 6), torch.empty(3, 6)
    delta, p, rank_idx, rho = torch.ops.trainops.mora_fwd(x, A[:0], torch.empty(7, 0), A, torch.empty(7, 3), 2, 0.1,
                                                          0.2, True, 1.0, 0.0, 0)
facts["fake_shapes"] = [list(t.shape) for t in (data, scales, w, idx, counts, delta, p, rank_idx)]

def error_of(call):
    try:
        call()
    except Exception as exc:
        return [type(exc).__name__, str(exc)]
    return None

facts["errors"] = {
    "op quantize": error_of(lambda: torch.ops.trainops.quantize(torch.randn(16), "int8", 16, False, 0)),
    "ops.quantize": error_of(lambda: trainops.ops.quantize(torch.randn(16), "int8", 16)),
    "ops.router_topk": error_of(lambda: trainops.ops.router_topk(torch.randn(4, 8), 2)),
    "op cpu_pool_cached_bytes": error_of(lambda: torch.ops.trainops.cpu_pool_cached_bytes()),
}
# Ops whose CPU kernel is Python run as usual.
x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
A = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
B = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
trainops.ops.mora(x, A, B, top_k=2).sum().backward()
facts["mora_grad_shapes"] = [list(t.grad.shape) for t in (x, A, B)]
acc = torch.zeros(3, dtype=torch.int64)
torch.ops.trainops.add_unless_recomputing(acc, torch.arange(3))
facts["counts"] = acc.tolist()
print(json.dumps(facts))
"""


def test_without_the_extension_triton_kernels_and_fakes_register():
    triton_cuda_ops = _ops_with_python_kernel("CUDA")
    assert {"quantize", "dequantize_accumulate", "router_topk", "router_topk_backward", "mora_fwd"} <= set(
        triton_cuda_ops)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_EXTENSION, ",".join(triton_cuda_ops)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert facts["has_c"] is False
    assert facts["cuda_kernels"] == dict.fromkeys(triton_cuda_ops, True)
    assert facts["fake_shapes"] == [[300], [3], [5, 2], [5, 2], [8], [4, 7], [4, 3], [4, 2]]
    for call, error in facts["errors"].items():
        assert error is not None, f"{call} ran without the extension"
        kind, message = error
        assert kind == "RuntimeError", (call, error)
        assert "needs the compiled extension trainops._C" in message and "blocked by the test" in message, (call,
                                                                                                             message)
    assert "'quantize'" in facts["errors"]["op quantize"][1]
    assert "'cpu_pool_cached_bytes'" in facts["errors"]["op cpu_pool_cached_bytes"][1]
    assert facts["mora_grad_shapes"] == [[4, 6], [3, 6], [7, 3]]
    assert facts["counts"] == [0, 1, 2]
