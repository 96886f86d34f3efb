"""Argument checks of :class:`~trainops.replay.ReplayBuffer`: constructor options, specs, rows,
per-item values, priorities and the rows a ``sample`` call asks for. Every check raises
TypeError / ValueError naming the argument before the buffer changes."""
from __future__ import annotations

import math

import torch

from trainops._replay_spec import EVICTIONS
from trainops._replay_spec import priority_weight as _priority_weight
from trainops._validation import raise_for_invalid_priorities
from trainops.replay import _rows

__all__ = ["SAMPLERS", "EVICTIONS", "check_choices", "check_names", "normalize_spec", "check_options",
           "check_batch", "per_item", "check_priorities", "weights_clearly_finite", "fresh_rows"]

SAMPLERS = ("uniform", "prioritized", "recency", "power_law")
WEIGHT_NORMS = ("buffer", "batch")


def check_choices(capacity, sampler, eviction, weight_norm) -> None:
    """The constructor's capacity and its options chosen by name."""
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise TypeError(f"capacity must be an int, got {type(capacity).__name__}")
    if capacity <= 0 or capacity >= 2**31:
        raise ValueError(f"capacity must be in [1, 2^31), got {capacity}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if eviction not in EVICTIONS:
        raise ValueError(f"eviction must be one of {EVICTIONS}, got {eviction!r}")
    if weight_norm not in WEIGHT_NORMS:
        raise ValueError(f"weight_norm must be 'buffer' or 'batch', got {weight_norm!r}")


def check_names(seed, task_field, ragged) -> None:
    """The constructor's seed and the options that name spec fields (checked against the spec
    by :func:`check_options` once there is one)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not isinstance(task_field, str):
        raise TypeError(f"task_field must be a str, got {type(task_field).__name__}")
    if ragged is not None and not (isinstance(ragged, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in ragged.items())):
        raise TypeError(f"ragged must be a dict of field name -> length field name, got {ragged!r}")


def normalize_spec(spec) -> dict:
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


def check_options(buf, spec: dict) -> None:
    """The buffer's options that name spec fields (power_law's task field, ragged fields and
    their length field) against a normalized ``spec``."""
    if buf.sampler == "power_law":
        if buf.task_field not in spec:
            raise ValueError(f"sampler 'power_law' needs the task field {buf.task_field!r} in spec")
        shape, dtype = spec[buf.task_field]
        if shape != () or dtype != torch.int64:
            raise ValueError(f"task field {buf.task_field!r} must be spec'd as ((), torch.int64)")
    for field, length_field in buf.ragged.items():
        if field not in spec or len(spec[field][0]) != 1:
            raise ValueError(f"ragged field {field!r} must be a spec field of shape (L,)")
        if spec.get(length_field) != ((), torch.int32):
            raise ValueError(f"length field {length_field!r} of {field!r} must be spec'd as ((), torch.int32)")
    if len(set(buf.ragged.values())) > 1:
        raise ValueError("all ragged fields must share one length field")


def _spec_from_rows(leaves: dict, name: str, single: bool) -> dict:
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
    return normalize_spec(spec)


def check_batch(buf, batch, name: str, *, item: bool | None = False) -> tuple[dict, int, bool, dict]:
    """(field name -> [n, ...] tensor, n, whether it was one item, spec) of ``batch`` (a dict,
    nested dicts or a TensorDict) checked against the buffer's spec (a spec-less buffer: the spec
    the rows define, allocated by the caller once everything else is checked). ``item=False``: a
    batch is required; ``None``: one item (no batch dimension) is also accepted."""
    leaves = _rows.leaves(batch, name)
    if _rows.is_tensordict(batch):
        if batch.batch_dims > 1:
            raise ValueError(f"{name} must be a TensorDict with at most one batch dimension, got batch size "
                             f"{tuple(batch.batch_size)}")
        if item is False and batch.batch_dims == 0:
            raise ValueError(f"{name} is one item (a TensorDict with batch size []): {name} takes a batch")
        item = batch.batch_dims == 0
    if buf.spec is None:
        if item is None:
            raise ValueError(f"{name}: the buffer has no spec yet and a dict does not say whether it is one item "
                             "or a batch: use extend(batch), add a TensorDict, or pass spec= to the constructor")
        spec = _spec_from_rows(leaves, name, item)
        check_options(buf, spec)
    else:
        spec = buf.spec
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
        if t.device != buf.device:
            raise ValueError(f"{name}[{field!r}] is on {t.device} but the buffer is on {buf.device}")
        if t.dim() != len(shape) + 1 or tuple(t.shape[1:]) != shape:
            raise ValueError(f"{name}[{field!r}] must have shape (n, *{shape}), got {tuple(t.shape)}")
        if n is None:
            n = t.shape[0]
        elif t.shape[0] != n:
            raise ValueError(f"{name}[{field!r}] has {t.shape[0]} rows but other fields have {n}")
    return batch, n, bool(item), spec


def per_item(value, n: int, dtype, name: str, device) -> torch.Tensor:
    """A number, or a tensor of ``n`` values on ``device``, as an [n] tensor of ``dtype``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.full((n,), value, dtype=dtype, device=device)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but the buffer is on {device}")
    if value.numel() != n:
        raise ValueError(f"{name} must have one value per item ({n}), got {value.numel()}")
    return value.reshape(n).to(dtype)


