"""Whether Triton kernels can run: on CUDA devices, or on CPU tensors under TRITON_INTERPRET=1."""
from __future__ import annotations

import os

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a dependency on Linux
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def triton_runs_on(device) -> bool:
    device_type = getattr(device, "type", device)
    return HAS_TRITON and (device_type == "cuda" or (INTERPRET and device_type == "cpu"))
