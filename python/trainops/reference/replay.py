"""Plain-PyTorch (and NumPy for the Philox counters) specification of the fused replay ops.

``sample`` is ``torch.ops.trainops.replay_sample`` written for clarity: per-slot weights w_i,
fp64 block sums over blocks of :data:`BLOCK` slots (each accumulated slot by slot), their
exclusive prefix sums, stratified targets t_j = (j + u_j) / R * total located by a binary
search over the blocks and a running sum inside the block; without replacement, the R largest
Gumbel / Efraimidis-Spirakis keys log(u_i) / w_i. PER importance weights (Schaul et al., 2016):
w_j = (N P(j))^-beta / max w, P(j) = w_j / total, the max over the buffer (smallest positive
weight) or over the batch. ``insert`` and ``update_priorities`` specify batched FIFO /
reservoir insertion and generation-checked, duplicate-safe priority updates.
Random numbers: Philox4x32-10 (Salmon et al., SC 2011), as in csrc/common/philox.h.
"""
from __future__ import annotations

import numpy as np
import torch

from trainops._replay_spec import BLOCK, EVICTIONS, WEIGHT_MODE_NUMBERS, WEIGHT_MODES, block_stats, priority_weight

__all__ = ["BLOCK", "WEIGHT_MODES", "EVICTIONS", "philox4x32", "philox_uniform01", "sample", "insert",
           "update_priorities", "block_stats", "priority_weight", "reservoir_keys"]

MODES = WEIGHT_MODE_NUMBERS  # old name: the weight modes' schema numbers (sample(mode=...) took them)

STREAM_SAMPLE, STREAM_GUMBEL, STREAM_RESERVOIR = 0, 1, 2

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_MASK = np.uint64(0xFFFFFFFF)


def philox4x32(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 counters held in uint64 arrays (products fit in 64 bits)."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) & _MASK for c in (c0, c1, c2, c3))
    c0, c1, c2, c3 = np.broadcast_arrays(c0, c1, c2, c3)
    k0, k1 = np.uint64(k0) & _MASK, np.uint64(k1) & _MASK
    for _ in range(10):
        p0 = _M0 * c0
        p1 = _M1 * c2
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & _MASK, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _MASK
        k0 = (k0 + _W0) & _MASK
        k1 = (k1 + _W1) & _MASK
    return c0, c1, c2, c3


def _bits53(seed: int, offset: int, index, stream: int):
    seed &= 0xFFFFFFFFFFFFFFFF
    offset &= 0xFFFFFFFFFFFFFFFF
    index = np.asarray(index, dtype=np.uint64)
    x0, x1, _, _ = philox4x32(index & _MASK, index >> np.uint64(32), offset & 0xFFFFFFFF,
                              ((offset >> 32) << 4 | (stream & 0xF)) & 0xFFFFFFFF, seed & 0xFFFFFFFF, seed >> 32)
    return ((x0 << np.uint64(32)) | x1) >> np.uint64(11)


def philox_uniform01(seed: int, offset: int, index, stream: int, open_interval: bool = False) -> torch.Tensor:
    """Uniform float64 draws in [0, 1) (or (0, 1)) for each index: the replay kernels' Philox
    stream (53 bits of the counter (index, offset, stream) under the key seed)."""
    bits = _bits53(seed, offset, index, stream).astype(np.float64)
    if open_interval:
        bits = bits + 0.5
    return torch.from_numpy(bits * (1.0 / 9007199254740992.0))


uniform01 = philox_uniform01  # old name


def reservoir_keys(seed: int, serials) -> torch.Tensor:
    """Reservoir keys of the stream items with the given serial numbers."""
    return philox_uniform01(seed, 0, serials, STREAM_RESERVOIR)


def slot_weights(weight_mode: str, size: int, weights=None, slot_key=None, table=None, now: int = 0) -> torch.Tensor:
    """Per-slot sampling weights w_i (float64) of the first ``size`` slots."""
    if weight_mode == "uniform":
        return torch.ones(size, dtype=torch.float64)
    if weight_mode == "weights":
        return weights[:size].cpu().double()
    key = slot_key[:size].cpu()
    if weight_mode == "recency":
        return 1.0 / ((now - key).clamp_min(0) + 1).double()
    tab = table.cpu().double()
    ok = (key >= 0) & (key < tab.numel())
    return torch.where(ok, tab[key.clamp(0, max(tab.numel() - 1, 0))], torch.zeros((), dtype=torch.float64))


def _locate(w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    sums, _ = block_stats(w)
    nb = sums.numel()
    inclusive = torch.cumsum(sums, 0)
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64), inclusive[:-1]])
    b = (torch.searchsorted(prefix, t, right=True) - 1).clamp(0, nb - 1)
    positive_block = torch.where(sums > 0, torch.arange(nb), torch.zeros(nb, dtype=torch.long))
    b = torch.cummax(positive_block, 0).values[b]  # step back over trailing zero-sum blocks
    padded = torch.zeros(nb * BLOCK, dtype=torch.float64)
    padded[: w.numel()] = w
    rows = padded.view(nb, BLOCK)[b]
    cum = torch.cumsum(torch.cat([prefix[b, None], rows], 1), 1)[:, 1:]
    hit = (rows > 0) & (t[:, None] < cum)
    first = hit.int().argmax(1)
    last_pos = BLOCK - 1 - (rows > 0).flip(1).int().argmax(1)
    pos = torch.where(hit.any(1), first, last_pos)
    return b * BLOCK + pos


