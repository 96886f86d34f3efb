"""DDP communication hook: gradient buckets averaged with the two-shot quantized all-reduce.

Usage::

    state = QuantizedCommState(module=model, fmt="fp4_e3m0", error_feedback=True)
    ddp = DistributedDataParallel(model)
    ddp.register_comm_hook(state, quantized_comm_hook)
    ...
    torch.save({"model": ..., "comm": state.state_dict()}, path)

Error feedback is kept per parameter, not per bucket index: DDP rebuilds its buckets
after the first iteration (and a restarted job starts from the initial layout again),
so residuals are stored as one flat fp32 buffer per bucket keyed by the bucket's
parameters, and a bucket with a new layout takes over the residual slices of its
parameters from the old buckets or from a loaded ``state_dict``. Nothing is reset.

Two-stage error feedback (``owner_error_feedback=True``, DoubleSqueeze, arXiv 1905.05957):
each rank also keeps, per bucket, the residual of requantizing the averaged chunk of the
bucket it owns (elements ``[r * chunk, (r + 1) * chunk)`` of the bucket, see
:func:`~trainops.distributed.all_reduce.owner_chunk_numel`). Which elements a rank owns
depends on the bucket's layout, so when a bucket with a new layout forms, the owner
residual of the elements this rank still owns moves with their parameters, and the rest
is folded into this rank's worker residual of the same elements, times W (the owner
residual is in units of the average; W * e_s in the worker residual adds e_s to the next
average). Nothing is lost, and no collective is needed. ``state_dict`` stores it per
parameter (``owner_errors``: zero outside the owned elements), so a restart with the same
bucket layout continues bit for bit and any other layout folds it as above.

Agreement across ranks: :func:`quantized_all_reduce` checks that the ranks pass the same
arguments with one small all-gather per call. DDP already guarantees that every rank's
bucket has the same size and dtype (it verifies the parameters' shapes across ranks at
construction and rebuilds buckets identically on every rank), so the hook checks only
on the first bucket after the state's settings (fmt, block_size, min_numel, nan_policy)
were set or changed: a rank with another format raises the same ValueError as its peers
in the first backward pass, and later buckets skip the extra collective. That error, like
any failed backward under DDP, ends the job: a rank cannot re-check later without its
peers doing the same in step, so the check is not repeated until the settings change.

Buckets are reduced on a background thread over a process group of their own (created
here, on every rank), so communication overlaps the rest of the backward pass and never
interleaves with DDP's own collectives.
"""
# No `from __future__ import annotations`: DDP checks the hook's return annotation object.
from typing import Optional

import torch
import torch.distributed as dist

from trainops.distributed.all_reduce import DEFAULT_MIN_NUMEL, check_exchange_settings, owner_chunk_numel, \
    quantized_all_reduce
from trainops.distributed.stats import CommStats, comm_stats

__all__ = ["QuantizedCommState", "quantized_comm_hook"]


