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
Each sampler is a policy over one of the op's weight modes (:data:`trainops.ops.replay.WEIGHT_MODES`):
uniform -> "uniform", prioritized -> "weights" (plus importance weights), recency -> "recency",
power_law -> "table" (a per-task weight table).
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

from trainops._validation import CheckedFloat, check_finite_float, check_int
from trainops.ops import replay as rops
from trainops._replay_spec import EVICTIONS
from trainops._replay_spec import block_stats as _block_stats
from trainops._replay_spec import priority_weight as _priority_weight
from trainops.replay import _rows
from trainops.replay._host import host_range

__all__ = ["ReplayBuffer", "ReplayBatch", "GroupBatch", "SAMPLERS", "EVICTIONS"]

SAMPLERS = ("uniform", "prioritized", "recency", "power_law")
_FORMAT = "trainops.replay/1"


class ReplayBatch(NamedTuple):
    """A sampled batch: fields [B, ...] (fresh rows first; a dict keyed like the spec, or a
    TensorDict when TensorDicts were stored), slot indices (-1 for fresh rows),
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


def _spec_from_config(spec) -> dict:
    """A saved ``config()["spec"]`` (field name -> [shape, dtype name]; "a.b" is the nested key
    ("a", "b")) as a constructor spec."""
    if not isinstance(spec, dict) or not all(
            isinstance(k, str) and isinstance(e, list) and len(e) == 2 and isinstance(e[0], list)
            and isinstance(e[1], str) and all(isinstance(s, int) and not isinstance(s, bool) for s in e[0])
            for k, e in spec.items()):
        raise ValueError(f"the saved spec must map field -> [shape (list of ints), dtype name], got {spec!r}")
    return {_rows.key_of(k): (tuple(s), _dtype_from_name(d)) for k, (s, d) in spec.items()}


def _safetensors():
    """The safetensors package (buffer files are safetensors; it is not a core dependency)."""
    try:
        import safetensors
        import safetensors.torch  # noqa: F401
    except ImportError:
        raise ImportError("ReplayBuffer.save/load need the safetensors package: pip install safetensors") from None
    return safetensors


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
        spec: e.g. ``{"tokens": ((L,), torch.int32), "length": ((), torch.int32), "reward": ((), torch.float32)}``;
            nested keys are tuples (``("next", "obs")``). ``None``: the first ``add``/``extend``
            defines it (each field's row shape and dtype), as TorchRL's lazy storages do.

    Rows go in as dicts of tensors (nested dicts allowed) or, with the tensordict package, as
    TensorDicts; a buffer that was given TensorDicts returns TensorDicts (``sample().batch``,
    ``buffer[i]``, iteration). ``add`` takes one item or a batch, ``extend`` a batch (or a list
    of items); ``len``, ``buffer[i]``, ``buffer[index_tensor]``, ``buffer[a:b]`` and iteration
    read the stored items in slot order.
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
    # finite floats >= 0, checked on every assignment (``buffer.beta = ...`` anneals beta)
    alpha, beta, priority_eps, power_law_exponent = (CheckedFloat(lo=0.0) for _ in range(4))

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
        self.alpha, self.beta, self.priority_eps = alpha, beta, priority_eps  # checked: finite, >= 0
        self.power_law_exponent = power_law_exponent
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if not isinstance(task_field, str):
            raise TypeError(f"task_field must be a str, got {type(task_field).__name__}")
        if ragged is not None and not (isinstance(ragged, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in ragged.items())):
            raise TypeError(f"ragged must be a dict of field name -> length field name, got {ragged!r}")
        self.max_tasks = check_int("max_tasks", max_tasks, 1, 2**31 - 1)
        self.capacity = capacity
        self.device = torch.device(device)
        self.sampler, self.eviction = sampler, eviction
        self.seed, self.weight_norm, self.task_field = seed, weight_norm, task_field
        self.ragged = dict(ragged or {})
        self.spec, self.storage = None, None
        self.returns_tensordict = False  # set by the first TensorDict written
        if spec is not None:
            self._allocate(self._normalize_spec(spec))
        dev = self.device
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
    def _allocate(self, spec: dict) -> None:
        """Storage of a checked spec (field name -> (shape, dtype)); the options that name spec
        fields are checked against it first."""
        self._check_options(spec)
        self.spec = spec
        self.storage = {name: torch.zeros((self.capacity, *shape), dtype=dtype, device=self.device)
                        for name, (shape, dtype) in spec.items()}

    @staticmethod
    def _normalize_spec(spec) -> dict:
        """Field name (:func:`_rows.field_name` of each key) -> (shape tuple, dtype)."""
        if not isinstance(spec, dict) or not spec:
            raise TypeError("spec must be a non-empty dict: field name -> (shape, dtype)")
        out = {}
        for key, entry in spec.items():
            try:
                name = _rows.field_name(key)
            except ValueError:
                raise ValueError(f"spec field names must be non-empty strings without '.' (nested keys: tuples of "
                                 f"them), got {key!r}") from None
            if name in out:
                raise ValueError(f"spec names the field {key!r} twice")
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

    def _check_options(self, spec: dict) -> None:
        if self.sampler == "power_law":
            if self.task_field not in spec:
                raise ValueError(f"sampler 'power_law' needs the task field {self.task_field!r} in spec")
            shape, dtype = spec[self.task_field]
            if shape != () or dtype != torch.int64:
                raise ValueError(f"task field {self.task_field!r} must be spec'd as ((), torch.int64)")
        for field, length_field in self.ragged.items():
            if field not in spec or len(spec[field][0]) != 1:
                raise ValueError(f"ragged field {field!r} must be a spec field of shape (L,)")
            if spec.get(length_field) != ((), torch.int32):
                raise ValueError(f"length field {length_field!r} of {field!r} must be spec'd as ((), torch.int32)")
        if len(set(self.ragged.values())) > 1:
            raise ValueError("all ragged fields must share one length field")

    def __len__(self) -> int:
        return self.size

    def _rows_out(self, fields: dict, batch_shape):
        """Field name -> tensor as the user's rows: a TensorDict if TensorDicts were stored, else
        a dict keyed like the spec (nested keys as tuples)."""
        return _rows.build({_rows.key_of(k): v for k, v in fields.items()}, batch_shape, self.returns_tensordict,
                           self.device)

    def __getitem__(self, index):
        """Stored items by slot: ``buffer[i]`` one item (fields without a batch dimension),
        ``buffer[index_tensor]``, ``buffer[[i, j]]`` or ``buffer[a:b]`` a batch. Slots are in
        [0, len(buffer)); negative ints and indices count from the end, as for a sequence."""
        n = self.size
        if isinstance(index, slice):
            index = torch.arange(n, device=self.device)[index]
        elif isinstance(index, int) and not isinstance(index, bool):
            if not -n <= index < n:
                raise IndexError(f"index {index} is out of range for a replay buffer of {n} stored items")
            i = index % n
            return self._rows_out({f: st[i] for f, st in self.storage.items()}, ())
        elif isinstance(index, list):
            index = torch.tensor(index, dtype=torch.int64, device=self.device) if index else \
                torch.zeros(0, dtype=torch.int64, device=self.device)
        if not isinstance(index, torch.Tensor):
            raise TypeError(f"replay buffer indices must be ints, slices, lists or int tensors, got "
                            f"{type(index).__name__}")
        if index.dtype not in (torch.int64, torch.int32) or index.dim() > 1:
            raise TypeError(f"an index tensor must be a 0-d or 1-d int64/int32 tensor, got {index.dtype} of shape "
                            f"{tuple(index.shape)}")
        if index.numel() and bool(((index < -n) | (index >= n)).any()):
            raise IndexError(f"indices must be in [-{n}, {n}) for a replay buffer of {n} stored items")
        index = torch.where(index < 0, index + n, index).to(self.device, torch.int64)
        rows = {f: st[index] for f, st in self.storage.items()} if self.storage else {}
        return self._rows_out(rows, tuple(index.shape))

    def __iter__(self):
        """The stored items one by one, in slot order (sampling is :meth:`sample`)."""
        for i in range(self.size):
            yield self[i]

    def _spec_from_rows(self, data, leaves: dict, name: str, single: bool) -> dict:
        """The spec a spec-less buffer takes from its first rows (row shape and dtype per field)."""
        spec = {}
        for key, t in leaves.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{key!r}] must be a torch.Tensor, got {type(t).__name__}")
            if not single and t.dim() == 0:
                raise ValueError(f"{name}[{key!r}] has no batch dimension: a batch holds [n, ...] tensors")
            spec[key] = (tuple(t.shape[0 if single else 1:]), t.dtype)
        if not spec:
            raise ValueError(f"{name} has no fields")
        return self._normalize_spec(spec)

    def _check_batch(self, batch, name: str, *, item: bool | None = False) -> tuple[dict, int, bool, dict]:
        """(field name -> [n, ...] tensor, n, whether it was one item, spec) of ``batch`` (a dict,
        nested dicts or a TensorDict) checked against the spec (a spec-less buffer: the spec the
        rows define, allocated by the caller once everything else is checked). ``item=False``: a
        batch is required; ``None``: one item (no batch dimension) is also accepted."""
        leaves = _rows.leaves(batch, name)
        is_td = _rows.is_tensordict(batch)
        if is_td:
            if batch.batch_dims > 1:
                raise ValueError(f"{name} must be a TensorDict with at most one batch dimension, got batch size "
                                 f"{tuple(batch.batch_size)}")
            if item is False and batch.batch_dims == 0:
                raise ValueError(f"{name} is one item (a TensorDict with batch size []): {name} takes a batch")
            item = batch.batch_dims == 0
        if self.spec is None:
            if item is None:
                raise ValueError(f"{name}: the buffer has no spec yet and a dict does not say whether it is one item "
                                 "or a batch: use extend(batch), add a TensorDict, or pass spec= to the constructor")
            spec = self._spec_from_rows(batch, leaves, name, item)
            self._check_options(spec)
        else:
            spec = self.spec
        batch = {_rows.field_name(k): v for k, v in leaves.items()}
        missing = sorted(set(spec) - set(batch))
        extra = sorted(set(batch) - set(spec))
        if missing or extra:
            raise ValueError(f"{name} does not match the spec: missing fields {missing}, unknown fields {extra}")
        if item is None:  # a dict: one item when no field has a batch dimension
            item = all(isinstance(t, torch.Tensor) and t.dim() == len(spec[f][0]) for f, t in batch.items())
        if item:
            batch = {f: (t.unsqueeze(0) if isinstance(t, torch.Tensor) else t) for f, t in batch.items()}
        n = None
        for field, (shape, dtype) in spec.items():
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
        return batch, n, bool(item), spec

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
    def add(self, batch, priority=None, group=None) -> torch.Tensor:
        """Insert a batch (dict of [n, ...] tensors matching ``spec``, or a TensorDict of batch
        size [n]) or one item (no batch dimension; TensorDict batch size []); returns each item's
        slot (int64 [n], 0-d for one item; -1 if not stored: reservoir rejection, or overwritten
        within a too-large batch).

        ``priority``: number or [n] tensor (default: the largest priority seen, as in PER);
        ``group``: number or [n] int64 tensor of group ids for ``sample_groups``.
        """
        slots, one = self._insert(batch, "batch", None, priority, group)
        return slots[0] if one else slots

    def extend(self, batch, priority=None, group=None) -> torch.Tensor:
        """Insert a batch: a dict of [n, ...] tensors, a TensorDict of batch size [n], or a list
        of items (stacked); returns each item's slot (int64 [n], as :meth:`add`)."""
        if isinstance(batch, (list, tuple)):
            batch = _rows.stack_items(batch, "batch")
        return self._insert(batch, "batch", False, priority, group)[0]

    def _insert(self, data, name: str, item, priority, group) -> tuple[torch.Tensor, bool]:
        batch, n, one, spec = self._check_batch(data, name, item=item)
        if n == 0:
            raise ValueError("batch is empty: nothing to add")
        prio = None if priority is None else self._per_item(priority, n, torch.float32, "priority")
        grp = None if group is None else self._per_item(group, n, torch.int64, "group")
        if prio is not None:
            self._check_priorities(prio)
        if self.spec is None:
            self._allocate(spec)
        if self.sampler == "power_law":
            tasks = batch[self.task_field]
            if bool(((tasks < 0) | (tasks >= self.max_tasks)).any()):
                raise ValueError(f"task ids in {self.task_field!r} must be in [0, max_tasks={self.max_tasks})")
        for field, length_field in self.ragged.items():
            L, lengths = self.spec[field][0][0], batch[length_field]
            if bool(((lengths < 0) | (lengths > L)).any()):
                raise ValueError(f"lengths in {length_field!r} must be in [0, {L}] (the length of {field!r})")
        fields = [batch[f].contiguous() for f in self.spec]
        slots = rops.replay_insert(list(self.storage.values()), fields, self.generations, self.stamps, self.keys,
                                   eviction=self.eviction, size=self.size, cursor=self.cursor, step=self.step,
                                   seed=self.seed)
        if _rows.is_tensordict(data):
            self.returns_tensordict = True
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
        return slots, one

    def _check_priorities(self, p: torch.Tensor) -> None:
        """Finite, >= 0, and a finite stored weight max(p, eps)^alpha (float32: p = 1e30 with
        alpha = 2 would store an infinite weight and break sampling)."""
        if p.numel() == 0:
            return
        w = _priority_weight(p, self.alpha, self.priority_eps)
        if bool(((p >= 0) & (p < float("inf")) & (w < float("inf"))).all()):  # one host read when all is well
            return
        if bool(torch.isnan(p).any()):
            raise ValueError("priorities contain NaN")
        if bool((p < 0).any()):
            raise ValueError("priorities must be >= 0 (got a negative value)")
        if bool(torch.isinf(p).any()):
            raise ValueError("priorities must be finite (got Inf)")
        raise ValueError(f"priorities too large: max(p, priority_eps)^alpha (alpha={self.alpha}) overflows float32 "
                         f"for p = {float(p.max())}")

    def update_priority(self, index, priority, generation=None) -> torch.Tensor:
        """TorchRL's name for :meth:`update_priorities`; ``index`` may also be an int or a list."""
        if isinstance(index, (int, list)) and not isinstance(index, bool):
            index = torch.tensor(index, dtype=torch.int64, device=self.device).reshape(-1)
        return self.update_priorities(index, priority, generation)

    def update_priorities(self, indices: torch.Tensor, priorities, generation=None) -> torch.Tensor:
        """Set the priorities of sampled slots; returns which entries were applied (bool).

        Entries with index -1 (fresh rows), with a ``generation`` that no longer matches the slot
        (the slot was overwritten since sampling), naming a slot not stored yet (>= size) or
        superseded by a later entry for the same slot (duplicates: the last one wins) are ignored.
        Indices below -1 or >= capacity, NaN, infinite or negative priorities, and priorities or
        generations whose number differs from the indices' raise ValueError; nothing is written.
        """
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
        if indices.device != self.device:
            raise ValueError(f"indices is on {indices.device} but the buffer is on {self.device}")
        if indices.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"indices must be int64 or int32, got {indices.dtype}")
        n = indices.numel()
        prio = self._per_item(priorities, n, torch.float32, "priorities").detach()
        if generation is not None:
            generation = self._per_item(generation, n, torch.int64, "generation").contiguous()
        if n:  # one host read of each range for every check; the detailed checks only on failure
            (imin, imax), (pmin, pmax) = host_range(indices), host_range(prio)
            if imin < -1 or imax >= self.capacity:
                raise ValueError(f"indices must be -1 (fresh rows) or slots in [0, capacity={self.capacity})")
            if not self._weights_clearly_finite(pmin, pmax):
                self._check_priorities(prio)
        prio = prio.contiguous()
        applied = rops.launch_update_priorities(self.priorities, self.weights, self.block_stats, self._winner,
                                                self.generations, indices.reshape(-1).long().contiguous(), prio,
                                                generation, float(self.alpha), float(self.priority_eps), self.size)
        if n:
            self._raise_max_priority(prio, applied, pmax)
        return applied

    def _weights_clearly_finite(self, pmin: float, pmax: float) -> bool:
        """Whether priorities in [pmin, pmax] are valid with room to spare: finite, >= 0 and a
        stored weight max(p, eps)^alpha (monotone in p) far below float32's largest value, so that
        no rounding of the fp64 power decides it. Otherwise :meth:`_check_priorities` decides."""
        if not (pmin >= 0.0 and pmax < float("inf")):
            return False
        try:
            return max(pmax, self.priority_eps) ** self.alpha < 1e38
        except OverflowError:
            return False

    def _raise_max_priority(self, prio: torch.Tensor, applied: torch.Tensor, pmax: float) -> None:
        """max_priority = max(max_priority, the largest applied priority) (new tensor when it grows);
        ``pmax`` is the largest of all ``prio``."""
        if self.device.type == "cpu":  # NumPy views: a fraction of torch's per-op cost at small sizes
            mask = applied.numpy()
            top = pmax if mask.all() else (prio.numpy()[mask].max().item() if mask.any() else 0.0)
            if top > self.max_priority.numpy()[0]:
                self.max_priority = torch.tensor([top], dtype=torch.float32)
            return
        top = torch.where(applied, prio, torch.zeros_like(prio)).max().reshape(1)
        self.max_priority = torch.maximum(self.max_priority, top)

    # ------------------------------------------------------------------ sampling
    def _weight_mode_args(self) -> tuple:
        """(weight_mode, weights, block_stats, slot_key, table, now, beta, batch_max) of the sampler,
        as :func:`trainops.ops.replay.launch_sample` takes them: a sampler is a policy built on one
        of the op's weight modes (prioritized: the stored weights plus PER importance weights;
        power_law: a per-task table)."""
        if self.sampler == "uniform":
            return "uniform", None, None, None, None, 0, 0.0, False
        if self.sampler == "prioritized":
            batch_max = self.weight_norm == "batch"
            return "weights", self.weights, self.block_stats, None, None, 0, float(self.beta), batch_max
        if self.sampler == "recency":
            return "recency", None, None, self.stamps, None, max(self.step - 1, 0), 0.0, False
        return "table", None, None, self.storage[self.task_field], self.task_table(), 0, 0.0, False

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
            if self.spec is None:
                raise ValueError("the replay buffer is empty (and has no spec yet): add items before sampling")
            fresh, have, _, _ = self._check_batch(fresh, "fresh")
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
            batch = self._rows_out(dict(zip(names, out[:-1])), (rows,))
            return ReplayBatch(batch, torch.full((rows,), -1, dtype=torch.int64, device=self.device),
                               torch.ones(rows, device=self.device), torch.zeros(rows, dtype=torch.bool,
                                                                                  device=self.device),
                               out[-1].view(rows))
        # Every argument is the buffer's own state or checked above (the op checks sizes, indices
        # and devices again): the checking wrapper would only add Python time to small batches.
        weight_mode, weights, block_stats, slot_key, table, now, beta, batch_max = self._weight_mode_args()
        out, indices, isw, is_replay = rops.launch_sample(
            storage, n_replay, self.size, fresh_fields, lengths, ragged, weight_mode, weights, block_stats, slot_key,
            table, now, beta, batch_max, bool(replacement), self.seed, self._next_offset())
        batch = self._rows_out(dict(zip(names, out[:-1])), (batch_size,))
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
        return GroupBatch(self._rows_out(batch, (g_count, m)), idx, mask, gens)

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
        spec = None if self.spec is None else {
            k: [list(s), str(d).replace("torch.", "")] for k, (s, d) in self.spec.items()}
        return {"format": _FORMAT, "capacity": self.capacity, "sampler": self.sampler, "eviction": self.eviction,
                "alpha": self.alpha, "beta": self.beta, "seed": self.seed, "weight_norm": self.weight_norm,
                "priority_eps": self.priority_eps, "task_field": self.task_field,
                "power_law_exponent": self.power_law_exponent, "max_tasks": self.max_tasks, "ragged": self.ragged,
                "spec": spec, "returns_tensordict": self.returns_tensordict}

    def state_dict(self, *, stored_only: bool = False) -> dict:
        """Everything needed to resume: storage, priorities, weights, block sums, generations,
        stamps, reservoir keys, groups, task clocks, counters and RNG offset (tensors only,
        plus a ``config`` dict of plain values). ``stored_only``: the per-slot entries hold only
        the ``len(buffer)`` stored rows (views), not the whole capacity; ``load_state_dict``
        takes either form."""
        rows = slice(0, self.size if stored_only else self.capacity)
        state = {f"storage.{k}": v[rows] for k, v in (self.storage or {}).items()}
        state.update(generations=self.generations[rows], stamps=self.stamps[rows], keys=self.keys[rows],
                     priorities=self.priorities[rows], weights=self.weights[rows], block_stats=self.block_stats,
                     groups=self.groups[rows], max_priority=self.max_priority, task_last=self.task_last,
                     counters=torch.tensor([self.size, self.cursor, self.step, self.rng_offset], dtype=torch.int64))
        state["config"] = self.config()
        return state

    def _state_layout(self, spec: dict | None) -> dict:
        """state_dict entry -> (shape, dtype) of every tensor entry, for a buffer of ``spec``."""
        cap = self.capacity
        layout = {f"storage.{k}": ((cap, *shape), dtype) for k, (shape, dtype) in (spec or {}).items()}
        layout.update(generations=((cap,), torch.int64), stamps=((cap,), torch.int64), keys=((cap,), torch.float64),
                      priorities=((cap,), torch.float32), weights=((cap,), torch.float32),
                      block_stats=(tuple(self.block_stats.shape), torch.float64), groups=((cap,), torch.int64),
                      max_priority=((1,), torch.float32), task_last=((self.max_tasks,), torch.int64),
                      counters=((4,), torch.int64))
        return layout

    # per-slot entries (one row per slot; a stored-only state holds the first ``size``) and the
    # value of an empty slot
    _EMPTY_SLOT = {"generations": -1, "stamps": 0, "keys": 0, "priorities": 0, "weights": 0, "groups": -1}

    def _is_per_slot(self, name: str) -> bool:
        return name.startswith("storage.") or name in self._EMPTY_SLOT

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict`` (whole-capacity or stored-only); the config (capacity, spec,
        sampler, ...) must match (a buffer without a spec yet takes the state's).

        Everything is checked before anything is written (entries, shapes, dtypes, counters,
        slot contents; see :meth:`_check_state`): a load that fails leaves the buffer as it was."""
        tensors, counters, beta, spec = self._check_state(state)
        if self.spec is None and spec is not None:
            self._allocate(spec)
        for name, src in tensors.items():
            dst = self.storage[name[len("storage."):]] if name.startswith("storage.") else getattr(self, name)
            rows = src.shape[0]
            if self._is_per_slot(name) and rows < self.capacity:
                dst[:rows].copy_(src)
                dst[rows:].fill_(self._EMPTY_SLOT.get(name, 0))
            else:
                dst.copy_(src)
        self.size, self.cursor, self.step, self.rng_offset = counters
        self.beta = beta
        self.returns_tensordict = bool(state["config"].get("returns_tensordict", False))
        self._winner.fill_(-1)

    def _check_state(self, state) -> tuple[dict, tuple, float, dict | None]:
        """(tensor entries, counters, beta, spec) of ``state`` once every invariant of a buffer
        that ``add``/``update_priorities`` can produce holds; raises TypeError/ValueError otherwise."""
        if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
            raise TypeError("state must be a dict produced by ReplayBuffer.state_dict()")
        cfg, mine = state["config"], self.config()
        spec = self.spec
        if spec is None and cfg.get("spec") is not None:  # a spec-less buffer takes the state's spec
            spec = self._normalize_spec(_spec_from_config(cfg["spec"]))
            self._check_options(spec)
            mine["spec"] = cfg["spec"]
        adopted = ("beta", "returns_tensordict")
        diff = sorted(k for k in set(mine) | set(cfg) if k not in adopted and cfg.get(k) != mine.get(k))
        if diff:
            raise ValueError(f"state does not match this buffer's configuration in {diff}")
        beta = check_finite_float("beta (in the state's config)", cfg.get("beta", self.beta), lo=0.0)
        if not isinstance(cfg.get("returns_tensordict", False), bool):
            raise ValueError("returns_tensordict (in the state's config) must be a bool")
        layout = self._state_layout(spec)
        missing = sorted(set(layout) - set(state))
        unknown = sorted(set(state) - set(layout) - {"config"})
        if missing or unknown:
            raise ValueError(f"state is missing entries {missing} / has unknown entries {unknown}")
        counters = state["counters"]  # first: a stored-only state's per-slot entries have `size` rows
        size = int(counters[0]) if isinstance(counters, torch.Tensor) and counters.shape == (4,) \
            and counters.dtype == torch.int64 else -1
        rows_ok = {self.capacity} | ({size} if 0 <= size <= self.capacity else set())
        tensors = {}
        for name, (shape, dtype) in layout.items():
            t = state[name]
            ok = isinstance(t, torch.Tensor) and t.dtype == dtype and (tuple(t.shape) == shape or (
                self._is_per_slot(name) and t.dim() == len(shape) and t.shape[0] in rows_ok
                and tuple(t.shape[1:]) == shape[1:]))
            if not ok:
                got = (f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__)
                rows = f" (or {size} stored rows)" if self._is_per_slot(name) and size in rows_ok - {shape[0]} else ""
                raise ValueError(f"state entry {name!r} must be a {dtype} tensor of shape {shape}{rows}, got {got}")
            tensors[name] = t.detach()
        size, cursor, step, offset = (int(x) for x in tensors.pop("counters").tolist())
        cap = self.capacity

        def need(ok, what: str) -> None:
            if not bool(ok):
                raise ValueError(f"invalid replay buffer state: {what} "
                                 f"(size={size}, cursor={cursor}, step={step}, rng_offset={offset})")

        for name, v in (("size", size), ("cursor", cursor), ("step", step), ("rng_offset", offset)):
            need(0 <= v < 2**62, f"counter {name} must be in [0, 2^62)")
        need(size == min(cursor, cap), f"size must be min(cursor, capacity={cap})")
        need(step <= cursor and (step == 0) == (cursor == 0),
             "step (add calls) must be in [1, cursor] once items were added")
        t = {k: v.cpu() for k, v in tensors.items()}
        stored, empty = slice(0, size), slice(size, cap)
        gen = t["generations"][stored]
        need((t["generations"][empty] == -1).all(), "generations of empty slots must be -1")
        if self.eviction == "fifo":  # slot s holds the newest serial < cursor that is s mod capacity
            s = torch.arange(size, dtype=torch.int64)
            need(torch.equal(gen, s + cap * torch.div(cursor - 1 - s, cap, rounding_mode="floor")),
                 "FIFO generations must be the stream serials the ring holds")
        else:
            need(((gen >= 0) & (gen < cursor)).all() and gen.unique().numel() == size,
                 "generations of stored slots must be distinct serials in [0, cursor)")
        need(((t["stamps"][stored] >= 0) & (t["stamps"][stored] < step)).all() and (t["stamps"][empty] == 0).all(),
             "stamps (add call of each stored slot) must be in [0, step), 0 for empty slots")
        keys = t["keys"]
        need(((keys >= 0) & (keys <= 1)).all() and (keys[empty] == 0).all()
             and (self.eviction == "reservoir" or (keys == 0).all()),
             "reservoir keys must be in [0, 1] (0 for empty slots and FIFO buffers)")
        for name in ("priorities", "weights", "max_priority"):
            v = t[name]
            need(((v >= 0) & (v < float("inf"))).all(), f"{name} must be finite and >= 0")
            need(name == "max_priority" or (v[empty] == 0).all(), f"{name} of empty slots must be 0")
        sums, mins = _block_stats(t["weights"])  # blocks past a stored-only state's rows: no weight
        bs, nbw = t["block_stats"], sums.numel()
        need(torch.allclose(bs[0, :nbw], sums, rtol=1e-9, atol=0.0) and torch.equal(bs[1, :nbw], mins)
             and (bs[0, nbw:] == 0).all() and (bs[1, nbw:] == float("inf")).all(),
             "block_stats must be the block sums and minima of the weights")
        last = t["task_last"]
        need(((last == -1) | ((last >= 0) & (last < step))).all(), "task_last must be -1 or an add call in [0, step)")
        if self.sampler == "power_law":
            tasks = t[f"storage.{self.task_field}"][stored]
            need(((tasks >= 0) & (tasks < self.max_tasks)).all(),
                 f"task ids in {self.task_field!r} must be in [0, max_tasks={self.max_tasks})")
        for field, length_field in self.ragged.items():
            lengths = t[f"storage.{length_field}"][stored]
            L = spec[field][0][0]
            need(((lengths >= 0) & (lengths <= L)).all(), f"lengths in {length_field!r} must be in [0, {L}]")
        return tensors, (size, cursor, step, offset), beta, spec

    def save(self, path: str | os.PathLike) -> None:
        """Write the state to ``path``, a ``.safetensors`` file (tensors, and the config as JSON
        metadata; no pickle): the stored rows only, so the file grows with ``len(buffer)``, not
        with the capacity. Read it back with :meth:`load` (a buffer of the saved capacity)."""
        path = self._checked_path(path)
        save_file = _safetensors().torch.save_file
        state = self.state_dict(stored_only=True)
        cfg = state.pop("config")
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        save_file(tensors, path, metadata={"trainops.replay": json.dumps(cfg)})

    @staticmethod
    def _checked_path(path) -> str:
        path = os.fspath(path)
        if not isinstance(path, str) or not path.endswith(".safetensors"):
            raise ValueError(f"replay buffer files are safetensors: the path must end in .safetensors, got {path!r}")
        return path

    @classmethod
    def _read(cls, path) -> dict:
        """The state stored in ``path`` (safetensors: tensors plus JSON config metadata)."""
        path = cls._checked_path(path)
        st = _safetensors()
        try:
            with st.safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                cfg = json.loads(meta["trainops.replay"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (st.SafetensorError, KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a readable trainops replay buffer file: {e}") from None
        if not isinstance(cfg, dict) or cfg.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a trainops replay buffer file")
        return {**tensors, "config": cfg}

    @classmethod
    def _from_config(cls, cfg: dict, device) -> "ReplayBuffer":
        """A new, empty buffer with a saved ``config()`` (its values checked as the constructor's)."""
        names = ("capacity", "spec", "sampler", "eviction", "alpha", "beta", "seed", "weight_norm", "priority_eps",
                 "task_field", "power_law_exponent", "max_tasks", "ragged")
        missing = [k for k in names if k not in cfg]
        if missing:
            raise ValueError(f"the saved config is missing {missing}")
        kw = {k: cfg[k] for k in names}
        spec = kw["spec"]
        kw["spec"] = None if spec is None else _spec_from_config(spec)
        buf = cls(device=device, **kw)
        if not isinstance(cfg.get("returns_tensordict", False), bool):
            raise ValueError("returns_tensordict (in the saved config) must be a bool")
        buf.returns_tensordict = cfg.get("returns_tensordict", False)
        return buf

    @classmethod
    def _load_new(cls, path, device=None) -> "ReplayBuffer":
        state = cls._read(path)
        # Check the whole file against a storage-free buffer first: the file's config decides how
        # much memory the real buffer takes, and nothing is allocated for a file that fails.
        cls._from_config(state["config"], "meta")._check_state(state)
        buf = cls._from_config(state["config"], device or "cpu")
        buf.load_state_dict(state)
        return buf

    def _load_into(self, path) -> "ReplayBuffer":
        self.load_state_dict(self._read(path))
        return self
