"""Fused replay ops: ``trainops.ops.replay_sample``, ``replay_insert``, ``replay_update_priorities``.

Kernels: C++ on CPU (csrc/cpu/replay_sample.cpp, replay_update.cpp), CUDA C++ on GPU
(csrc/cuda/replay_*.cu via csrc/cuda/bindings/replay.cpp). Both follow the rules of
csrc/common/replay_common.h; :mod:`trainops.reference.replay` is the specification.
These are the low-level, tensor-list ops; :class:`trainops.replay.ReplayBuffer` is the
user-facing API.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from trainops import _extension
from trainops._validation import check_int, raise_for_invalid_priorities
from trainops._replay_spec import BLOCK, EVICTION_NUMBERS, EVICTIONS, WEIGHT_MODE_NUMBERS, WEIGHT_MODES

__all__ = ["replay_sample", "replay_insert", "replay_update_priorities", "num_blocks", "BLOCK", "WEIGHT_MODES",
           "EVICTIONS", "MODES"]

MODES = WEIGHT_MODE_NUMBERS  # the old public name of the weight modes' schema numbers


def _schema_number(argument: str, value: str, numbers: dict) -> int:
    """The number the op schema takes for the mode ``value`` of ``argument`` (weight_mode,
    eviction): above the raw ``torch.ops.trainops`` call every layer names modes by string."""
    try:
        return numbers[value]
    except (KeyError, TypeError):  # TypeError: an unhashable value
        raise ValueError(f"{argument} must be one of {tuple(numbers)}, got {value!r}") from None


def num_blocks(capacity: int) -> int:
    """Number of BLOCK-slot blocks of the maintained block sums of a buffer of ``capacity`` slots."""
    return (capacity + BLOCK - 1) // BLOCK


def _check_tensor(t, name: str, dtype=None, device=None, numel=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the storage is on {device}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name} must have {numel} elements, got {t.numel()}")
    return t


def _check_storage(storage: Sequence[torch.Tensor], name: str = "storage"):
    if not isinstance(storage, (list, tuple)) or len(storage) == 0:
        raise TypeError(f"{name} must be a non-empty list of tensors")
    cap = None
    for f, s in enumerate(storage):
        _check_tensor(s, f"{name}[{f}]")
        if s.dim() < 1 or not s.is_contiguous():
            raise ValueError(f"{name}[{f}] must be a contiguous tensor [capacity, ...]")
        if s.device != storage[0].device:
            raise ValueError(f"{name}[{f}] is on {s.device} but {name}[0] is on {storage[0].device}")
        if cap is not None and s.shape[0] != cap:
            raise ValueError(f"{name}[{f}] has {s.shape[0]} rows, {name}[0] has {cap}")
        cap = s.shape[0]
    return cap, storage[0].device


def _require(op: str, device: torch.device) -> None:
    """The replay kernels are C++: trainops._C on CPU, trainops._C_cuda on CUDA."""
    if device.type == "cuda":
        _extension.require_cuda(op)
    else:
        _extension.require(op)


def replay_sample(storage: Sequence[torch.Tensor], n_replay: int, *, size: int, fresh=None,
                  weight_mode: str = "uniform", weights=None, block_stats=None, slot_key=None, table=None,
                  lengths=None, ragged=None, now: int = 0, beta: float = 0.0, batch_max: bool = False,
                  replacement: bool = True, seed: int = 0, offset: int = 0, mode: str | None = None):
    """Sample ``n_replay`` stored rows and gather every field after the fresh rows, in one op.

    Sampling weight w_i of slot i < size by ``weight_mode`` (``mode`` is its old name, still
    accepted): ``uniform`` (1), ``weights`` (stored
    p_i^alpha with maintained ``block_stats`` [2, ceil(capacity/32)] = block sums and minima),
    ``recency`` (1 / (now - slot_key_i + 1)), ``table`` (table[slot_key_i]). With replacement:
    stratified inverse-CDF draws t_j = (j + u_j) / R * sum(w); without: Gumbel-top-k. PER
    importance weights (N P(j))^-beta / max w with P(j) = w_j / sum(w), max over the buffer or,
    with ``batch_max``, over the batch (without replacement the same single-draw P(j) is used).
    All weights zero: uniform over the stored items, weights 1. Random numbers:
    Philox4x32-10(key = seed; counter = j, offset, stream).

    Returns (out fields [F + R, ...], indices int64 [F + R] (-1 for fresh rows), importance
    weights fp32 [F + R] (1 for fresh rows), is_replay bool [F + R]).
    """
    cap, device = _check_storage(storage)
    check_int("n_replay", n_replay, 0)
    check_int("size", size)
    if size <= 0:
        raise ValueError("size is 0: the buffer is empty, nothing to sample")
    if size > cap:
        raise ValueError(f"size ({size}) exceeds the capacity ({cap})")
    if mode is not None:
        if weight_mode != "uniform":
            raise TypeError("pass weight_mode= only (mode= is its old name)")
        weight_mode = mode
    _schema_number("weight_mode", weight_mode, WEIGHT_MODE_NUMBERS)
    if not replacement and n_replay > size:
        raise ValueError(f"n_replay ({n_replay}) is larger than the {size} stored items; sampling without "
                         "replacement cannot draw that many (pass replacement=True or a smaller batch)")
    beta = float(beta)
    if not beta >= 0.0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    n_fresh = 0
    if fresh is not None:
        if not isinstance(fresh, (list, tuple)) or len(fresh) != len(storage):
            raise TypeError("fresh must be a list with one tensor per storage field")
        n_fresh = fresh[0].shape[0]
        for f, (fr, st) in enumerate(zip(fresh, storage)):
            _check_tensor(fr, f"fresh[{f}]", dtype=st.dtype, device=device)
            if tuple(fr.shape) != (n_fresh, *st.shape[1:]):
                raise ValueError(f"fresh[{f}] must have shape {(n_fresh, *st.shape[1:])}, got {tuple(fr.shape)}")
    ragged = [False] * len(storage) if ragged is None else [bool(r) for r in ragged]
    if len(ragged) != len(storage):
        raise ValueError("ragged must have one flag per storage field")
    if any(ragged):
        _check_tensor(lengths, "lengths", torch.int32, device, cap)
        for f, r in enumerate(ragged):
            if r and storage[f].dim() != 2:
                raise ValueError(f"ragged field storage[{f}] must be [capacity, L]")
    if weight_mode == "weights":
        _check_tensor(weights, "weights", torch.float32, device, cap)
        _check_tensor(block_stats, "block_stats", torch.float64, device, 2 * num_blocks(cap))
    if weight_mode in ("recency", "table"):
        _check_tensor(slot_key, "slot_key", torch.int64, device, cap)
    if weight_mode == "table":
        _check_tensor(table, "table", torch.float64, device)
    return launch_sample(list(storage), n_replay, size, fresh, lengths, ragged, weight_mode, weights, block_stats,
                         slot_key, table, int(now), beta, bool(batch_max), bool(replacement), int(seed), int(offset))


def launch_sample(storage: list, n_replay: int, size: int, fresh, lengths, ragged: list, weight_mode: str, weights,
                  block_stats, slot_key, table, now: int, beta: float, batch_max: bool, replacement: bool, seed: int,
                  offset: int):
    """:func:`replay_sample` without its Python checks, for callers whose arguments hold them by
    construction (:class:`trainops.replay.ReplayBuffer`, the TorchRL sampler); ``weight_mode`` is
    one of :data:`WEIGHT_MODES`. The op still checks every size, index and device itself."""
    mode_number = _schema_number("weight_mode", weight_mode, WEIGHT_MODE_NUMBERS)
    device = storage[0].device
    _require("replay_sample", device)
    n_fresh = 0 if fresh is None else fresh[0].shape[0]
    rows = n_fresh + n_replay
    out = [torch.empty((rows, *st.shape[1:]), dtype=st.dtype, device=device) for st in storage]
    if n_fresh:
        for o, fr in zip(out, fresh):
            o[:n_fresh].copy_(fr)
    indices, isw, is_replay = torch.ops.trainops.replay_sample(
        storage, out, lengths, ragged, weights, block_stats, slot_key, table, mode_number, size, n_fresh, n_replay,
        now, beta, batch_max, replacement, seed, offset)
    return out, indices, isw, is_replay


def replay_insert(storage: Sequence[torch.Tensor], batch: Sequence[torch.Tensor], generations: torch.Tensor,
                  stamps: torch.Tensor, keys: torch.Tensor, *, eviction: str = "fifo", size: int, cursor: int,
                  step: int = 0, seed: int = 0) -> torch.Tensor:
    """Write a batch into the buffer in place; returns each item's slot (int64, -1: not stored).

    ``eviction="fifo"``: ring order, item i to slot (cursor + i) mod capacity (a batch larger
    than the buffer keeps its last ``capacity`` items). ``"reservoir"``: every stream item gets
    a Philox uniform key; the buffer keeps the ``capacity`` largest keys (a uniform sample of the
    stream, Vitter 1985). Written slots get generation = stream serial, stamp = ``step``.
    """
    cap, device = _check_storage(storage)
    if not isinstance(batch, (list, tuple)) or len(batch) != len(storage):
        raise TypeError("batch must be a list with one tensor per storage field")
    n = batch[0].shape[0] if isinstance(batch[0], torch.Tensor) else 0
    if n == 0:
        raise ValueError("batch is empty: nothing to insert")
    for f, (b, st) in enumerate(zip(batch, storage)):
        _check_tensor(b, f"batch[{f}]", dtype=st.dtype, device=device)
        if tuple(b.shape) != (n, *st.shape[1:]):
            raise ValueError(f"batch[{f}] must have shape {(n, *st.shape[1:])}, got {tuple(b.shape)}")
    eviction_number = _schema_number("eviction", eviction, EVICTION_NUMBERS)
    _check_tensor(generations, "generations", torch.int64, device, cap)
    _check_tensor(stamps, "stamps", torch.int64, device, cap)
    _check_tensor(keys, "keys", torch.float64, device, cap)
    check_int("size", size, 0, cap)
    check_int("cursor", cursor, size)
    _require("replay_insert", device)
    return torch.ops.trainops.replay_insert(list(storage), [b.contiguous() for b in batch], generations, stamps,
                                            keys, eviction_number, size, cursor, int(step), int(seed))


def replay_update_priorities(priorities: torch.Tensor, weights: torch.Tensor, block_stats: torch.Tensor,
                             winner: torch.Tensor, generations: torch.Tensor, indices: torch.Tensor,
                             values: torch.Tensor, expected_generations=None, *, alpha: float, eps: float = 1e-6,
                             size: int, validate: bool = True) -> torch.Tensor:
    """Scatter priorities in place; returns which entries were applied (bool).

    Entry j applies when 0 <= indices[j] < size, the slot's generation still equals
    ``expected_generations[j]`` (stale updates for overwritten slots are ignored) and no later
    valid entry names the same slot (duplicates: the last one wins). Applied slots get weight
    max(p, eps)^alpha; the sums and minima of the touched blocks are recomputed exactly.
    ``winner`` is an int32 [capacity] scratch filled with -1 (left so). ``validate`` checks the
    values are finite and >= 0 (on CUDA it reads them on the host; the CPU kernel always checks).
    """
    cap = _check_tensor(priorities, "priorities", torch.float32).numel()
    device = priorities.device
    _check_tensor(weights, "weights", torch.float32, device, cap)
    _check_tensor(block_stats, "block_stats", torch.float64, device, 2 * num_blocks(cap))
    _check_tensor(winner, "winner", torch.int32, device, cap)
    _check_tensor(generations, "generations", torch.int64, device, cap)
    _check_tensor(indices, "indices", None, device)
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"indices must be int64 or int32, got {indices.dtype}")
    _check_tensor(values, "priorities", None, device)
    if not values.is_floating_point():
        raise TypeError(f"priorities must be a floating-point tensor, got {values.dtype}")
    indices = indices.reshape(-1).long().contiguous()
    values = values.reshape(-1).float().contiguous()
    if values.numel() != indices.numel():
        raise ValueError(f"priorities has {values.numel()} values for {indices.numel()} indices")
    if expected_generations is not None:
        _check_tensor(expected_generations, "expected_generations", torch.int64, device, indices.numel())
        expected_generations = expected_generations.reshape(-1).contiguous()
    # Slots >= size are empty and slots >= capacity do not exist: size <= capacity bounds every
    # write (indices outside [0, size) are ignored, reported as not applied).
    check_int("size", size, 0, cap)
    alpha, eps = float(alpha), float(eps)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    if not (math.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    # The CPU kernel checks values and indices itself before writing; on CUDA that would need a
    # host sync inside the op, so the check (one host read) happens here.
    if validate and device.type != "cpu" and values.numel() and not bool(((values >= 0) & (values < float("inf"))).all()):
        raise_for_invalid_priorities(values)
    return launch_update_priorities(priorities, weights, block_stats, winner, generations, indices, values,
                                    expected_generations, alpha, eps, int(size))


def launch_update_priorities(priorities, weights, block_stats, winner, generations, indices, values,
                             expected_generations, alpha: float, eps: float, size: int) -> torch.Tensor:
    """:func:`replay_update_priorities` without its Python checks (and without the value check on
    CUDA), for callers whose arguments hold them by construction: ``indices`` int64, ``values``
    float32 and ``expected_generations`` int64, each contiguous and 1-d. The op still checks every
    size, index and device itself."""
    _require("replay_update_priorities", priorities.device)
    return torch.ops.trainops.replay_update_priorities(priorities, weights, block_stats, winner, generations, indices,
                                                       values, expected_generations, alpha, eps, size)


# --- registration (schemas: ops/_schemas.py; kernels: csrc/cpu/replay_*.cpp, csrc/cuda) -----------
# The fakes check the scalar arguments as the kernels do (csrc/common/op_checks.h), so a
# traced or meta call fails like an eager one.

@torch.library.register_fake("trainops::replay_sample")
def _(storage, out, lengths, ragged, weights, block_stats, slot_key, table, weight_mode, size, n_fresh, n_replay,
      now, beta, batch_max, replacement, seed, offset):
    cap, _ = _check_storage(storage)
    check_int("size", size, 1, cap)
    check_int("n_fresh", n_fresh, 0)
    check_int("n_replay", n_replay, 0, None if replacement else size)
    check_int("weight_mode", weight_mode, 0, len(WEIGHT_MODES) - 1)
    if not (math.isfinite(beta) and beta >= 0.0):
        raise ValueError(f"beta must be finite and >= 0, got {beta}")
    rows = n_fresh + n_replay
    s = storage[0]
    return (s.new_empty(rows, dtype=torch.int64), s.new_empty(rows, dtype=torch.float32),
            s.new_empty(rows, dtype=torch.bool))


@torch.library.register_fake("trainops::replay_insert")
def _(storage, batch, generations, stamps, keys, eviction, size, cursor, step, seed):
    cap, _ = _check_storage(storage)
    check_int("eviction", eviction, 0, len(EVICTIONS) - 1)
    check_int("size", size, 0, cap)
    check_int("cursor", cursor, size)
    return generations.new_empty(batch[0].shape[0])


@torch.library.register_fake("trainops::replay_update_priorities")
def _(priorities, weights, block_stats, winner, generations, indices, values, expected, alpha, eps, size):
    check_int("size", size, 0, priorities.numel())
    return indices.new_empty(indices.shape[0], dtype=torch.bool)

