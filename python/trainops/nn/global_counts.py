"""Counts accumulated once per original forward, as torch ops that torch.compile keeps in
its graph: the global scope's ``trainops::lbl_accumulate_global`` (and
``trainops::all_reduce_counts``, the collective of its batched form) and the aux-loss-free
router's load, ``trainops::add_unless_recomputing``.

Per call (one MoE layer, one micro-batch), with c the layer's local selection counts and
n its local valid tokens ("Demons in the Detail", arXiv 2501.11873, Algorithm 1):

    [C, N] += all_reduce_sum([c, n], group)        returns [C, N] after the update

so micro-batch m of a global batch sees the counts of micro-batches 1..m of every rank.

Why an op and not Python around ``dist.all_reduce``: the step is stateful and must know,
when it runs, whether the forward is new or a recomputation under activation
checkpointing (then it must neither add the counts again nor issue a collective that the
original forward already issued). As an opaque op, torch.compile keeps it inside the graph
(Python state and host-side checks broke the graph at every layer) and the check still
runs at run time, also when a compiled region is recomputed.

Recomputation is recognized as in eager mode: the autograd engine is running a backward,
and the local counts equal those of one of the last ``SNAPSHOTS`` original forwards, whose
result is returned. The snapshots are a ring of tensors: ``snap_counts`` [S, E] (the local
counts) and ``snap_totals`` [S, E + 1] (the result), and ``snap_len``, a host (CPU) int64
scalar counting the snapshots written, so that writing one needs no device read.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist

__all__ = ["SNAPSHOTS", "accumulate_global", "add_unless_recomputing", "all_reduce_counts", "count_buffer",
           "group_name", "in_backward", "resolve_group"]

SNAPSHOTS = 64


def in_backward() -> bool:
    """True while the autograd engine runs a backward: a forward seen then is a
    recomputation (activation checkpointing, reentrant or not)."""
    fn = getattr(torch._C, "_current_graph_task_id", None)
    return fn is not None and fn() != -1


def count_buffer(counts: torch.Tensor, num_tokens: torch.Tensor, device) -> torch.Tensor:
    """[counts, valid tokens] as int64 on ``device``: what the global scope sums over the group."""
    return torch.cat([counts.detach().to(device, torch.int64), num_tokens.detach().to(device, torch.int64).reshape(1)])


def group_name(group) -> str:
    """The name that :func:`resolve_group` maps back to ``group`` ("" for the default group)."""
    if group is None:
        return ""
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    return group.group_name


def resolve_group(name: str):
    """The process group to sum over, or None when there is a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = dist.group.WORLD if name == "" else dist.distributed_c10d._resolve_process_group(name)
    return group if dist.get_world_size(group) > 1 else None


def _sum_over_group(buf: torch.Tensor, group: str) -> None:
    """buf <- its sum over the group named ``group`` (nothing with one process). One small
    collective; integer sums are exact and order-independent."""
    pg = resolve_group(group)
    if pg is not None:
        dist.all_reduce(buf, group=pg)


def _op_when_compiling(name: str):
    """Registers the decorated function as the kernel of ``trainops::<name>`` (schema:
    ops/_schemas.py) for every device, and returns a function that calls the op while
    torch.compile traces (one opaque graph node that runs at run time) and the function
    itself in eager mode, without the op dispatch (~100 us a call on a CPU, more than the
    work)."""
    def wrap(fn):
        torch.library.register_kernel(f"trainops::{name}", None, fn)
        op = getattr(torch.ops.trainops, name)

        @functools.wraps(fn)
        def call(*args):
            return op(*args) if torch.compiler.is_compiling() else fn(*args)

        return call
    return wrap


@_op_when_compiling("lbl_accumulate_global")
def accumulate_global(acc_counts: torch.Tensor, acc_tokens: torch.Tensor, snap_counts: torch.Tensor,
                      snap_totals: torch.Tensor, snap_len: torch.Tensor, counts: torch.Tensor,
                      num_tokens: torch.Tensor, reduced: torch.Tensor | None, group: str) -> torch.Tensor:
    """Adds this call's [counts, num_tokens], summed over ``group``, to the accumulators
    and returns them ([E + 1] int64: counts, then tokens). ``reduced``: the sum over the
    group, already reduced by the caller (``GlobalCountSync``); None: all-reduce here."""
    device = acc_counts.device
    local = counts.detach().to(device, torch.int64)
    if in_backward():
        return _recomputed(snap_counts, snap_totals, int(snap_len), local)
    if reduced is None:
        reduced = count_buffer(local, num_tokens, device)
        _sum_over_group(reduced, group)
    reduced = reduced.to(device, torch.int64)
    acc_counts += reduced[:-1]
    acc_tokens += reduced[-1]
    totals = torch.cat([acc_counts, acc_tokens.reshape(1)])
    slot = int(snap_len) % snap_counts.shape[0]
    snap_counts[slot] = local
    snap_totals[slot] = totals
    snap_len += 1
    return totals


def _recomputed(snap_counts, snap_totals, written: int, local) -> torch.Tensor:
    """The result of the newest original forward whose local counts were ``local``."""
    S = snap_counts.shape[0]
    order = [(written - 1 - j) % S for j in range(min(written, S))]  # newest first
    if order:
        idx = torch.tensor(order, device=snap_counts.device)
        hits = (snap_counts.index_select(0, idx) == local).all(1).nonzero()
        if hits.numel():
            return snap_totals[order[int(hits[0])]].clone()
    raise RuntimeError("LoadBalancingLoss: a recomputed forward found no matching original forward "
                       "(were the counts reset between forward and backward?)")


@torch.library.register_fake("trainops::lbl_accumulate_global")
def _(acc_counts, acc_tokens, snap_counts, snap_totals, snap_len, counts, num_tokens, reduced, group):
    return acc_counts.new_empty(acc_counts.shape[0] + 1)


@_op_when_compiling("all_reduce_counts")
def all_reduce_counts(flat: torch.Tensor, group: str) -> torch.Tensor:
    """The sum of ``flat`` over ``group`` (a copy): GlobalCountSync's single collective,
    also inside a compiled graph."""
    out = flat.clone()  # a functional op: its input stays as it was
    _sum_over_group(out, group)
    return out


@torch.library.register_fake("trainops::all_reduce_counts")
def _(flat, group):
    return torch.empty_like(flat)


@_op_when_compiling("add_unless_recomputing")
def add_unless_recomputing(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc += x, except in a forward recomputed during backward (activation checkpointing):
    loads counted once per original forward, also under torch.compile."""
    if not in_backward():
        acc += x.detach().to(acc.dtype)


@torch.library.register_fake("trainops::add_unless_recomputing")
def _(acc, x):
    return None
