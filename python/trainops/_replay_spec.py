"""Replay definitions shared by the fused replay ops, the buffers and the replay reference.

The kernels (csrc/common/replay_common.h) keep per-slot sampling weights in blocks of
:data:`BLOCK` slots with each block's fp64 sum and smallest positive weight (``block_stats``);
a stored PER weight is max(p, eps)^alpha (Schaul et al., 2016). Production code and
:mod:`trainops.reference.replay` both take these from here, so the reference stays a
specification that no production module imports.
"""
from __future__ import annotations

import torch

__all__ = ["BLOCK", "WEIGHT_MODES", "EVICTIONS", "WEIGHT_MODE_NUMBERS", "EVICTION_NUMBERS", "block_stats",
           "priority_weight"]

BLOCK = 32
# Where replay_sample takes each slot's sampling weight w_i from: 1 (uniform), the stored
# weights with their maintained block_stats (weights), 1 / (now - slot_key_i + 1) (recency),
# table[slot_key_i] (table). Every Python layer names a mode by its string; the op schemas take
# the number (the position here), which only trainops.ops.replay passes to them.
WEIGHT_MODES = ("uniform", "weights", "recency", "table")
# Which slots replay_insert writes: the FIFO ring or reservoir sampling of the stream.
EVICTIONS = ("fifo", "reservoir")
WEIGHT_MODE_NUMBERS = {name: number for number, name in enumerate(WEIGHT_MODES)}
EVICTION_NUMBERS = {name: number for number, name in enumerate(EVICTIONS)}


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
