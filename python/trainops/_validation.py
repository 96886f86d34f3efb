"""Argument checks shared by the ops, modules and distributed code (one message style)."""
from __future__ import annotations

import math
import numbers

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


def check_finite_float(name: str, value, lo: float | None = None, hi: float | None = None, *,
                       lo_open: bool = False, hi_open: bool = False) -> float:
    """``value`` must be a real number (not a bool), finite, within ``lo``/``hi`` where given
    (excluded with ``lo_open``/``hi_open``); returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    low = lo is not None and (value <= lo if lo_open else value < lo)
    high = hi is not None and (value >= hi if hi_open else value > hi)
    if low or high:
        parts = ([f"{'>' if lo_open else '>='} {lo}"] if lo is not None else []) + \
                ([f"{'<' if hi_open else '<='} {hi}"] if hi is not None else [])
        raise ValueError(f"{name} must be {' and '.join(parts)}, got {value}")
    return value


class CheckedFloat:
    """A class attribute whose every assignment goes through :func:`check_finite_float` with
    the given bounds (the constructor's and later ones alike, e.g. ``module.scaling = x``).
    ``Owner.attr.check(value)`` checks without assigning."""

    def __init__(self, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                 hi_open: bool = False):
        self.bounds = {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open}

    def __set_name__(self, owner, name):
        self.name = name

    def check(self, value) -> float:
        return check_finite_float(self.name, value, **self.bounds)

    def __get__(self, obj, cls=None):
        return self if obj is None else obj.__dict__[self.name]

    def __set__(self, obj, value):
        obj.__dict__[self.name] = self.check(value)
