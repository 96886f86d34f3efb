"""Guarded loading of the compiled extensions.

``import trainops`` never fails because a build is missing: the failure is kept and
reported, naming the op, when an op that needs the extension is called.
"""
from __future__ import annotations

import importlib

import torch  # noqa: F401  (loads libc10/libtorch, which the extensions link against)

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


def require(op_name: str) -> None:
    """Raise a clear error if the CPU/CUDA C++ extension needed by ``op_name`` is missing."""
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