def sample(storage, n_replay: int, *, size: int, fresh=None, weight_mode: str = "uniform", weights=None,
           slot_key=None, table=None, lengths=None, ragged=None, now: int = 0, beta: float = 0.0,
           batch_max: bool = False, replacement: bool = True, seed: int = 0, offset: int = 0, mode=None):
    """Reference of ``replay_sample``: returns (out fields, indices, importance weights, is_replay).

    ``storage``: list of [capacity, ...] tensors; ``fresh``: list of [F, ...] tensors put first.
    Fresh rows have index -1 and weight 1. Ragged fields copy their first lengths[slot] elements.
    ``weight_mode``: one of :data:`WEIGHT_MODES` (``mode``, its old name, also takes the number).
    """
    if mode is not None:
        if weight_mode != "uniform":
            raise TypeError("pass weight_mode= only (mode= is its old name)")
        weight_mode = WEIGHT_MODES[mode] if isinstance(mode, int) else mode
    if weight_mode not in WEIGHT_MODES:
        raise ValueError(f"weight_mode must be one of {WEIGHT_MODES}, got {weight_mode!r}")
    if size <= 0:
        raise ValueError("size must be positive (empty buffer)")
    w = slot_weights(weight_mode, size, weights, slot_key, table, now)
    total = float(size)
    if weight_mode != "uniform":
        sums, _ = block_stats(w)
        total = float(torch.cumsum(sums, 0)[-1])
    uniform = weight_mode == "uniform" or not (total > 0.0 and np.isfinite(total))
    if uniform:
        w = torch.ones(size, dtype=torch.float64)
    j = torch.arange(n_replay, dtype=torch.float64)
    if replacement:
        u = philox_uniform01(seed, offset, np.arange(n_replay), STREAM_SAMPLE)
        if uniform:
            t = (j + u) / n_replay * float(size)
            slots = t.long().clamp_max(size - 1)
        else:
            t = (j + u) / n_replay * total
            slots = _locate(w, t)
    else:
        if n_replay > size:
            raise ValueError(f"cannot draw {n_replay} rows without replacement from {size} items")
        u = philox_uniform01(seed, offset, np.arange(size), STREAM_GUMBEL, open_interval=True)
        keys = torch.where(w > 0, torch.log(u) / w, torch.full_like(w, float("-inf")))
        slots = torch.sort(keys, descending=True, stable=True).indices[:n_replay]
    wsel = w[slots]
    if uniform or beta == 0.0 or n_replay == 0:  # no draws: nothing to normalize by
        isw = torch.ones(n_replay, dtype=torch.float32)
    else:
        if batch_max:
            ref = float(wsel[wsel > 0].min())
        else:
            ref = float(w[w > 0].min())
        n = float(size)
        num = torch.pow(n * (wsel / total), -beta)
        den = (n * (ref / total)) ** (-beta)
        isw = torch.where(wsel > 0, num / den, torch.zeros_like(num)).float()

    n_fresh = 0 if fresh is None else fresh[0].shape[0]
    ragged = ragged or [False] * len(storage)
    outs = []
    for f, st in enumerate(storage):
        rows = st.cpu()[slots].clone()
        if ragged[f]:
            lens = lengths.cpu()[slots].long().clamp(0, st.shape[1])
            keep = torch.arange(st.shape[1])[None, :] < lens[:, None]
            rows = torch.where(keep, rows, torch.zeros((), dtype=rows.dtype))
        if fresh is not None:
            rows = torch.cat([fresh[f].cpu(), rows])
        outs.append(rows)
    indices = torch.cat([torch.full((n_fresh,), -1, dtype=torch.long), slots])
    isw = torch.cat([torch.ones(n_fresh, dtype=torch.float32), isw])
    is_replay = torch.arange(n_fresh + n_replay) >= n_fresh
    return outs, indices, isw, is_replay


