"""State of :class:`~trainops.replay.ReplayBuffer` as a dict of tensors (``state_dict``,
``load_state_dict``): its configuration, the layout of its entries, and the check that a state
is one a buffer can reach before any of it is written."""
from __future__ import annotations

import torch

from trainops._replay_spec import block_stats as _block_stats
from trainops._validation import check_finite_float
from trainops.replay import _checks, _rows

__all__ = ["FORMAT", "config", "spec_from_config", "state_dict", "load_state_dict", "check_state"]

FORMAT = "trainops.replay/1"
# per-slot entries (one row per slot; a stored-only state holds the first ``size``) and the
# value of an empty slot
EMPTY_SLOT = {"generations": -1, "stamps": 0, "keys": 0, "priorities": 0, "weights": 0, "groups": -1}


def config(buf) -> dict:
    """The buffer's constructor arguments and format as plain values (JSON-serializable)."""
    spec = None if buf.spec is None else {
        k: [list(s), str(d).replace("torch.", "")] for k, (s, d) in buf.spec.items()}
    return {"format": FORMAT, "capacity": buf.capacity, "sampler": buf.sampler, "eviction": buf.eviction,
            "alpha": buf.alpha, "beta": buf.beta, "seed": buf.seed, "weight_norm": buf.weight_norm,
            "priority_eps": buf.priority_eps, "task_field": buf.task_field,
            "power_law_exponent": buf.power_law_exponent, "max_tasks": buf.max_tasks, "ragged": buf.ragged,
            "spec": spec, "returns_tensordict": buf.returns_tensordict}


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name.replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in the saved spec")
    return dtype


def spec_from_config(spec) -> dict:
    """A saved ``config()["spec"]`` (field name -> [shape, dtype name]; "a.b" is the nested key
    ("a", "b")) as a constructor spec."""
    if not isinstance(spec, dict) or not all(
            isinstance(k, str) and isinstance(e, list) and len(e) == 2 and isinstance(e[0], list)
            and isinstance(e[1], str) and all(isinstance(s, int) and not isinstance(s, bool) for s in e[0])
            for k, e in spec.items()):
        raise ValueError(f"the saved spec must map field -> [shape (list of ints), dtype name], got {spec!r}")
    return {_rows.key_of(k): (tuple(s), _dtype_from_name(d)) for k, (s, d) in spec.items()}


def state_dict(buf, stored_only: bool) -> dict:
    """:meth:`ReplayBuffer.state_dict`."""
    rows = slice(0, buf.size if stored_only else buf.capacity)
    state = {f"storage.{k}": v[rows] for k, v in (buf.storage or {}).items()}
    state.update(generations=buf.generations[rows], stamps=buf.stamps[rows], keys=buf.keys[rows],
                 priorities=buf.priorities[rows], weights=buf.weights[rows], block_stats=buf.block_stats,
                 groups=buf.groups[rows], max_priority=buf.max_priority, task_last=buf.task_last,
                 counters=torch.tensor([buf.size, buf.cursor, buf.step, buf.rng_offset], dtype=torch.int64))
    state["config"] = config(buf)
    return state


def state_layout(buf, spec: dict | None) -> dict:
    """state_dict entry -> (shape, dtype) of every tensor entry, for a buffer of ``spec``."""
    cap = buf.capacity
    layout = {f"storage.{k}": ((cap, *shape), dtype) for k, (shape, dtype) in (spec or {}).items()}
    layout.update(generations=((cap,), torch.int64), stamps=((cap,), torch.int64), keys=((cap,), torch.float64),
                  priorities=((cap,), torch.float32), weights=((cap,), torch.float32),
                  block_stats=(tuple(buf.block_stats.shape), torch.float64), groups=((cap,), torch.int64),
                  max_priority=((1,), torch.float32), task_last=((buf.max_tasks,), torch.int64),
                  counters=((4,), torch.int64))
    return layout


def is_per_slot(name: str) -> bool:
    return name.startswith("storage.") or name in EMPTY_SLOT


def load_state_dict(buf, state: dict) -> None:
    """:meth:`ReplayBuffer.load_state_dict`: everything checked (:func:`check_state`), then written."""
    tensors, counters, beta, spec = check_state(buf, state)
    if buf.spec is None and spec is not None:
        buf._allocate(spec)
    for name, src in tensors.items():
        dst = buf.storage[name[len("storage."):]] if name.startswith("storage.") else getattr(buf, name)
        rows = src.shape[0]
        if is_per_slot(name) and rows < buf.capacity:
            dst[:rows].copy_(src)
            dst[rows:].fill_(EMPTY_SLOT.get(name, 0))
        else:
            dst.copy_(src)
    buf.size, buf.cursor, buf.step, buf.rng_offset = counters
    buf.beta = beta
    buf.returns_tensordict = bool(state["config"].get("returns_tensordict", False))
    buf._winner.fill_(-1)


