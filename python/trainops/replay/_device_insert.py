"""FIFO insertion into :class:`~trainops.replay.ReplayBuffer` with the counters on the device.

``extend(batch, mask=m)`` stores the rows where ``m`` is True as ``extend(batch[m])`` would,
but with fixed-size index ops only, so nothing the host must read depends on the data: with
k = sum(m) kept rows and p_i = the number of kept rows before row i (an exclusive cumsum), kept
row i is the stream item ``cursor + p_i``; it is stored when p_i >= k - capacity (a batch larger
than the buffer keeps its last ``capacity`` items), in slot (cursor + p_i) mod capacity, with
generation cursor + p_i and stamp ``step``. Rows not stored are written to one spare row past
the end of each per-slot tensor, which nothing reads. Then cursor += k and step += (k > 0) on
the device; the host reads those counters only when it needs them (``ReplayBuffer._settle``).
"""
from __future__ import annotations

import torch

from trainops.ops import replay as rops
from trainops.replay import _checks

__all__ = ["supported", "check_mask", "insert"]

# Samplers whose state an insert updates without host-side values: the task clocks of
# power_law are indexed by stored task ids, and ragged lengths are checked on the host.
_SAMPLERS = ("uniform", "prioritized", "recency")


def supported(buf) -> bool:
    """Whether ``buf`` inserts on the device: FIFO eviction, no power-law clocks, no ragged fields."""
    return buf.eviction == "fifo" and buf.sampler in _SAMPLERS and not buf.ragged


def unsupported_message(buf) -> str:
    return (f"mask= on a buffer whose counters stay on the device needs eviction='fifo', a sampler in {_SAMPLERS} "
            f"and no ragged fields; this one has eviction={buf.eviction!r}, sampler={buf.sampler!r}, "
            f"ragged={buf.ragged!r}")


def check_mask(mask, n: int, device) -> torch.Tensor:
    """``mask`` as a bool [n] tensor on ``device``; TypeError/ValueError naming it otherwise."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    if mask.dim() != 1 or mask.shape[0] != n:
        raise ValueError(f"mask must have shape ({n},) (one entry per row), got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but the buffer is on {device}")
    return mask


def insert(buf, fields: list, n: int, prio, grp, mask) -> torch.Tensor:
    """Store the rows of ``fields`` (tensors [n, ...] in spec order) where ``mask`` (bool [n], or
    None for all) is True; ``prio``/``grp``: [n] or None. Returns each row's slot, -1 where not
    stored (masked out, or overwritten within a batch larger than the buffer)."""
    cap, dev = buf.capacity, buf.device
    counts = buf._device_counts()  # [cursor, step], current
    cursor, step = counts[0], counts[1]
    keep = torch.ones(n, dtype=torch.int64, device=dev) if mask is None else mask.to(torch.int64)
    pos = torch.cumsum(keep, 0) - keep
    k = keep.sum()
    kept = keep > 0
    stored = kept & (pos >= k - cap)
    serial = cursor + pos
    slots = torch.where(stored, torch.remainder(serial, cap), torch.full_like(pos, -1))
    target = (torch.where(stored, slots, torch.full_like(pos, cap)),)  # cap: the spare row
    for f, rows in zip(buf.spec, fields):
        buf._storage_ext[f].index_put_(target, rows)
    buf._generations_ext.index_put_(target, serial)
    buf._stamps_ext.index_put_(target, step.expand(n))
    if prio is None:
        prio = buf.max_priority.expand(n)
    else:
        if mask is not None:  # only the stored rows' priorities are checked (one host read, as extend)
            prio = torch.where(mask, prio, torch.ones_like(prio))
        _checks.check_priorities(prio, buf.alpha, buf.priority_eps)
        top = torch.where(kept, prio, torch.zeros_like(prio)).max().reshape(1)  # max_priority >= 0
        buf.max_priority = torch.maximum(buf.max_priority, top)
    # Every index is a slot written just now (below the new size) or -1 (ignored): size=capacity
    # applies exactly the entries that extend's call with the host size applies.
    rops.replay_update_priorities(buf.priorities, buf.weights, buf.block_stats, buf._winner, buf.generations, slots,
                                  prio, None, alpha=buf.alpha, eps=buf.priority_eps, size=cap, validate=False)
    if grp is not None:
        buf._groups_ext.index_put_(target, grp)
    counts += torch.stack([k, (k > 0).to(torch.int64)])
    buf._counts_moved_on_device()
    return slots
