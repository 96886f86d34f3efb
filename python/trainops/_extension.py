"""Guarded loading of the compiled extensions.

``import trainops`` never fails because a build is missing: the failure is kept and
reported, naming the op, when an op that needs the extension is called.

The op schemas are declared in Python (trainops.ops._schemas) before the extensions load:
the C++ code only registers kernels for them. So the ops, their fakes and their Triton
kernels exist without a build; only the kernels that are C++ are missing then.
"""
from __future__ import annotations

import importlib

import torch

from trainops.ops import _schemas  # before the extensions: they register kernels for these ops

from trainops._build_info_check import torch_mismatch

_errors: dict[str, BaseException] = {}
# Set when the running torch is outside the range the binaries were built for.
TORCH_MISMATCH = torch_mismatch()


def _load(module: str) -> bool:
    if TORCH_MISMATCH is not None:
        _errors[module] = ImportError(TORCH_MISMATCH)
        return False
    try:
        importlib.import_module(module)
        return True
    except (ImportError, OSError) as exc:  # OSError: a stale .so with missing symbols
        _errors[module] = exc
        return False


HAS_C = _load("trainops._C")
HAS_CUDA_C = _load("trainops._C_cuda")


def require(op_name: str, device: torch.device | str | None = None) -> None:
    """Raise a clear error if ``op_name`` on ``device`` (CPU when None) needs trainops._C and
    it is missing. On CUDA the kernels are Triton or trainops._C_cuda (:func:`require_cuda`)."""
    if device is not None and torch.device(device).type == "cuda":
        return
    if not HAS_C:
        raise RuntimeError(
            f"trainops op '{op_name}' needs the compiled extension trainops._C, which failed to load: "
            f"{_errors['trainops._C']}. Build it with `pip install --no-build-isolation -e .` "
            "from the source tree (a C++17 compiler and torch are required)."
        )


def require_cuda(op_name: str) -> None:
    if not HAS_CUDA_C:
        raise RuntimeError(
            f"trainops op '{op_name}' on CUDA needs trainops._C_cuda, which failed to load: "
            f"{_errors.get('trainops._C_cuda')}. Rebuild on a machine with a CUDA build of torch and nvcc."
        )


def _register_missing_cpp_kernels() -> None:
    """Without trainops._C, a CPU call of an op whose CPU kernel is C++ raises :func:`require`'s
    error rather than the dispatcher's "could not run ... with arguments from the 'CPU' backend"
    (an op without tensor arguments dispatches to CompositeExplicitAutograd)."""
    for name in _schemas.NEEDS_CPP_ON_CPU:
        schema = getattr(torch.ops.trainops, name).default._schema
        takes_tensors = any("Tensor" in str(arg.type) for arg in schema.arguments)

        def missing(*args, _name=name, **kwargs):
            require(_name)

        _schemas.LIBRARY.impl(name, missing, "CPU" if takes_tensors else "CompositeExplicitAutograd")


if not HAS_C:
    _register_missing_cpp_kernels()
