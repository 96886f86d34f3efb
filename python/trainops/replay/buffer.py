"""Device-resident replay buffer with fused sampling (``trainops.replay.ReplayBuffer``).

Storage is one [capacity, ...] tensor per field of ``spec`` on ``device``; sampling, insertion
and priority updates are single trainops ops (:mod:`trainops.ops.replay`) with host-side
counters only, so sampling needs no host synchronization on CUDA.

Samplers (probability of slot i among the N stored items):
  uniform      1 / N
  prioritized  PER (Schaul et al., 2016): p_i^alpha / sum p^alpha, importance weights
               (N P(i))^-beta / max w (max over the buffer, or the batch with weight_norm="batch")
  recency      proportional to 1 / (age_i + 1), age in ``add`` calls since insertion
  power_law    per task t: proportional to (steps since task t was last added + 1)^-exponent,
               uniform within the task (rehearsal with power-law recency)
``sample_groups`` draws M items per group uniformly without replacement (RLEP, arXiv 2507.07451:
replayed verified-correct answers of a prompt). Eviction: ``fifo`` ring, or ``reservoir``
(uniform random keys, the buffer keeps the top-capacity keys: a uniform sample of the stream).
"""
from __future__ import annotations

import json
import math
import os
from typing import NamedTuple

import torch

from trainops.ops import replay as rops

__all__ = ["ReplayBuffer", "ReplayBatch", "GroupBatch", "SAMPLERS", "EVICTIONS"]

SAMPLERS = ("uniform", "prioritized", "recency", "power_law")
EVICTIONS = ("fifo", "reservoir")
_FORMAT = "trainops.replay/1"


class ReplayBatch(NamedTuple):
    """A sampled batch: fields [B, ...] (fresh rows first), slot indices (-1 for fresh rows),
    importance weights (1 for fresh rows), ``is_replay`` mask and the slots' generation stamps
    (-1 for fresh rows; pass them to ``update_priorities`` to drop updates of overwritten slots)."""

    batch: dict
    indices: torch.Tensor
    weights: torch.Tensor
    is_replay: torch.Tensor
    generations: torch.Tensor


class GroupBatch(NamedTuple):
    """``sample_groups`` result: fields [G, M, ...], indices [G, M] (-1 where missing), ``mask``
    [G, M] (False where a group holds fewer than M items; such rows are zero), generations [G, M]."""

    batch: dict
    indices: torch.Tensor
    mask: torch.Tensor
    generations: torch.Tensor


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name.replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in the saved spec")
    return dtype


class _BufferLoad:
    """``ReplayBuffer.load(path)`` builds a new buffer; ``buffer.load(path)`` loads in place."""

    def __get__(self, obj, cls):
        if obj is None:
            return lambda path, device=None: cls._load_new(path, device)
        return lambda path: obj._load_into(path)


