"""Argument checks shared by the ops, modules and distributed code (one message style)."""
from __future__ import annotations

import torch


def check_int(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` must be an int (not a bool) within [lo, hi] where given."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else (f"<= {hi}" if lo is None else f"in [{lo}, {hi}]")
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def resolve_seed(active: bool, seed: int | None) -> int:
    """The seed a random op uses: 0 when randomness is off; drawn from torch's global
    generator when ``seed`` is None (so ``torch.manual_seed`` makes it reproducible)."""
    if not active:
        return 0
    if seed is None:
        return int(torch.randint(0, 2**62, (1,)).item())
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if not -(2**63) <= seed < 2**63:
        raise ValueError(f"seed must fit in a signed 64-bit integer, got {seed}")
    return seed