def check_priorities(p: torch.Tensor, alpha: float, eps: float) -> None:
    """Finite, >= 0, and a finite stored weight max(p, eps)^alpha (float32: p = 1e30 with
    alpha = 2 would store an infinite weight and break sampling)."""
    if p.numel() == 0:
        return
    w = _priority_weight(p, alpha, eps)
    if bool(((p >= 0) & (p < float("inf")) & (w < float("inf"))).all()):  # one host read when all is well
        return
    raise_for_invalid_priorities(p)
    raise ValueError(f"priorities too large: max(p, priority_eps)^alpha (alpha={alpha}) overflows float32 "
                     f"for p = {float(p.max())}")


def weights_clearly_finite(pmin: float, pmax: float, alpha: float, eps: float) -> bool:
    """Whether priorities in [pmin, pmax] are valid with room to spare: finite, >= 0 and a
    stored weight max(p, eps)^alpha (monotone in p) far below float32's largest value, so that
    no rounding of the fp64 power decides it. Otherwise :func:`check_priorities` decides."""
    if not (pmin >= 0.0 and pmax < float("inf")):
        return False
    try:
        return max(pmax, eps) ** alpha < 1e38
    except OverflowError:
        return False


def fresh_rows(buf, batch_size, fresh, replay_ratio, replacement) -> tuple[int, list | None]:
    """(number of fresh rows, the fresh fields in spec order, or None) of a ``sample`` call,
    once its arguments are checked: ``batch_size - n_fresh`` rows are then replayed."""
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
        if buf.spec is None:
            raise ValueError("the replay buffer is empty (and has no spec yet): add items before sampling")
        fresh, have, _, _ = check_batch(buf, fresh, "fresh")
        if replay_ratio is None:
            n_fresh = have
            if n_fresh > batch_size:
                raise ValueError(f"fresh has {n_fresh} rows, more than batch_size ({batch_size})")
        else:
            n_fresh = batch_size - int(math.floor(replay_ratio * batch_size + 0.5))
            if have < n_fresh:
                raise ValueError(f"fresh has {have} rows; replay_ratio={replay_ratio} needs {n_fresh}")
        fresh_fields = [fresh[f][:n_fresh] for f in buf.spec]
    n_replay = batch_size - n_fresh
    if n_replay > 0 and buf.size == 0:
        raise ValueError("the replay buffer is empty: add items before sampling")
    if not replacement and n_replay > buf.size:
        raise ValueError(f"cannot sample {n_replay} rows without replacement from the {buf.size} stored items")
    return n_fresh, fresh_fields
