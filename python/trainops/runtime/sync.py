"""How the runtime's workers stay in agreement, one object per training phase.

* :class:`DiLoCoSync`: DiLoCo / Streaming DiLoCo (:class:`trainops.distributed.DiLoCo`),
  an outer sync every ``sync_every`` inner steps, one fragment at a time.
* :class:`DDPSync`: ``torch.nn.parallel.DistributedDataParallel``, the gradients averaged
  in every optimizer step, in fp32 (a plain all-reduce, what DDP does without a hook) or
  through :func:`trainops.distributed.quantized_comm_hook` in a ``trainops.formats`` format.

Both count the bytes each worker sends in one :class:`~trainops.distributed.stats.CommStats`
and the seconds the worker's thread is blocked in the exchange (``comm_s``):

* DiLoCo: the time inside :meth:`DiLoCo.step` / :meth:`DiLoCo.sync_all` (quantizing,
  sending, waiting for the average, the outer step).
* DDP: the time spent inside the comm hook calls (launching each bucket's reduction) plus
  the time from the return of the last hook of a backward pass (the backward computation
  is done then) to the return of ``backward()`` (DDP waits for every bucket's reduction
  and copies the averages into ``.grad``). Reductions that finish while the backward
  computation goes on are hidden and not counted.

A new object is built per phase because adapters added at a task change the set of
trainable parameters (DDP's buckets and DiLoCo's fragments are built from it).
"""
# No `from __future__ import annotations`: DDP checks the hooks' return annotation objects.
import contextlib
import time
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from trainops.distributed import DiLoCo, QuantizedCommState, quantized_comm_hook
from trainops.distributed.stats import CommStats, ring_all_reduce_bytes

__all__ = ["DiLoCoSync", "DDPSync", "make_sync"]


class DiLoCoSync:
    """The runtime's default: :class:`DiLoCo` after every optimizer step."""

    kind = "diloco"

    def __init__(self, model, opt, cfg, stats: CommStats, broadcast_init: bool):
        self.comm_s = 0.0
        self.diloco = DiLoCo(model, opt, sync_every=cfg.sync_every, num_fragments=cfg.fragments,
                             overlap_steps=cfg.overlap_steps, outer_lr=cfg.outer_lr,
                             outer_momentum=cfg.outer_momentum, nesterov=cfg.outer_momentum > 0,
                             fmt=None if cfg.exchange == "fp32" else cfg.exchange, block_size=cfg.block_size,
                             error_feedback=cfg.error_feedback, min_numel=cfg.min_numel, stats=stats,
                             broadcast_init=broadcast_init)
        self.module = model

    def no_sync(self):
        return contextlib.nullcontext()

    def after_backward(self, seconds: float) -> None:
        pass

    def step(self) -> None:
        t = time.perf_counter()
        self.diloco.step()
        self.comm_s += time.perf_counter() - t

    def sync_all(self) -> None:
        t = time.perf_counter()
        self.diloco.sync_all()
        self.comm_s += time.perf_counter() - t

    def state_dict(self) -> dict:
        return self.diloco.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.diloco.load_state_dict(state)


class _Fp32HookState:
    """DDP's own averaging (divide by the world size, all-reduce in place), bytes counted."""

    def __init__(self, group, stats: CommStats):
        self.group, self.stats = group, stats


def _fp32_hook(state: _Fp32HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    buffer = bucket.buffer()
    world = dist.get_world_size(state.group)
    buffer.div_(world)
    state.stats.record(ring_all_reduce_bytes(buffer.numel() * buffer.element_size(), world), buffer.numel(),
                       quantized=False)
    work = dist.all_reduce(buffer, group=state.group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class _TimedHook:
    """Wraps a comm hook: seconds inside the hook calls, and when the last one returned."""

    def __init__(self, hook, state):
        self.hook, self.state = hook, state
        self.inside_s = 0.0
        self.last_return = None


def _timed_hook(timed: _TimedHook, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    t = time.perf_counter()
    fut = timed.hook(timed.state, bucket)
    timed.last_return = time.perf_counter()
    timed.inside_s += timed.last_return - t
    return fut


class DDPSync:
    """``DistributedDataParallel`` over the model: gradient averaging in every optimizer step.

    ``cfg.ddp_hook``: ``"fp32"`` or a format of :func:`quantized_comm_hook` (error feedback
    with ``cfg.error_feedback``, two-stage, residuals kept per parameter; they start from
    zero in each phase). Construction broadcasts rank 0's parameters (DDP does that), so
    every worker starts the phase from the same weights; on resume they are the same
    already. ``comm_group``: the group of the quantized hook's background reductions,
    created once by the caller and reused by every phase.
    """

    kind = "ddp"

    def __init__(self, model, cfg, stats: CommStats, comm_group=None):
        self.module = model
        self.comm_s = 0.0
        # find_unused_parameters: an expert no token of this micro-batch was routed to has
        # no gradient on this worker. broadcast_buffers=False: the buffers (load-balancing
        # counts) are kept in agreement by their own collectives.
        with warnings.catch_warnings():  # torch 2.13 deprecates broadcast_buffers for a flag that still syncs at init
            warnings.simplefilter("ignore", FutureWarning)
            self.ddp = DistributedDataParallel(model, broadcast_buffers=False, find_unused_parameters=True)
        if cfg.ddp_hook == "fp32":
            self.hook_state = _Fp32HookState(None, stats)
            hook = _fp32_hook
        else:
            self.hook_state = QuantizedCommState(module=model, fmt=cfg.ddp_hook, block_size=cfg.block_size,
                                                 error_feedback=cfg.error_feedback, min_numel=cfg.min_numel,
                                                 stats=stats, comm_group=comm_group)
            hook = quantized_comm_hook
        self._timed = _TimedHook(hook, self.hook_state)
        self.ddp.register_comm_hook(self._timed, _timed_hook)

    def __call__(self, *args, **kwargs):
        return self.ddp(*args, **kwargs)

    def no_sync(self):
        """For the micro-batches before the last one of an optimizer step: gradients only accumulate."""
        return self.ddp.no_sync()

    def after_backward(self, backward_end: float) -> None:
        """Call with ``time.perf_counter()`` right after a synchronizing ``backward()``."""
        t = self._timed
        self.comm_s += t.inside_s
        if t.last_return is not None:
            self.comm_s += max(0.0, backward_end - t.last_return)
        t.inside_s, t.last_return = 0.0, None

    def step(self) -> None:
        pass

    def sync_all(self) -> None:
        pass

    def state_dict(self) -> dict:
        hook = self.hook_state.state_dict() if isinstance(self.hook_state, QuantizedCommState) else None
        return {"kind": "ddp", "hook": hook}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("kind") != "ddp":
            raise ValueError("the checkpoint's sync state is not from --sync ddp")
        if state["hook"] is not None:
            self.hook_state.load_state_dict(state["hook"])


def make_sync(model, opt, cfg, stats: CommStats, broadcast_init: bool, comm_group=None):
    if cfg.sync == "ddp":
        return DDPSync(model, cfg, stats, comm_group)
    return DiLoCoSync(model, opt, cfg, stats, broadcast_init)
