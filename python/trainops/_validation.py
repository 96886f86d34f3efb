"""Argument checks shared by the ops, modules, distributed code and runtime.

One message style: the right exception type (TypeError for a wrong type, ValueError for a
value out of range) and a message naming the argument, what it must be, and what it got.
A bool is never accepted as a number (``True`` is an ``int`` subclass in Python).
"""
from __future__ import annotations

import math
import numbers

import torch

#: The floating-point dtypes the kernels take as activations / gradients. The order is part
#: of quantized_all_reduce's header (a dtype travels as its index here): append only.
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def is_int(value, *, symint: bool = False) -> bool:
    """True for an int that is not a bool (and for a ``torch.SymInt`` with ``symint``: the
    op checks also run on symbolic shapes under torch.compile)."""
    types = (int, torch.SymInt) if symint else int
    return isinstance(value, types) and not isinstance(value, bool)


def is_number(value) -> bool:
    """True for a real number (int, float, numpy scalar...) that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_bool(name: str, value) -> bool:
    """``value`` must be a bool (1 / 0 and other truthy values are refused)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_int(name: str, value, lo: int | None = None, hi: int | None = None, *, symint: bool = False) -> int:
    """``value`` must be an int (not a bool; a ``torch.SymInt`` too with ``symint``) within
    [lo, hi] where given."""
    if not is_int(value, symint=symint):
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
    if not is_int(seed):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if not -(2**63) <= seed < 2**63:
        raise ValueError(f"seed must fit in a signed 64-bit integer, got {seed}")
    return seed


def check_finite_float(name: str, value, lo: float | None = None, hi: float | None = None, *,
                       lo_open: bool = False, hi_open: bool = False, allow_inf: bool = False) -> float:
    """``value`` must be a real number (not a bool), finite, within ``lo``/``hi`` where given
    (excluded with ``lo_open``/``hi_open``); returns it as a float. ``allow_inf`` lets ±inf
    through (NaN never passes), for arguments where an infinite bound has a meaning."""
    if not is_number(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or (not allow_inf and math.isinf(value)):
        raise ValueError(f"{name} must be {'not NaN' if allow_inf else 'finite'}, got {value}")
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


def raise_for_invalid_priorities(values: torch.Tensor, name: str = "priorities") -> None:
    """Replay priorities must be finite and >= 0: raises ValueError for the first kind of bad
    value present (NaN, then negative, then Inf); returns when there is none. Callers run it
    only after a cheaper all-valid test failed, since each check reads the tensor."""
    verb = "contain" if name.endswith("s") else "contains"
    if bool(torch.isnan(values).any()):
        raise ValueError(f"{name} {verb} NaN")
    if bool((values < 0).any()):
        raise ValueError(f"{name} must be >= 0 (got a negative value)")
    if bool(torch.isinf(values).any()):
        raise ValueError(f"{name} must be finite (got Inf)")
