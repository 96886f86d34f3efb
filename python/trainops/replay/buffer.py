"""Device-resident replay buffer with fused sampling (``trainops.replay.ReplayBuffer``).

Storage is one [capacity, ...] tensor per field of ``spec`` on ``device``; sampling, insertion
and priority updates are single trainops ops (:mod:`trainops.ops.replay`) with host-side
counters only, so sampling needs no host synchronization on CUDA. Off the CPU a FIFO buffer
inserts with fixed-size torch index ops instead and keeps its counters on the device
(:mod:`trainops.replay._device_insert`), so ``extend`` (also of the rows a ``mask`` keeps) and
``sample_groups`` need none either; the host reads the counters when it needs them.

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

from typing import NamedTuple

import torch

from trainops._validation import CheckedFloat, check_int
from trainops.ops import replay as rops
from trainops.replay import _checks, _device_insert, _groups, _persist, _rows, _state
from trainops.replay._checks import EVICTIONS, SAMPLERS
from trainops.replay._groups import GroupBatch
from trainops.replay._host import host_range

__all__ = ["ReplayBuffer", "ReplayBatch", "GroupBatch", "SAMPLERS", "EVICTIONS"]


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


class _SettledCounter:
    """A host-side counter of the buffer, brought up to date with the device (``_settle``)
    before it is read or set; setting it marks the device copy as behind."""

    def __init__(self, doc: str):
        self.__doc__ = doc

    def __set_name__(self, owner, name: str) -> None:
        self.attr = "_" + name

    def __get__(self, buf, owner=None):
        if buf is None:
            return self
        buf._settle()
        return getattr(buf, self.attr)

    def __set__(self, buf, value: int) -> None:
        buf._settle()
        setattr(buf, self.attr, value)
        buf._device_behind = True


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
    read the stored items in slot order. ``state_dict``/``load_state_dict`` checkpoint it in
    memory; ``save(path)`` writes a safetensors file that ``ReplayBuffer.from_file(path)`` reads
    into a new buffer and ``buffer.load_state_file(path)`` into an existing one (``load`` means
    either, by whether it is called on the class or on a buffer).
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

    # ``load`` keeps its two meanings for compatibility (the class: ``from_file``; a buffer:
    # ``load_state_file``); new code says which it means.
    load = _persist.LoadEitherWay()
    # finite floats >= 0, checked on every assignment (``buffer.beta = ...`` anneals beta)
    alpha, beta, priority_eps, power_law_exponent = (CheckedFloat(lo=0.0) for _ in range(4))

    def __init__(self, capacity: int, spec: dict, device="cpu", sampler: str = "uniform", eviction: str = "fifo",
                 alpha: float = 0.6, beta: float = 0.4, seed: int = 0, *, weight_norm: str = "buffer",
                 priority_eps: float = 1e-6, task_field: str = "task", power_law_exponent: float = 1.0,
                 max_tasks: int = 1024, ragged: dict | None = None):
        _checks.check_choices(capacity, sampler, eviction, weight_norm)
        self.alpha, self.beta, self.priority_eps = alpha, beta, priority_eps  # checked: finite, >= 0
        self.power_law_exponent = power_law_exponent
        _checks.check_names(seed, task_field, ragged)
        self.max_tasks = check_int("max_tasks", max_tasks, 1, 2**31 - 1)
        self.capacity = capacity
        self.device = torch.device(device)
        self.sampler, self.eviction = sampler, eviction
        self.seed, self.weight_norm, self.task_field = seed, weight_norm, task_field
        self.ragged = dict(ragged or {})
        self.spec, self.storage = None, None
        self.returns_tensordict = False  # set by the first TensorDict written
        if spec is not None:
            self._allocate(_checks.normalize_spec(spec))
        dev = self.device
        # Per-slot tensors written by inserts have one extra, never-read row that takes the
        # writes of rows not stored (slot -1), so inserts scatter without a host sync.
        self._generations_ext = torch.full((capacity + 1,), -1, dtype=torch.int64, device=dev)
        self._stamps_ext = torch.zeros(capacity + 1, dtype=torch.int64, device=dev)
        self.generations, self.stamps = self._generations_ext[:capacity], self._stamps_ext[:capacity]
        self.keys = torch.zeros(capacity, dtype=torch.float64, device=dev)
        self.priorities = torch.zeros(capacity, dtype=torch.float32, device=dev)
        self.weights = torch.zeros(capacity, dtype=torch.float32, device=dev)
        self.block_stats = torch.zeros(2, rops.num_blocks(capacity), dtype=torch.float64, device=dev)
        self.block_stats[1].fill_(float("inf"))
        self._groups_ext = torch.full((capacity + 1,), -1, dtype=torch.int64, device=dev)
        self.groups = self._groups_ext[:capacity]
        self.max_priority = torch.ones(1, dtype=torch.float32, device=dev)
        self.task_last = torch.full((self.max_tasks,), -1, dtype=torch.int64, device=dev)
        self._winner = torch.full((capacity,), -1, dtype=torch.int32, device=dev)
        # Counters (properties size, cursor, step): host ints, and a device copy [cursor, step]
        # that inserts on the device advance; the host reads it only when it needs them.
        self._size = self._cursor = self._step = 0
        self._counts = torch.zeros(2, dtype=torch.int64, device=dev)
        self._host_behind = False    # the device counters are newer than the host ints
        self._device_behind = False  # the host ints are newer than the device counters
        # Whether reading device data on the host costs a synchronization (every device but the
        # CPU; tests set it to run that path on the CPU): then inserts and sample_groups of a
        # buffer that can (lazy_counters) read nothing on the host.
        self._lazy = self.device.type != "cpu"
        self.rng_offset = 0  # random draws made so far (Philox counter)

    # ------------------------------------------------------------------ storage and reading
    def _allocate(self, spec: dict) -> None:
        """Storage of a checked spec (field name -> (shape, dtype)); the options that name spec
        fields are checked against it first."""
        _checks.check_options(self, spec)
        self.spec = spec
        self._storage_ext = {name: torch.zeros((self.capacity + 1, *shape), dtype=dtype, device=self.device)
                             for name, (shape, dtype) in spec.items()}  # + the spare row of inserts
        self.storage = {name: st[: self.capacity] for name, st in self._storage_ext.items()}

    # ------------------------------------------------------------------ counters
    size = _SettledCounter("stored items")
    cursor = _SettledCounter("items ever offered (stream serial of the next item)")
    step = _SettledCounter("insert calls that stored something (the clock of recency and power_law)")

    def _settle(self) -> None:
        """Bring the host counters up to date after inserts on the device (one host read)."""
        if self._host_behind:
            cursor, step = self._counts.tolist()
            self._cursor, self._step, self._size = cursor, step, min(self.capacity, cursor)
            self._host_behind = False

    def _device_counts(self) -> torch.Tensor:
        """The device counters [cursor, step], brought up to date from the host if it moved them
        (fills, no copy from the host)."""
        if self._device_behind:
            self._counts[0].fill_(self._cursor)
            self._counts[1].fill_(self._step)
            self._device_behind = False
        return self._counts

    def _counts_moved_on_device(self) -> None:
        self._host_behind = True

    @property
    def lazy_counters(self) -> bool:
        """Whether inserts and ``sample_groups`` keep off the host (the counters live on the
        device and the host reads them only when it needs them): a FIFO buffer without
        power-law clocks or ragged fields, on every device but the CPU."""
        return self._lazy and _device_insert.supported(self)

    def stored_count(self) -> torch.Tensor:
        """``len(buffer)`` as a 0-d int64 tensor on the buffer's device, without a host read
        (read it with the step's other numbers)."""
        if self.lazy_counters or self._host_behind:
            return self._device_counts()[0].clamp_max(self.capacity)
        return torch.full((), self._size, dtype=torch.int64, device=self.device)

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

    def extend(self, batch, priority=None, group=None, *, mask=None) -> torch.Tensor:
        """Insert a batch: a dict of [n, ...] tensors, a TensorDict of batch size [n], or a list
        of items (stacked); returns each item's slot (int64 [n], as :meth:`add`).

        ``mask`` (bool [n]): store only the rows where it is True, in order. The buffer ends in
        the state ``extend`` of those rows alone leaves (storage, generations, groups,
        priorities, counters; nothing at all when no row is kept); the slot of a row left out
        is -1. On a device other than the CPU (where reading device data costs a host
        synchronization) a FIFO buffer inserts with fixed-size index ops and keeps its counters
        on the device: no host read, with or without ``mask``; ``len``, ``sample``, ``state_dict``
        and the other host-side readers catch up the counters when called (one host read). There
        ``mask`` needs eviction ``fifo``, a ``uniform``, ``prioritized`` or ``recency`` sampler
        and no ragged fields (ValueError otherwise); an explicit ``priority`` is still checked on
        the host."""
        if isinstance(batch, (list, tuple)):
            batch = _rows.stack_items(batch, "batch")
        return self._insert(batch, "batch", False, priority, group, mask)[0]

    def _insert(self, data, name: str, item, priority, group, mask=None) -> tuple[torch.Tensor, bool]:
        batch, n, one, spec = _checks.check_batch(self, data, name, item=item)
        if n == 0:
            raise ValueError("batch is empty: nothing to add")
        prio = None if priority is None else _checks.per_item(priority, n, torch.float32, "priority", self.device)
        grp = None if group is None else _checks.per_item(group, n, torch.int64, "group", self.device)
        if mask is not None:
            mask = _device_insert.check_mask(mask, n, self.device)
        on_device = self.lazy_counters
        if mask is not None and not on_device:
            if self._lazy:
                raise ValueError(_device_insert.unsupported_message(self))
            # The host reads device data for free here (the CPU): insert the kept rows themselves.
            slots = torch.full((n,), -1, dtype=torch.int64, device=self.device)
            if bool(mask.any()):
                kept = {_rows.key_of(f): t[mask] for f, t in batch.items()}
                slots[mask] = self._insert(kept, name, False, None if prio is None else prio[mask],
                                           None if grp is None else grp[mask])[0]
                self.returns_tensordict |= _rows.is_tensordict(data)
            return slots, False
        if self.spec is None:
            self._allocate(spec)
        if on_device:
            if _rows.is_tensordict(data):
                self.returns_tensordict = True
            fields = [batch[f].contiguous() for f in self.spec]
            return _device_insert.insert(self, fields, n, prio, grp, mask), one
        if prio is not None:
            _checks.check_priorities(prio, self.alpha, self.priority_eps)
        if self.sampler == "power_law":
            tasks = batch[self.task_field]
            if bool(((tasks < 0) | (tasks >= self.max_tasks)).any()):
                raise ValueError(f"task ids in {self.task_field!r} must be in [0, max_tasks={self.max_tasks})")
        for field, length_field in self.ragged.items():
            L, lengths = self.spec[field][0][0], batch[length_field]
            if bool(((lengths < 0) | (lengths > L)).any()):
                raise ValueError(f"lengths in {length_field!r} must be in [0, {L}] (the length of {field!r})")
        fields = [batch[f].contiguous() for f in self.spec]
        self._settle()
        size, cursor, step = self._size, self._cursor, self._step
        slots = rops.replay_insert(list(self.storage.values()), fields, self.generations, self.stamps, self.keys,
                                   eviction=self.eviction, size=size, cursor=cursor, step=step, seed=self.seed)
        if _rows.is_tensordict(data):
            self.returns_tensordict = True
        self._cursor, self._size = cursor + n, min(self.capacity, size + n)
        self._step, self._device_behind = step + 1, True
        if prio is None:
            prio = self.max_priority.expand(n)
        else:
            self.max_priority = torch.maximum(self.max_priority, prio.max().reshape(1))
        rops.replay_update_priorities(self.priorities, self.weights, self.block_stats, self._winner, self.generations,
                                      slots, prio, None, alpha=self.alpha, eps=self.priority_eps, size=self._size,
                                      validate=False)
        if grp is not None:
            self._groups_ext.index_put_((torch.where(slots >= 0, slots, self.capacity),), grp)
        if self.sampler == "power_law":
            self.task_last.index_fill_(0, batch[self.task_field].reshape(-1), step)
        return slots, one

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
        prio = _checks.per_item(priorities, n, torch.float32, "priorities", self.device).detach()
        if generation is not None:
            generation = _checks.per_item(generation, n, torch.int64, "generation", self.device).contiguous()
        if n:  # one host read of each range for every check; the detailed checks only on failure
            (imin, imax), (pmin, pmax) = host_range(indices), host_range(prio)
            if imin < -1 or imax >= self.capacity:
                raise ValueError(f"indices must be -1 (fresh rows) or slots in [0, capacity={self.capacity})")
            if not _checks.weights_clearly_finite(pmin, pmax, self.alpha, self.priority_eps):
                _checks.check_priorities(prio, self.alpha, self.priority_eps)
        prio = prio.contiguous()
        applied = rops.launch_update_priorities(self.priorities, self.weights, self.block_stats, self._winner,
                                                self.generations, indices.reshape(-1).long().contiguous(), prio,
                                                generation, float(self.alpha), float(self.priority_eps), self.size)
        if n:
            self._raise_max_priority(prio, applied, pmax)
        return applied

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
        n_fresh, fresh_fields = _checks.fresh_rows(self, batch_size, fresh, replay_ratio, replacement)
        n_replay = batch_size - n_fresh
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
        return _groups.sample_groups(self, group_ids, per_group)

    # ------------------------------------------------------------------ checkpoints and files
    def config(self) -> dict:
        """The constructor arguments (spec as field -> [shape, dtype name]) and format, as plain values."""
        return _state.config(self)

    def state_dict(self, *, stored_only: bool = False) -> dict:
        """Everything needed to resume: storage, priorities, weights, block sums, generations,
        stamps, reservoir keys, groups, task clocks, counters and RNG offset (tensors only,
        plus a ``config`` dict of plain values). ``stored_only``: the per-slot entries hold only
        the ``len(buffer)`` stored rows (views), not the whole capacity; ``load_state_dict``
        takes either form."""
        return _state.state_dict(self, stored_only)

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict`` (whole-capacity or stored-only); the config (capacity, spec,
        sampler, ...) must match (a buffer without a spec yet takes the state's).

        Everything is checked before anything is written (entries, shapes, dtypes, counters,
        slot contents; see :func:`trainops.replay._state.check_state`): a load that fails leaves
        the buffer as it was."""
        _state.load_state_dict(self, state)

    def save(self, path) -> None:
        """Write the state to ``path``, a ``.safetensors`` file (tensors, and the config as JSON
        metadata; no pickle): the stored rows only, so the file grows with ``len(buffer)``, not
        with the capacity. Read it back with :meth:`from_file` (a new buffer of the saved
        configuration) or :meth:`load_state_file` (into a buffer of the same configuration)."""
        _persist.save(self, path)

    @classmethod
    def from_file(cls, path, device=None) -> "ReplayBuffer":
        """A new buffer (on ``device``, default the CPU) with the configuration and state saved in
        ``path`` by :meth:`save`. The file is read with safetensors and JSON only and checked
        whole before the buffer is allocated. ``ReplayBuffer.load(path)`` is the same call."""
        return _persist.from_file(cls, path, device)

    def load_state_file(self, path) -> "ReplayBuffer":
        """Restore the state saved in ``path`` by :meth:`save` into this buffer, whose
        configuration must match (as :meth:`load_state_dict`); returns the buffer. Nothing is
        written if the file fails a check. ``buffer.load(path)`` is the same call."""
        return _persist.load_state_file(self, path)
