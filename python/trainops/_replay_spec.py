"""Replay definitions shared by the fused replay ops, the buffers and the replay reference.

The kernels (csrc/common/replay_common.h) keep per-slot sampling weights in blocks of
:data:`BLOCK` slots with each block's fp64 sum and smallest positive weight (``block_stats``);
a stored PER weight is max(p, eps)^alpha (Schaul et al., 2016). Production code and
:mod:`trainops.reference.replay` both take these from here, so the reference stays a
specification that no production module imports.
"""
from __future__ import annotations

import torch

__all__ = ["BLOCK", "MODES", "block_stats", "priority_weight"]

BLOCK = 32
# Per-slot weight source of the replay_sample op -> its schema's ``weight_mode`` number.
MODES = {"uniform": 0, "weights": 1, "recency": 2, "table": 3}


def priority_weight(p: torch.Tensor, alpha: float, eps: float) -> torch.Tensor:
    """Stored sampling weight max(p, eps)^alpha (fp64 math, fp32 result)."""
    return p.double().clamp_min(eps).pow(alpha).float()


def block_stats(w: torch.Tensor):
    """(sums, smallest positive weights) of consecutive blocks of BLOCK slots, float64."""
    nb = (w.numel() + BLOCK - 1) // BLOCK
    padded = torch.zeros(nb * BLOCK, dtype=torch.float64)
    padded[: w.numel()] = w
    blocks = padded.view(nb, BLOCK)
    sums = torch.cumsum(blocks, 1)[:, -1]  # slot-by-slot accumulation, as in the kernels
    mins = torch.where(blocks > 0, blocks, torch.full_like(blocks, float("inf"))).amin(1)
    return sums, mins
