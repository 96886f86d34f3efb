"""Grouped replay of :class:`~trainops.replay.ReplayBuffer` (RLEP, arXiv 2507.07451: replayed
verified-correct answers of a prompt): up to M distinct stored items of each requested group,
uniformly at random without replacement. Items carry the group id given to ``add(group=...)``."""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["GroupBatch", "sample_groups"]


class GroupBatch(NamedTuple):
    """``sample_groups`` result: fields [G, M, ...], indices [G, M] (-1 where missing), ``mask``
    [G, M] (False where a group holds fewer than M items; such rows are zero), generations [G, M]."""

    batch: dict
    indices: torch.Tensor
    mask: torch.Tensor
    generations: torch.Tensor


def _as_group_ids(group_ids, device) -> torch.Tensor:
    if isinstance(group_ids, int) and not isinstance(group_ids, bool):
        group_ids = [group_ids]
    if isinstance(group_ids, (list, tuple)):
        group_ids = torch.tensor(group_ids, dtype=torch.int64, device=device)
    if not isinstance(group_ids, torch.Tensor):
        raise TypeError(f"group_ids must be an int, a list or a tensor, got {type(group_ids).__name__}")
    if group_ids.device != device:
        raise ValueError(f"group_ids is on {group_ids.device} but the buffer is on {device}")
    if group_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"group_ids must be int64 or int32, got {group_ids.dtype}")
    return group_ids.reshape(-1).long().contiguous()


def _order_of_stored(buf, gen) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(perm, its groups, number of stored slots or None): ``perm`` lists slots sorted by group
    (stable), in a uniformly random order within each group, stored slots before empty ones.

    With the host size known: a draw u ~ U[0, 1) per stored slot, slots ordered by u. With lazy
    counters (the host does not read the size): a draw per slot of the whole capacity, empty
    slots (generation -1) given u = 2 and group int64 max so that they sort after every stored
    slot, with no host read. Stored slots are always the first ``size`` (FIFO and reservoir
    fill slots in order), and on the CPU torch.rand(capacity)[:size] is torch.rand(size): both
    give the same order whenever no two draws tie."""
    dev = buf.device
    if not buf.lazy_counters:
        stored = buf.groups[: buf.size]
        u = torch.rand(buf.size, generator=gen, device=dev)
        by_u = torch.argsort(u)
        perm = by_u[torch.argsort(stored[by_u], stable=True)]  # sorted by group, random within group
        return perm, stored[perm].contiguous(), None
    filled = buf.generations >= 0
    u = torch.where(filled, torch.rand(buf.capacity, generator=gen, device=dev), 2.0)
    by_u = torch.argsort(u, stable=True)
    keys = torch.where(filled, buf.groups, torch.iinfo(torch.int64).max)
    perm = by_u[torch.argsort(keys[by_u], stable=True)]
    return perm, keys[perm].contiguous(), filled.sum()


def sample_groups(buf, group_ids, per_group: int) -> GroupBatch:
    """:meth:`ReplayBuffer.sample_groups`: the stored slots in a random order (torch's generator
    seeded by the buffer's seed and its next draw counter), sorted by group (stable), then the
    first ``per_group`` of each requested group. A buffer with lazy counters (a FIFO buffer on
    a device other than the CPU: ``ReplayBuffer.lazy_counters``) reads nothing on the host: it
    sorts its whole capacity, empty slots last, and an empty buffer gives an all-False ``mask``
    instead of an error."""
    if isinstance(per_group, bool) or not isinstance(per_group, int) or per_group <= 0:
        raise ValueError(f"per_group must be a positive int, got {per_group!r}")
    ids = _as_group_ids(group_ids, buf.device)
    g_count, m = ids.numel(), per_group
    dev = buf.device
    if not buf.lazy_counters and buf.size == 0:
        raise ValueError("the replay buffer is empty: add items before sampling")
    gen = torch.Generator(device=dev)
    gen.manual_seed((buf.seed * 0x9E3779B97F4A7C15 + buf._next_offset()) % (2**63))
    perm, sorted_groups, n_stored = _order_of_stored(buf, gen)
    start = torch.searchsorted(sorted_groups, ids)
    end = torch.searchsorted(sorted_groups, ids, right=True)
    if n_stored is not None:  # a group id of int64 max must not reach the empty slots
        start, end = start.clamp_max(n_stored), end.clamp_max(n_stored)
    count = end - start
    k = torch.arange(m, device=dev)
    mask = k[None, :] < count[:, None]
    pos = (start[:, None] + k[None, :]).clamp_max(perm.numel() - 1)
    idx = torch.where(mask, perm[pos], torch.full_like(pos, -1))
    safe = idx.clamp_min(0).reshape(-1)
    batch = {}
    for f, st in buf.storage.items():
        rows = st.index_select(0, safe).view(g_count, m, *st.shape[1:])
        keep = mask.view(g_count, m, *([1] * (st.dim() - 1)))
        batch[f] = torch.where(keep, rows, torch.zeros((), dtype=st.dtype, device=dev))
    gens = torch.where(mask, buf.generations[safe].view(g_count, m), torch.full_like(idx, -1))
    return GroupBatch(buf._rows_out(batch, (g_count, m)), idx, mask, gens)
