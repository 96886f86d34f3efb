"""Does the running torch match the torch the compiled extensions were built for?

A C++ extension built against one torch release and loaded into another fails with
undefined symbols at best and misbehaves at worst, so ``trainops._extension`` does not load
it into a torch outside the range recorded at build time in ``trainops/_build_info.py``;
ops that need it then raise this module's message instead.
"""
from __future__ import annotations

import re

import torch


def _major_minor(version: str) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def torch_mismatch(running: str | None = None) -> str | None:
    """None when the running torch is in the built range (or nothing was recorded, as in a
    source tree that was never built); else a message saying what was built for what."""
    try:
        from trainops import _build_info as info
    except ImportError:
        return None
    running = torch.__version__ if running is None else running
    version = _major_minor(running)
    if version is None or info.TORCH_MINIMUM <= version < info.TORCH_BOUND:
        return None
    lo, hi = info.TORCH_MINIMUM, info.TORCH_BOUND
    kind = "stable-ABI build" if info.STABLE_ABI else "build for one torch release"
    return (
        f"trainops' compiled kernels were built with torch {info.TORCH_BUILT_WITH} ({kind}: torch >={lo[0]}.{lo[1]},"
        f"<{hi[0]}.{hi[1]}), but torch {running} is running, so they are not loaded. Install a torch in that range "
        f"(pip install 'torch>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]}'), or rebuild trainops against this torch: "
        "pip install --no-build-isolation --force-reinstall --no-deps <trainops source>."
    )
