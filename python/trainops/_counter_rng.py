"""Counter-based uniform numbers: u_i = top 24 bits of lowbias32((i mod 2^32) xor key(seed)) / 2^24.

One stream serves stochastic rounding in the quantizers and the dropout of MoRA: a
number depends only on its element index and the seed, so the C++ kernel, the Triton
kernel, the ATen path and the reference draw the same bits in any order, and a backward
pass regenerates a forward's dropout mask from the seed instead of storing it.
``seed_key`` folds a 64-bit seed into the 32-bit key (trainops.formats, shared with the
kernel launchers).
"""
from __future__ import annotations

import math

import torch

from trainops.formats import seed_key

__all__ = ["hash_uniform01", "dropout_keep_mask"]

_MASK32 = 0xFFFFFFFF


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    # int64 arithmetic keeps the low 32 bits of every product exact.
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def hash_uniform01(index: torch.Tensor, seed: int) -> torch.Tensor:
    """u_i in [0, 1) for every int64 element index i, as float32."""
    h = _lowbias32((index & _MASK32) ^ seed_key(seed))
    return (h >> 8).to(torch.float32) * (1.0 / 16777216.0)


def dropout_keep_mask(shape, seed: int, p: float, device="cpu") -> torch.Tensor:
    """Keep-mask of the counter-based dropout: element i (row-major) is kept iff u_i >= p."""
    index = torch.arange(math.prod(shape), dtype=torch.int64, device=device)
    return (hash_uniform01(index, seed) >= p).view(shape)