class QuantizedCommState:
    """State of :func:`quantized_comm_hook`: format, process groups, per-parameter error feedback.

    ``module``: the model (or the DDP wrapper) whose parameters are trained; its parameter
    names key the residuals in :meth:`state_dict`. Without it, parameters are keyed by the
    order in which buckets first show them (the same in every identically built run).
    ``comm_group``: the group the hook communicates on; by default a new group over the
    ranks of ``process_group`` (``dist.new_group``, so construct the state on every rank).
    ``async_comm=False`` reduces each bucket inline instead (no extra group, no overlap).
    """

    def __init__(self, process_group=None, fmt: Optional[str] = "fp4_e3m0", block_size: int = 128,
                 error_feedback: bool = True, *, module: Optional[torch.nn.Module] = None,
                 min_numel: int = DEFAULT_MIN_NUMEL, async_comm: bool = True, comm_group=None,
                 nan_policy: str = "raise", stats: Optional[CommStats] = None, owner_error_feedback: bool = True,
                 pipeline_numel: Optional[int] = None):
        check_exchange_settings(fmt, block_size, nan_policy, min_numel, pipeline_numel, error_feedback=error_feedback,
                                owner_error_feedback=owner_error_feedback, async_comm=async_comm)
        if module is not None and not isinstance(module, torch.nn.Module):
            raise TypeError(f"module must be a torch.nn.Module or None, got {type(module).__name__}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("QuantizedCommState needs an initialized process group (dist.init_process_group)")
        self.process_group = process_group
        self.fmt = fmt
        self.block_size = block_size
        self.error_feedback = error_feedback
        self.owner_error_feedback = owner_error_feedback
        self.pipeline_numel = pipeline_numel
        self.min_numel = min_numel
        self.async_comm = async_comm
        self.nan_policy = nan_policy
        self.stats = comm_stats() if stats is None else stats
        if comm_group is None and async_comm:
            ranks = None if process_group is None else dist.get_process_group_ranks(process_group)
            comm_group = dist.new_group(ranks=ranks)
        self.comm_group = comm_group if comm_group is not None else process_group
        self._names = {} if module is None else {id(p): n for n, p in module.named_parameters()}
        self._auto_keys: dict[int, str] = {}
        self._errors: dict[tuple, torch.Tensor] = {}  # bucket key -> flat fp32 residual
        self._slots: dict[str, tuple] = {}  # param key -> (bucket key, offset, numel)
        self._loaded: dict[str, torch.Tensor] = {}  # residuals from load_state_dict not yet claimed
        self._owners: dict[tuple, tuple] = {}  # bucket key -> (owner residual, first owned element)
        self._loaded_owner: dict[str, torch.Tensor] = {}  # per-parameter owner residuals not yet claimed
        self._agreed = None  # the settings last checked against the other ranks

    def _needs_agreement(self) -> bool:
        """True on the first bucket with the current settings (then checked across ranks)."""
        settings = (self.fmt, self.block_size, self.min_numel, self.nan_policy, self.pipeline_numel)
        fresh, self._agreed = self._agreed != settings, settings
        return fresh

    # --- residual bookkeeping ---------------------------------------------------------------

    def _param_key(self, p: torch.Tensor) -> str:
        name = self._names.get(id(p))
        if name is not None:
            return name
        key = self._auto_keys.get(id(p))
        if key is None:
            key = self._auto_keys[id(p)] = f"param{len(self._auto_keys)}"
        return key

    def _residual_of(self, key: str) -> Optional[torch.Tensor]:
        if key in self._loaded:
            return self._loaded.pop(key)
        slot = self._slots.get(key)
        if slot is None:
            return None
        bucket_key, offset, numel = slot
        return self._errors[bucket_key][offset:offset + numel]

    def _owner_residual_of(self, key: str, numel: int) -> Optional[torch.Tensor]:
        """This rank's owner residual of parameter ``key``, as ``numel`` values (zero where not owned)."""
        if key in self._loaded_owner:
            old = self._loaded_owner.pop(key).reshape(-1)
            if old.numel() != numel:
                raise ValueError(f"state dict owner_errors[{key!r}] has {old.numel()} elements, the parameter {numel}")
            return old
        slot = self._slots.get(key)
        owner = None if slot is None else self._owners.get(slot[0])
        if owner is None:
            return None
        _, offset, _ = slot
        residual, lo = owner
        a, b = max(offset, lo), min(offset + numel, lo + residual.numel())
        if b <= a:
            return None
        out = torch.zeros(numel, dtype=torch.float32, device=residual.device)
        out[a - offset:b - offset] = residual[a - lo:b - lo]
        return out

    def bucket_error(self, params, buffer: torch.Tensor) -> torch.Tensor:
        """The flat fp32 residual of the bucket holding ``params`` (laid out like ``buffer``)."""
        return self.bucket_residuals(params, buffer)[0]

    def bucket_residuals(self, params, buffer: torch.Tensor) -> tuple:
        """(worker residual laid out like ``buffer``, this rank's owner residual of the bucket or None)."""
        keys = tuple(self._param_key(p) for p in params)
        err = self._errors.get(keys)
        if err is not None and err.numel() == buffer.numel():
            owner = self._owners.get(keys)
            return err, None if owner is None else owner[0]
        sizes = [p.numel() for p in params]
        if sum(sizes) != buffer.numel():
            raise RuntimeError(
                f"DDP bucket of {buffer.numel()} elements does not hold its {len(sizes)} parameters "
                f"({sum(sizes)} elements) back to back; per-parameter error feedback needs that layout"
            )
        n = buffer.numel()
        err = torch.zeros(n, dtype=torch.float32, device=buffer.device)
        spread = torch.zeros(n, dtype=torch.float32, device=buffer.device)
        offset = 0
        for key, numel in zip(keys, sizes):
            old = self._residual_of(key)
            if old is not None:
                err[offset:offset + numel] = old.reshape(-1).to(err.device)
            old = self._owner_residual_of(key, numel)
            if old is not None:
                spread[offset:offset + numel] = old.to(err.device)
            offset += numel
        world = dist.get_world_size(self.comm_group)
        if self.owner_error_feedback:
            chunk = owner_chunk_numel(n, world, self.block_size)
            lo = dist.get_rank(self.comm_group) * chunk
            owned = max(0, min(n, lo + chunk) - lo)
            owner = torch.zeros(chunk, dtype=torch.float32, device=buffer.device)
            owner[:owned] = spread[lo:lo + owned]
            spread[lo:lo + owned] = 0
            self._owners[keys] = (owner, lo)
        # Owner residual of elements this rank does not own (any more): W * e_s in the worker
        # residual adds e_s to the next average.
        err.add_(spread, alpha=world)
        offset = 0
        for key, numel in zip(keys, sizes):
            self._slots[key] = (keys, offset, numel)
            offset += numel
        self._errors[keys] = err
        # Drop buckets of an old layout once none of their parameters point at them.
        live = {slot[0] for slot in self._slots.values()}
        for stale in [k for k in self._errors if k not in live]:
            del self._errors[stale]
        for stale in [k for k in self._owners if k not in live]:
            del self._owners[stale]
        owner = self._owners.get(keys)
        return err, None if owner is None else owner[0]

    def state_dict(self) -> dict:
        """Format settings and the residuals of every parameter (layout independent, cloned):
        ``errors`` (worker residuals) and ``owner_errors`` (this rank's owner residuals, for the
        parameters with elements in a chunk it owns; zero elsewhere)."""
        errors = {key: t.clone() for key, t in self._loaded.items()}
        owner_errors = {key: t.clone() for key, t in self._loaded_owner.items()}
        for key, (bucket_key, offset, numel) in self._slots.items():
            errors[key] = self._errors[bucket_key][offset:offset + numel].clone()
            owned = self._owner_residual_of(key, numel) if key not in self._loaded_owner else None
            if owned is not None:
                owner_errors[key] = owned
        return {"fmt": self.fmt, "block_size": self.block_size, "error_feedback": self.error_feedback,
                "errors": errors, "owner_errors": owner_errors}

    def load_state_dict(self, state: dict) -> None:
        for field in ("fmt", "block_size", "errors"):
            if field not in state:
                raise KeyError(f"state dict lacks {field!r}: not from QuantizedCommState.state_dict()")
        if state["fmt"] != self.fmt or state["block_size"] != self.block_size:
            raise ValueError(
                f"state dict was saved with fmt={state['fmt']!r}, block_size={state['block_size']}; "
                f"this state uses fmt={self.fmt!r}, block_size={self.block_size}"
            )
        self._errors.clear()
        self._slots.clear()
        self._owners.clear()
        self._loaded = {key: t.detach().to(torch.float32).clone() for key, t in state["errors"].items()}
        # absent in state dicts of older versions
        self._loaded_owner = {key: t.detach().to(torch.float32).clone()
                              for key, t in state.get("owner_errors", {}).items()}


def quantized_comm_hook(state: QuantizedCommState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average ``bucket``'s gradients across ranks with :func:`quantized_all_reduce`.

    Register with ``ddp.register_comm_hook(state, quantized_comm_hook)``. The returned
    future holds the bucket buffer, reduced in place and bit-identical on every rank, so
    all replicas take the same optimizer step.
    """
    buffer = bucket.buffer()
    err = owner = None
    if state.error_feedback and state.fmt is not None and buffer.numel() >= state.min_numel:
        err, owner = state.bucket_residuals(bucket.parameters(), buffer)
    kwargs = dict(min_numel=state.min_numel, nan_policy=state.nan_policy, stats=state.stats,
                  verify=state._needs_agreement(), owner_error_feedback=owner, pipeline_numel=state.pipeline_numel)
    work = quantized_all_reduce(buffer, "avg", state.comm_group, state.fmt, state.block_size, err,
                                async_op=True, **kwargs) if state.async_comm else None
    if work is None:
        quantized_all_reduce(buffer, "avg", state.comm_group, state.fmt, state.block_size, err, **kwargs)
        fut = torch.futures.Future()
        fut.set_result(buffer)
        return fut

    def _result(fut):
        fut.value()  # re-raise a failure of the reduction
        return buffer

    return work.get_future().then(_result)