def check_state(buf, state) -> tuple[dict, tuple, float, dict | None]:
    """(tensor entries, counters, beta, spec) of ``state`` once every invariant of a buffer
    that ``add``/``update_priorities`` can produce holds; raises TypeError/ValueError otherwise.
    Nothing is written: :func:`load_state_dict` checks everything first."""
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise TypeError("state must be a dict produced by ReplayBuffer.state_dict()")
    cfg, mine = state["config"], config(buf)
    spec = buf.spec
    if spec is None and cfg.get("spec") is not None:  # a spec-less buffer takes the state's spec
        spec = _checks.normalize_spec(spec_from_config(cfg["spec"]))
        _checks.check_options(buf, spec)
        mine["spec"] = cfg["spec"]
    adopted = ("beta", "returns_tensordict")
    diff = sorted(k for k in set(mine) | set(cfg) if k not in adopted and cfg.get(k) != mine.get(k))
    if diff:
        raise ValueError(f"state does not match this buffer's configuration in {diff}")
    beta = check_finite_float("beta (in the state's config)", cfg.get("beta", buf.beta), lo=0.0)
    if not isinstance(cfg.get("returns_tensordict", False), bool):
        raise ValueError("returns_tensordict (in the state's config) must be a bool")
    layout = state_layout(buf, spec)
    missing = sorted(set(layout) - set(state))
    unknown = sorted(set(state) - set(layout) - {"config"})
    if missing or unknown:
        raise ValueError(f"state is missing entries {missing} / has unknown entries {unknown}")
    counters = state["counters"]  # first: a stored-only state's per-slot entries have `size` rows
    size = int(counters[0]) if isinstance(counters, torch.Tensor) and counters.shape == (4,) \
        and counters.dtype == torch.int64 else -1
    rows_ok = {buf.capacity} | ({size} if 0 <= size <= buf.capacity else set())
    tensors = {}
    for name, (shape, dtype) in layout.items():
        t = state[name]
        ok = isinstance(t, torch.Tensor) and t.dtype == dtype and (tuple(t.shape) == shape or (
            is_per_slot(name) and t.dim() == len(shape) and t.shape[0] in rows_ok
            and tuple(t.shape[1:]) == shape[1:]))
        if not ok:
            got = (f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__)
            rows = f" (or {size} stored rows)" if is_per_slot(name) and size in rows_ok - {shape[0]} else ""
            raise ValueError(f"state entry {name!r} must be a {dtype} tensor of shape {shape}{rows}, got {got}")
        tensors[name] = t.detach()
    size, cursor, step, offset = (int(x) for x in tensors.pop("counters").tolist())
    _check_invariants(buf, {k: v.cpu() for k, v in tensors.items()}, size, cursor, step, offset, spec)
    return tensors, (size, cursor, step, offset), beta, spec


def _check_invariants(buf, t: dict, size: int, cursor: int, step: int, offset: int, spec) -> None:
    """The slot contents of a state (CPU tensors ``t``) are those of a buffer that ``add`` and
    ``update_priorities`` can produce: ring or reservoir generations, stamps, keys, priorities,
    block statistics, task clocks, task ids and ragged lengths."""
    cap = buf.capacity

    def need(ok, what: str) -> None:
        if not bool(ok):
            raise ValueError(f"invalid replay buffer state: {what} "
                             f"(size={size}, cursor={cursor}, step={step}, rng_offset={offset})")

    for name, v in (("size", size), ("cursor", cursor), ("step", step), ("rng_offset", offset)):
        need(0 <= v < 2**62, f"counter {name} must be in [0, 2^62)")
    need(size == min(cursor, cap), f"size must be min(cursor, capacity={cap})")
    need(step <= cursor and (step == 0) == (cursor == 0),
         "step (add calls) must be in [1, cursor] once items were added")
    stored, empty = slice(0, size), slice(size, cap)
    gen = t["generations"][stored]
    need((t["generations"][empty] == -1).all(), "generations of empty slots must be -1")
    if buf.eviction == "fifo":  # slot s holds the newest serial < cursor that is s mod capacity
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
         and (buf.eviction == "reservoir" or (keys == 0).all()),
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
    if buf.sampler == "power_law":
        tasks = t[f"storage.{buf.task_field}"][stored]
        need(((tasks >= 0) & (tasks < buf.max_tasks)).all(),
             f"task ids in {buf.task_field!r} must be in [0, max_tasks={buf.max_tasks})")
    for field, length_field in buf.ragged.items():
        lengths = t[f"storage.{length_field}"][stored]
        L = spec[field][0][0]
        need(((lengths >= 0) & (lengths <= L)).all(), f"lengths in {length_field!r} must be in [0, {L}]")
