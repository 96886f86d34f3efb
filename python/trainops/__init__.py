"""trainops: fused kernels for communication-efficient, continual training in PyTorch.

Submodules: ``ops`` (functional ops over ``torch.ops.trainops``), ``reference`` (plain
PyTorch specs), ``distributed`` (quantized all-reduce, DDP hook, DiLoCo), ``nn``,
``replay``, ``integrations``, ``runtime``.
"""
import warnings

from trainops.ops import _schemas  # noqa: F401  (every op schema, before _extension loads the C++ kernels)
from trainops import _extension, formats, ops  # noqa: F401
from trainops import distributed, nn, replay  # noqa: F401  (public subpackages, importable as attributes)

__version__ = "0.1.0"

if _extension.TORCH_MISMATCH is not None:
    warnings.warn(_extension.TORCH_MISMATCH, RuntimeWarning, stacklevel=2)


def __getattr__(name: str):
    # ``trainops.reference`` (the plain-PyTorch specification) stays an attribute of the
    # package for users and tests, loaded on first use: no production import pulls it in.
    if name == "reference":
        import importlib
        return importlib.import_module("trainops.reference")
    raise AttributeError(f"module 'trainops' has no attribute {name!r}")


def has_extension() -> bool:
    """True when the C++ extension trainops._C is built and loaded."""
    return _extension.HAS_C