def insert(storage, batch, generations, stamps, keys, *, eviction: str, size: int, cursor: int, step: int,
           seed: int):
    """Reference of ``replay_insert`` on copies: returns (storage, generations, stamps, keys, slots).

    FIFO: item i (stream serial cursor + i) goes to slot (cursor + i) mod capacity; of a batch
    larger than the buffer only the last ``capacity`` items are stored. Reservoir: free slots
    are filled in order, then the k-th largest remaining key (ties: earlier item) replaces the
    k-th smallest stored key (ties: lower slot) while it is strictly larger; an item that filled a
    slot earlier in the same batch and is displaced again is not stored (-1).
    """
    if eviction not in EVICTIONS:
        raise ValueError(f"eviction must be one of {EVICTIONS}, got {eviction!r}")
    storage = [s.clone() for s in storage]
    generations, stamps, keys = generations.clone(), stamps.clone(), keys.clone()
    capacity = storage[0].shape[0]
    n = batch[0].shape[0]
    slots = [-1] * n
    bkeys = reservoir_keys(seed, np.arange(cursor, cursor + n)) if eviction == "reservoir" else None
    if eviction == "fifo":
        for i in range(max(0, n - capacity), n):
            slots[i] = (cursor + i) % capacity
    else:
        nfill = min(n, capacity - size)
        for i in range(nfill):
            slots[i] = size + i
            keys[size + i] = bkeys[i]
        rest = list(range(nfill, n))
        if rest:
            rest.sort(key=lambda i: (-float(bkeys[i]), i))
            stored = sorted(range(capacity), key=lambda s: (float(keys[s]), s))
            for k in range(min(len(rest), capacity)):
                if not float(bkeys[rest[k]]) > float(keys[stored[k]]):
                    break
                slots[rest[k]] = stored[k]
                if stored[k] >= size:  # filled earlier in this batch, displaced again
                    slots[stored[k] - size] = -1
    for i, s in enumerate(slots):
        if s < 0:
            continue
        for st, b in zip(storage, batch):
            st[s] = b[i]
        generations[s] = cursor + i
        stamps[s] = step
        if eviction == "reservoir":
            keys[s] = bkeys[i]
    return storage, generations, stamps, keys, torch.tensor(slots, dtype=torch.long)


def update_priorities(priorities, generations, indices, values, expected=None, *, alpha: float, eps: float,
                      size: int):
    """Reference of ``replay_update_priorities``: returns (priorities, weights, block sums, mins, applied).

    Entry j applies when 0 <= indices[j] < size, the slot's generation equals expected[j] (if
    given), and no later valid entry names the same slot (the last writer wins).
    """
    priorities = priorities.clone()
    n = indices.numel()
    applied = torch.zeros(n, dtype=torch.bool)
    winner = {}
    for j in range(n):
        s = int(indices[j])
        if 0 <= s < size and (expected is None or int(generations[s]) == int(expected[j])):
            winner[s] = j
    for s, j in winner.items():
        applied[j] = True
        priorities[s] = values[j]
    weights = torch.zeros_like(priorities)
    weights[:size] = priority_weight(priorities[:size], alpha, eps)
    return priorities, weights, applied