class ReplayBuffer:
    """Replay buffer of ``capacity`` items; ``spec`` maps field name -> (row shape, dtype).

    Args:
        capacity: number of stored items.
        spec: e.g. ``{"tokens": ((L,), torch.int32), "length": ((), torch.int32), "reward": ((), torch.float32)}``.
        device: where storage lives and sampling runs.
        sampler: ``uniform`` | ``prioritized`` | ``recency`` | ``power_law``.
        eviction: ``fifo`` | ``reservoir``.
        alpha, beta: PER exponents (beta may be annealed by assigning ``buffer.beta``).
        seed: seed of every random draw (Philox counters: reproducible, checkpointed).
        weight_norm: ``buffer`` (PER: divide by the buffer-wide max weight) or ``batch``.
        priority_eps: priorities are clamped below at this value before ^alpha.
        task_field, power_law_exponent, max_tasks: the power-law sampler's task field (int64,
            ids in [0, max_tasks)) and exponent.
        ragged: field name -> name of its int32 length field; sampled rows of that [L] field
            carry only their first ``length`` elements (the rest is zero).
    """

    load = _BufferLoad()

    def __init__(self, capacity: int, spec: dict, device="cpu", sampler: str = "uniform", eviction: str = "fifo",
                 alpha: float = 0.6, beta: float = 0.4, seed: int = 0, *, weight_norm: str = "buffer",
                 priority_eps: float = 1e-6, task_field: str = "task", power_law_exponent: float = 1.0,
                 max_tasks: int = 1024, ragged: dict | None = None):
        if isinstance(capacity, bool) or not isinstance(capacity, int):
            raise TypeError(f"capacity must be an int, got {type(capacity).__name__}")
        if capacity <= 0 or capacity >= 2**31:
            raise ValueError(f"capacity must be in [1, 2^31), got {capacity}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if eviction not in EVICTIONS:
            raise ValueError(f"eviction must be one of {EVICTIONS}, got {eviction!r}")
        if weight_norm not in ("buffer", "batch"):
            raise ValueError(f"weight_norm must be 'buffer' or 'batch', got {weight_norm!r}")
        for name, v in (("alpha", alpha), ("beta", beta), ("priority_eps", priority_eps),
                        ("power_law_exponent", power_law_exponent)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.capacity = capacity
        self.device = torch.device(device)
        self.spec = self._normalize_spec(spec)
        self.sampler, self.eviction = sampler, eviction
        self.alpha, self.beta, self.seed = float(alpha), float(beta), seed
        self.weight_norm, self.priority_eps = weight_norm, float(priority_eps)
        self.task_field, self.power_law_exponent, self.max_tasks = task_field, float(power_law_exponent), int(max_tasks)
        self.ragged = dict(ragged or {})
        self._check_options()
        dev = self.device
        self.storage = {name: torch.zeros((capacity, *shape), dtype=dtype, device=dev)
                        for name, (shape, dtype) in self.spec.items()}
        self.generations = torch.full((capacity,), -1, dtype=torch.int64, device=dev)
        self.stamps = torch.zeros(capacity, dtype=torch.int64, device=dev)
        self.keys = torch.zeros(capacity, dtype=torch.float64, device=dev)
        self.priorities = torch.zeros(capacity, dtype=torch.float32, device=dev)
        self.weights = torch.zeros(capacity, dtype=torch.float32, device=dev)
        self.block_stats = torch.zeros(2, rops.num_blocks(capacity), dtype=torch.float64, device=dev)
        self.block_stats[1].fill_(float("inf"))
        # One extra, never-read slot takes the writes of items that were not stored (slot -1),
        # so group ids scatter without a host sync or colliding writes.
        self._groups_ext = torch.full((capacity + 1,), -1, dtype=torch.int64, device=dev)
        self.groups = self._groups_ext[:capacity]
        self.max_priority = torch.ones(1, dtype=torch.float32, device=dev)
        self.task_last = torch.full((self.max_tasks,), -1, dtype=torch.int64, device=dev)
        self._winner = torch.full((capacity,), -1, dtype=torch.int32, device=dev)
        self.size = 0       # stored items
        self.cursor = 0     # items ever offered (stream serial of the next item)
        self.step = 0       # add() calls so far (the clock of recency and power_law)
        self.rng_offset = 0  # random draws made so far (Philox counter)

    # ------------------------------------------------------------------ set-up and checks
    @staticmethod
    def _normalize_spec(spec) -> dict:
        if not isinstance(spec, dict) or not spec:
            raise TypeError("spec must be a non-empty dict: field name -> (shape, dtype)")
        out = {}
        for name, entry in spec.items():
            if not isinstance(name, str) or not name or "." in name:
                raise ValueError(f"spec field names must be non-empty strings without '.', got {name!r}")
            try:
                shape, dtype = entry
            except (TypeError, ValueError):
                raise TypeError(f"spec[{name!r}] must be (shape, dtype), got {entry!r}") from None
            if isinstance(shape, int):
                shape = (shape,)
            shape = tuple(int(s) for s in shape)
            if any(s <= 0 for s in shape):
                raise ValueError(f"spec[{name!r}] shape must be positive, got {shape}")
            if not isinstance(dtype, torch.dtype):
                raise TypeError(f"spec[{name!r}] dtype must be a torch.dtype, got {dtype!r}")
            out[name] = (shape, dtype)
        return out

    def _check_options(self) -> None:
        if self.sampler == "power_law":
            if self.task_field not in self.spec:
                raise ValueError(f"sampler 'power_law' needs the task field {self.task_field!r} in spec")
            shape, dtype = self.spec[self.task_field]
            if shape != () or dtype != torch.int64:
                raise ValueError(f"task field {self.task_field!r} must be spec'd as ((), torch.int64)")
            if self.max_tasks <= 0:
                raise ValueError(f"max_tasks must be positive, got {self.max_tasks}")
        for field, length_field in self.ragged.items():
            if field not in self.spec or len(self.spec[field][0]) != 1:
                raise ValueError(f"ragged field {field!r} must be a spec field of shape (L,)")
            if self.spec.get(length_field) != ((), torch.int32):
                raise ValueError(f"length field {length_field!r} of {field!r} must be spec'd as ((), torch.int32)")
        if len(set(self.ragged.values())) > 1:
            raise ValueError("all ragged fields must share one length field")

    def __len__(self) -> int:
        return self.size

    def _check_batch(self, batch, name: str) -> int:
        if not isinstance(batch, dict):
            raise TypeError(f"{name} must be a dict of tensors with the fields {sorted(self.spec)}")
        missing = sorted(set(self.spec) - set(batch))
        extra = sorted(set(batch) - set(self.spec))
        if missing or extra:
            raise ValueError(f"{name} does not match the spec: missing fields {missing}, unknown fields {extra}")
        n = None
        for field, (shape, dtype) in self.spec.items():
            t = batch[field]
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{field!r}] must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != dtype:
                raise TypeError(f"{name}[{field!r}] has dtype {t.dtype}, the spec says {dtype}")
            if t.device != self.device:
                raise ValueError(f"{name}[{field!r}] is on {t.device} but the buffer is on {self.device}")
            if t.dim() != len(shape) + 1 or tuple(t.shape[1:]) != shape:
                raise ValueError(f"{name}[{field!r}] must have shape (n, *{shape}), got {tuple(t.shape)}")
            if n is None:
                n = t.shape[0]
            elif t.shape[0] != n:
                raise ValueError(f"{name}[{field!r}] has {t.shape[0]} rows but other fields have {n}")
        return n

    def _per_item(self, value, n: int, dtype, name: str):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return torch.full((n,), value, dtype=dtype, device=self.device)
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}")
        if value.device != self.device:
            raise ValueError(f"{name} is on {value.device} but the buffer is on {self.device}")
        if value.numel() != n:
            raise ValueError(f"{name} must have one value per item ({n}), got {value.numel()}")
        return value.reshape(n).to(dtype)

    # ------------------------------------------------------------------ writing
    def add(self, batch: dict, priority=None, group=None) -> torch.Tensor:
        """Insert a batch (dict of [n, ...] tensors matching ``spec``); returns each item's slot
        (int64 [n]; -1 if not stored: reservoir rejection, or overwritten within a too-large batch).

        ``priority``: number or [n] tensor (default: the largest priority seen, as in PER);
        ``group``: number or [n] int64 tensor of group ids for ``sample_groups``.
        """
        n = self._check_batch(batch, "batch")
        if n == 0:
            raise ValueError("batch is empty: nothing to add")
        prio = None if priority is None else self._per_item(priority, n, torch.float32, "priority")
        grp = None if group is None else self._per_item(group, n, torch.int64, "group")
        if prio is not None:
            self._check_priorities(prio)
        if self.sampler == "power_law":
            tasks = batch[self.task_field]
            if bool(((tasks < 0) | (tasks >= self.max_tasks)).any()):
                raise ValueError(f"task ids in {self.task_field!r} must be in [0, max_tasks={self.max_tasks})")
        fields = [batch[f].contiguous() for f in self.spec]
        slots = rops.replay_insert(list(self.storage.values()), fields, self.generations, self.stamps, self.keys,
                                   eviction=self.eviction, size=self.size, cursor=self.cursor, step=self.step,
                                   seed=self.seed)
        self.cursor += n
        self.size = min(self.capacity, self.size + n)
        if prio is None:
            prio = self.max_priority.expand(n)
        else:
            self.max_priority = torch.maximum(self.max_priority, prio.max().reshape(1))
        rops.replay_update_priorities(self.priorities, self.weights, self.block_stats, self._winner, self.generations,
                                      slots, prio, None, alpha=self.alpha, eps=self.priority_eps, size=self.size,
                                      validate=False)
        if grp is not None:
            self._groups_ext.index_put_((torch.where(slots >= 0, slots, self.capacity),), grp)
        if self.sampler == "power_law":
            self.task_last.index_fill_(0, batch[self.task_field].reshape(-1), self.step)
        self.step += 1
        return slots

    @staticmethod
    def _check_priorities(p: torch.Tensor) -> None:
        if p.numel() == 0 or bool(((p >= 0) & (p < float("inf"))).all()):  # one host read when all is well
            return
        if bool(torch.isnan(p).any()):
            raise ValueError("priorities contain NaN")
        if bool((p < 0).any()):
            raise ValueError("priorities must be >= 0 (got a negative value)")
        if bool(torch.isinf(p).any()):
            raise ValueError("priorities must be finite (got Inf)")

    def update_priorities(self, indices: torch.Tensor, priorities, generation=None) -> torch.Tensor:
        """Set the priorities of sampled slots; returns which entries were applied (bool).

        Entries with index -1 (fresh rows), with a ``generation`` that no longer matches the slot
        (the slot was overwritten since sampling) or superseded by a later entry for the same
        slot (duplicates: the last one wins) are ignored.
        """
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
        if indices.device != self.device:
            raise ValueError(f"indices is on {indices.device} but the buffer is on {self.device}")
        if indices.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"indices must be int64 or int32, got {indices.dtype}")
        n = indices.numel()
        prio = self._per_item(priorities, n, torch.float32, "priorities")
        if generation is not None:
            generation = self._per_item(generation, n, torch.int64, "generation")
        if n and bool((indices >= self.capacity).any()):
            raise ValueError(f"indices must be < capacity ({self.capacity})")
        if self.device.type != "cpu":  # the CPU kernel checks the values itself, before writing
            self._check_priorities(prio)
        applied = rops.replay_update_priorities(self.priorities, self.weights, self.block_stats, self._winner,
                                                self.generations, indices, prio, generation, alpha=self.alpha,
                                                eps=self.priority_eps, size=self.size, validate=False)
        if n:
            top = torch.where(applied, prio, torch.zeros_like(prio)).max().reshape(1)
            self.max_priority = torch.maximum(self.max_priority, top)
        return applied

    # ------------------------------------------------------------------ sampling
    def _mode_args(self) -> dict:
        if self.sampler == "uniform":
            return {"mode": "uniform"}
        if self.sampler == "prioritized":
            return {"mode": "weights", "weights": self.weights, "block_stats": self.block_stats, "beta": self.beta,
                    "batch_max": self.weight_norm == "batch"}
        if self.sampler == "recency":
            return {"mode": "recency", "slot_key": self.stamps, "now": max(self.step - 1, 0)}
        return {"mode": "table", "slot_key": self.storage[self.task_field], "table": self.task_table()}

    def task_table(self) -> torch.Tensor:
        """Per-slot weight of each task for the power-law sampler (float64 [max_tasks]):
        (now - last_added(t) + 1)^-exponent / count(t), so tasks get power-law probabilities and
        items within a task equal shares. Runs on the device, no host sync."""
        tasks = self.storage[self.task_field][: self.size]
        counts = torch.zeros(self.max_tasks, dtype=torch.float64, device=self.device)
        counts.scatter_add_(0, tasks.clamp(0, self.max_tasks - 1), torch.ones_like(tasks, dtype=torch.float64))
        now = max(self.step - 1, 0)
        age = (now - self.task_last).clamp_min(0).double()
        w = torch.pow(age + 1.0, -self.power_law_exponent)
        return torch.where(counts > 0, w / counts.clamp_min(1.0), torch.zeros_like(w)).contiguous()

    def _next_offset(self) -> int:
        off = self.rng_offset
        self.rng_offset += 1
        return off

    def sample(self, batch_size: int, fresh: dict | None = None, replay_ratio: float | None = None, *,
               replacement: bool = True) -> ReplayBatch:
        """A batch of ``batch_size`` rows: fresh rows first, then replayed rows.

        Without ``fresh``: all rows are replayed (``replay_ratio`` must be None or 1). With
        ``fresh`` and a ``replay_ratio``: exactly round(replay_ratio * batch_size) replayed rows
        (half rounded up) after the first batch_size - that many fresh rows; ``fresh`` must hold
        at least that many. With ``fresh`` and no ratio: all of ``fresh`` plus batch_size - n_fresh
        replayed rows.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int):
            raise TypeError(f"batch_size must be an int, got {type(batch_size).__name__}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if replay_ratio is not None:
            if isinstance(replay_ratio, bool) or not isinstance(replay_ratio, (int, float)) \
                    or not 0.0 <= replay_ratio <= 1.0:
                raise ValueError(f"replay_ratio must be a number in [0, 1], got {replay_ratio!r}")
        if fresh is None:
            if replay_ratio is not None and replay_ratio != 1.0:
                raise ValueError("replay_ratio < 1 needs fresh rows: pass fresh=")
            n_fresh, fresh_fields = 0, None
        else:
            have = self._check_batch(fresh, "fresh")
            if replay_ratio is None:
                n_fresh = have
                if n_fresh > batch_size:
                    raise ValueError(f"fresh has {n_fresh} rows, more than batch_size ({batch_size})")
            else:
                n_fresh = batch_size - int(math.floor(replay_ratio * batch_size + 0.5))
                if have < n_fresh:
                    raise ValueError(f"fresh has {have} rows; replay_ratio={replay_ratio} needs {n_fresh}")
            fresh_fields = [fresh[f][:n_fresh] for f in self.spec]
        n_replay = batch_size - n_fresh
        if n_replay > 0 and self.size == 0:
            raise ValueError("the replay buffer is empty: add items before sampling")
        if not replacement and n_replay > self.size:
            raise ValueError(f"cannot sample {n_replay} rows without replacement from the {self.size} stored items")
        names = list(self.spec)
        storage = [self.storage[f] for f in names] + [self.generations.view(self.capacity, 1)]
        if fresh_fields is not None:
            fresh_fields = fresh_fields + [torch.full((n_fresh, 1), -1, dtype=torch.int64, device=self.device)]
        ragged = [f in self.ragged for f in names] + [False]
        lengths = self.storage[next(iter(self.ragged.values()))] if self.ragged else None
        if n_replay == 0:
            out = [torch.cat([fr]) for fr in fresh_fields]
            rows = batch_size
            batch = dict(zip(names, out[:-1]))
            return ReplayBatch(batch, torch.full((rows,), -1, dtype=torch.int64, device=self.device),
                               torch.ones(rows, device=self.device), torch.zeros(rows, dtype=torch.bool,
                                                                                  device=self.device),
                               out[-1].view(rows))
        out, indices, isw, is_replay = rops.replay_sample(
            storage, n_replay, size=self.size, fresh=fresh_fields, lengths=lengths, ragged=ragged,
            replacement=replacement, seed=self.seed, offset=self._next_offset(), **self._mode_args())
        batch = dict(zip(names, out[:-1]))
        return ReplayBatch(batch, indices, isw, is_replay, out[-1].view(-1))

    def sample_groups(self, group_ids, per_group: int) -> GroupBatch:
        """RLEP grouped replay: up to ``per_group`` distinct stored items of each requested group,
        uniformly at random without replacement; ``mask`` is False where a group has fewer."""
        if isinstance(per_group, bool) or not isinstance(per_group, int) or per_group <= 0:
            raise ValueError(f"per_group must be a positive int, got {per_group!r}")
        ids = self._as_group_ids(group_ids)
        g_count, m = ids.numel(), per_group
        dev = self.device
        if self.size == 0:
            raise ValueError("the replay buffer is empty: add items before sampling")
        stored = self.groups[: self.size]
        gen = torch.Generator(device=dev)
        gen.manual_seed((self.seed * 0x9E3779B97F4A7C15 + self._next_offset()) % (2**63))
        u = torch.rand(self.size, generator=gen, device=dev)
        by_u = torch.argsort(u)
        perm = by_u[torch.argsort(stored[by_u], stable=True)]  # sorted by group, random within group
        sorted_groups = stored[perm].contiguous()
        start = torch.searchsorted(sorted_groups, ids)
        count = torch.searchsorted(sorted_groups, ids, right=True) - start
        k = torch.arange(m, device=dev)
        mask = k[None, :] < count[:, None]
        pos = (start[:, None] + k[None, :]).clamp_max(self.size - 1)
        idx = torch.where(mask, perm[pos], torch.full_like(pos, -1))
        safe = idx.clamp_min(0).reshape(-1)
        batch = {}
        for f, st in self.storage.items():
            rows = st.index_select(0, safe).view(g_count, m, *st.shape[1:])
            keep = mask.view(g_count, m, *([1] * (st.dim() - 1)))
            batch[f] = torch.where(keep, rows, torch.zeros((), dtype=st.dtype, device=dev))
        gens = torch.where(mask, self.generations[safe].view(g_count, m), torch.full_like(idx, -1))
        return GroupBatch(batch, idx, mask, gens)

    def _as_group_ids(self, group_ids) -> torch.Tensor:
        if isinstance(group_ids, int) and not isinstance(group_ids, bool):
            group_ids = [group_ids]
        if isinstance(group_ids, (list, tuple)):
            group_ids = torch.tensor(group_ids, dtype=torch.int64, device=self.device)
        if not isinstance(group_ids, torch.Tensor):
            raise TypeError(f"group_ids must be an int, a list or a tensor, got {type(group_ids).__name__}")
        if group_ids.device != self.device:
            raise ValueError(f"group_ids is on {group_ids.device} but the buffer is on {self.device}")
        if group_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"group_ids must be int64 or int32, got {group_ids.dtype}")
        return group_ids.reshape(-1).long()

    # ------------------------------------------------------------------ checkpoints
    def config(self) -> dict:
        return {"format": _FORMAT, "capacity": self.capacity, "sampler": self.sampler, "eviction": self.eviction,
                "alpha": self.alpha, "beta": self.beta, "seed": self.seed, "weight_norm": self.weight_norm,
                "priority_eps": self.priority_eps, "task_field": self.task_field,
                "power_law_exponent": self.power_law_exponent, "max_tasks": self.max_tasks, "ragged": self.ragged,
                "spec": {k: [list(s), str(d).replace("torch.", "")] for k, (s, d) in self.spec.items()}}

    def state_dict(self) -> dict:
        """Everything needed to resume: storage, priorities, weights, block sums, generations,
        stamps, reservoir keys, groups, task clocks, counters and RNG offset (tensors only,
        plus a ``config`` dict of plain values)."""
        state = {f"storage.{k}": v for k, v in self.storage.items()}
        state.update(generations=self.generations, stamps=self.stamps, keys=self.keys, priorities=self.priorities,
                     weights=self.weights, block_stats=self.block_stats, groups=self.groups,
                     max_priority=self.max_priority, task_last=self.task_last,
                     counters=torch.tensor([self.size, self.cursor, self.step, self.rng_offset], dtype=torch.int64))
        state["config"] = self.config()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict``; the config (capacity, spec, sampler, ...) must match."""
        if not isinstance(state, dict) or "config" not in state:
            raise TypeError("state must be a dict produced by ReplayBuffer.state_dict()")
        cfg, mine = dict(state["config"]), self.config()
        diff = sorted(k for k in mine if k not in ("beta",) and cfg.get(k) != mine[k])
        if diff:
            raise ValueError(f"state does not match this buffer's configuration in {diff}")
        names = [f"storage.{k}" for k in self.spec] + ["generations", "stamps", "keys", "priorities", "weights",
                                                       "block_stats", "groups", "max_priority", "task_last",
                                                       "counters"]
        missing = [k for k in names if k not in state]
        if missing:
            raise ValueError(f"state is missing entries {missing}")
        for k, v in self.storage.items():
            self._copy_into(v, state[f"storage.{k}"], f"storage.{k}")
        for k in names[len(self.spec):-1]:
            self._copy_into(getattr(self, k), state[k], k)
        size, cursor, step, offset = (int(x) for x in state["counters"].tolist())
        self.size, self.cursor, self.step, self.rng_offset = size, cursor, step, offset
        self.beta = float(cfg.get("beta", self.beta))
        self._winner.fill_(-1)

    @staticmethod
    def _copy_into(dst: torch.Tensor, src, name: str) -> None:
        if not isinstance(src, torch.Tensor) or src.shape != dst.shape or src.dtype != dst.dtype:
            raise ValueError(f"state entry {name!r} must be a {dst.dtype} tensor of shape {tuple(dst.shape)}")
        dst.copy_(src)

    def save(self, path: str | os.PathLike) -> None:
        """Write the state to ``path``: safetensors if installed (``.safetensors``), else a
        ``torch.save`` file readable with ``torch.load(weights_only=True)``."""
        state = self.state_dict()
        cfg = state.pop("config")
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        if str(path).endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file(tensors, str(path), metadata={"trainops.replay": json.dumps(cfg)})
        else:
            torch.save({"tensors": tensors, "config": json.dumps(cfg)}, path)

    @staticmethod
    def _read(path):
        if str(path).endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                cfg = json.loads(f.metadata()["trainops.replay"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        else:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            cfg, tensors = json.loads(blob["config"]), blob["tensors"]
        if cfg.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a trainops replay buffer file")
        return cfg, tensors

    @classmethod
    def _load_new(cls, path, device=None) -> "ReplayBuffer":
        cfg, tensors = cls._read(path)
        spec = {k: (tuple(s), _dtype_from_name(d)) for k, (s, d) in cfg["spec"].items()}
        buf = cls(cfg["capacity"], spec, device=device or "cpu", sampler=cfg["sampler"], eviction=cfg["eviction"],
                  alpha=cfg["alpha"], beta=cfg["beta"], seed=cfg["seed"], weight_norm=cfg["weight_norm"],
                  priority_eps=cfg["priority_eps"], task_field=cfg["task_field"],
                  power_law_exponent=cfg["power_law_exponent"], max_tasks=cfg["max_tasks"], ragged=cfg["ragged"])
        buf.load_state_dict({**tensors, "config": cfg})
        return buf

    def _load_into(self, path) -> "ReplayBuffer":
        cfg, tensors = self._read(path)
        self.load_state_dict({**tensors, "config": cfg})
        return self
