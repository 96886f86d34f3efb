"""DiLoCo and Streaming DiLoCo: local inner steps, rare (quantized) outer synchronization.

DiLoCo (arXiv 2311.08105): each of M workers runs inner optimizer steps on its own data;
every H = ``sync_every`` steps the pseudo-gradient Δ = θ_global − θ_local is averaged
across workers and an outer SGD step with Nesterov momentum (lr 0.7, momentum 0.9)
updates θ_global, which every worker then adopts.

Streaming DiLoCo (arXiv 2501.18512) adds:

* ``num_fragments`` P: parameters split into P strided fragments
  (:mod:`trainops.distributed.fragments`); fragment p syncs at the steps t with
  t mod H = ((p + 1) H / P) mod H, so the syncs are staggered and the peak bandwidth
  is 1/P of DiLoCo's (H must be divisible by P).
* ``overlap_steps`` τ: Δ of a fragment is sent at step t and the all-reduce runs in the
  background while τ more inner steps proceed; at step t + τ the outer step is applied.
* ``fragment_alpha`` α: on arrival the local fragment becomes
  θ ← α θ_local + (1 − α) θ_global (α = 0 takes the global value).
* exchange in ``fmt`` (FP4 E3M0 by default) through
  :func:`~trainops.distributed.quantized_all_reduce`, summed in FP32; ``fmt=None``
  exchanges in full precision.

Every worker ends each outer step with the same θ_global for that fragment, bit for bit
(the all-reduce result is identical on every rank), so with α = 0 replicas agree exactly
on every fragment right after its sync.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from trainops._validation import check_finite_float, check_int
from trainops.distributed.all_reduce import DEFAULT_MIN_NUMEL, check_exchange_settings, owner_chunk_numel, \
    quantized_all_reduce
from trainops.distributed.fragments import strided_fragments
from trainops.distributed.stats import CommStats

__all__ = ["DiLoCo"]


class _InFlight:
    """A fragment's exchanged pseudo-gradient: sent at some step, applied at ``merge_step``."""

    def __init__(self, merge_step: int, delta: torch.Tensor, work=None):
        self.merge_step = merge_step
        self.delta = delta
        self.work = work

    def result(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.delta


class DiLoCo:
    """Wraps a model and its inner optimizer; call :meth:`step` after every ``inner_optimizer.step()``.

    Args:
        model: the local replica (parameters are changed in place at syncs).
        inner_optimizer: any ``torch.optim.Optimizer`` over the model's parameters.
        sync_every: H, inner steps between two syncs of the same fragment.
        outer_lr, outer_momentum, nesterov: the outer SGD (per-parameter momentum).
        num_fragments: P strided fragments (1: plain DiLoCo); H % P must be 0.
        overlap_steps: τ in [0, H): inner steps the exchange of a fragment overlaps.
        fragment_alpha: α in [0, 1], mixing of local and global values on arrival.
        fmt: exchange format (``None``: full precision); ``block_size``: its block.
        error_feedback: keep each fragment's quantization residual and add it to the next Δ.
        owner_error_feedback: with ``error_feedback``, also keep the residual of this worker's
            requantization of the averaged chunk it owns (two-stage error feedback,
            DoubleSqueeze, arXiv 1905.05957), so that no quantization error is lost over syncs.
        pipeline_numel: cut each exchange into pieces of about this many elements whose
            quantization overlaps the transfer of the previous piece (same result bit for bit).
        group: process group of the workers (default: world).
        min_numel: fragments smaller than this are exchanged in full precision.
        broadcast_init: start every worker from rank 0's parameters. To continue from a
            checkpoint, pass ``False`` (no broadcast needed) or call :meth:`load_state_dict`
            after construction, which restores this worker's own parameters too: between
            two syncs the workers' parameters differ, so a broadcast would replace the
            restored ones with rank 0's.

    Collectives: the constructor (broadcast, and a dedicated group when τ > 0) and every
    sync are collectives, so every worker must construct and step the same way.
    ``stats`` counts the bytes this worker sent.
    """

    def __init__(self, model: torch.nn.Module, inner_optimizer: torch.optim.Optimizer, sync_every: int = 100,
                 outer_lr: float = 0.7, outer_momentum: float = 0.9, nesterov: bool = True, num_fragments: int = 1,
                 overlap_steps: int = 0, fragment_alpha: float = 0.0, fmt: str | None = "fp4_e3m0", *,
                 block_size: int = 128, error_feedback: bool = False, group=None,
                 min_numel: int = DEFAULT_MIN_NUMEL, broadcast_init: bool = True, stats: CommStats | None = None,
                 owner_error_feedback: bool = True, pipeline_numel: int | None = None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(inner_optimizer, torch.optim.Optimizer):
            raise TypeError(f"inner_optimizer must be a torch.optim.Optimizer, got {type(inner_optimizer).__name__}")
        check_int("sync_every", sync_every, 1)
        check_int("num_fragments", num_fragments, 1)
        if sync_every % num_fragments:
            raise ValueError(f"sync_every ({sync_every}) must be divisible by num_fragments ({num_fragments})")
        check_int("overlap_steps", overlap_steps, 0, sync_every - 1)
        check_finite_float("outer_lr", outer_lr, lo=0.0, lo_open=True)
        check_finite_float("outer_momentum", outer_momentum, 0.0, 1.0, hi_open=True)
        check_finite_float("fragment_alpha", fragment_alpha, 0.0, 1.0)
        if nesterov and outer_momentum == 0:
            raise ValueError("nesterov=True needs outer_momentum > 0")
        check_exchange_settings(fmt, block_size, "raise", min_numel, pipeline_numel, nesterov=nesterov,
                                error_feedback=error_feedback, owner_error_feedback=owner_error_feedback,
                                broadcast_init=broadcast_init)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model has no trainable parameters")
        fragments = strided_fragments(named, num_fragments)
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DiLoCo needs an initialized process group (dist.init_process_group)")
        self.model = model
        self.inner_optimizer = inner_optimizer
        self.sync_every = sync_every
        self.num_fragments = num_fragments
        self.overlap_steps = overlap_steps
        self.fragment_alpha = float(fragment_alpha)
        self.fmt = fmt
        self.block_size = block_size
        self.error_feedback = bool(error_feedback)
        self.owner_error_feedback = owner_error_feedback
        self.pipeline_numel = pipeline_numel
        self.group = group
        self.min_numel = min_numel
        self.stats = CommStats() if stats is None else stats
        self.fragments = fragments
        self._names = [n for n, _ in named]
        if broadcast_init:
            src = dist.get_global_rank(group, 0) if group is not None else 0
            with torch.no_grad():
                for _, p in named:
                    dist.broadcast(p.data, src, group=group)
        # θ_global in fp32, one tensor per parameter, grouped by fragment like the parameters.
        self._global = [[p.detach().float().clone() for _, p in frag] for frag in self.fragments]
        self._outer = torch.optim.SGD([g for frag in self._global for g in frag], lr=outer_lr,
                                      momentum=outer_momentum, nesterov=nesterov)
        self._errors: list[torch.Tensor | None] = [None] * num_fragments
        self._owner_errors: list[torch.Tensor | None] = [None] * num_fragments
        self._in_flight: dict[int, _InFlight] = {}
        self._step = 0
        # Async exchanges run on a group of their own so they never interleave with the
        # caller's collectives (see trainops.distributed.async_work).
        self._comm_group = group
        if overlap_steps > 0:
            ranks = None if group is None else dist.get_process_group_ranks(group)
            self._comm_group = dist.new_group(ranks=ranks)

    # --- schedule ----------------------------------------------------------------------------

    @property
    def inner_step(self) -> int:
        """Inner steps taken so far (the number of :meth:`step` calls)."""
        return self._step

    def send_offset(self, fragment: int) -> int:
        """Fragment ``fragment`` is sent after the inner steps t with t % sync_every == this."""
        return ((fragment + 1) * self.sync_every // self.num_fragments) % self.sync_every

    def global_parameters(self) -> list[list[torch.Tensor]]:
        """θ_global (fp32), one list per fragment in the order of ``self.fragments``."""
        return self._global

    def step(self) -> None:
        """Count one inner step; apply the outer steps that are due and send the fragments that are due."""
        self._step += 1
        t = self._step
        for frag in sorted(self._in_flight):
            if self._in_flight[frag].merge_step == t:
                self._merge(frag, self._in_flight.pop(frag).result())
        for frag in range(self.num_fragments):
            if t % self.sync_every == self.send_offset(frag):
                self._send(frag, t)

    def flush(self) -> None:
        """Apply every in-flight sync now (e.g. at the end of training)."""
        for frag in sorted(self._in_flight):
            self._merge(frag, self._in_flight.pop(frag).result())

    def sync_all(self) -> None:
        """Sync every fragment now, e.g. at the end of a training phase (a collective).

        In-flight exchanges are applied first; then each fragment not already sent at
        the current inner step is exchanged and its outer step applied at once. With
        ``fragment_alpha == 0`` every worker then holds θ_global for all the parameters,
        bit for bit. The schedule of later :meth:`step` calls is unchanged."""
        self.flush()
        t = self._step
        for frag in range(self.num_fragments):
            if t == 0 or t % self.sync_every != self.send_offset(frag):
                self._send(frag, t)
        self.flush()

    # --- one fragment ------------------------------------------------------------------------

    def _send(self, frag: int, t: int) -> None:
        params = self.fragments[frag]
        with torch.no_grad():
            delta = torch.cat([(g - p.detach().float()).reshape(-1) for g, (_, p) in zip(self._global[frag], params)])
        err = owner = None
        if self.error_feedback and self.fmt is not None and delta.numel() >= self.min_numel:
            if self._errors[frag] is None:
                self._errors[frag] = torch.zeros_like(delta)
            err = self._errors[frag]
            if self.owner_error_feedback:
                if self._owner_errors[frag] is None:
                    self._owner_errors[frag] = torch.zeros(self._owner_numel(delta.numel()), dtype=torch.float32)
                owner = self._owner_errors[frag]
        asynchronous = self.overlap_steps > 0
        work = quantized_all_reduce(delta, "avg", self._comm_group, self.fmt, self.block_size, err,
                                    async_op=asynchronous, min_numel=self.min_numel, stats=self.stats,
                                    owner_error_feedback=owner, pipeline_numel=self.pipeline_numel)
        flight = _InFlight(t + self.overlap_steps, delta, work)
        if asynchronous:
            self._in_flight[frag] = flight
        else:
            self._merge(frag, flight.result())

    def _owner_numel(self, numel: int) -> int:
        return owner_chunk_numel(numel, dist.get_world_size(self._comm_group), self.block_size)

    def _merge(self, frag: int, delta: torch.Tensor) -> None:
        globals_ = self._global[frag]
        offset = 0
        for g in globals_:
            g.grad = delta[offset:offset + g.numel()].view_as(g)
            offset += g.numel()
        self._outer.step()  # parameters without .grad (other fragments) are skipped
        a = self.fragment_alpha
        with torch.no_grad():
            for g, (_, p) in zip(globals_, self.fragments[frag]):
                g.grad = None
                merged = g if a == 0.0 else p.detach().float().mul(a).add_(g, alpha=1.0 - a)
                p.copy_(merged)

    # --- checkpoint --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to continue identically: step, θ_global, outer momentum, residuals
        (``errors``: the worker's, per fragment; ``owner_errors``: of the chunk it owns),
        in-flight syncs, and this worker's own (local) values of the synchronized parameters.

        In-flight exchanges are waited for (a collective: call on every worker) and their
        averaged Δ is saved with the step at which it is applied. ``local_params`` are the
        parameter tensors themselves, not copies (like ``Module.state_dict()``): save this
        state right away, e.g. in one ``torch.save`` with the model's state dict (which
        then stores them once). Save the model's and the inner optimizer's state dicts
        alongside (buffers, frozen parameters and the inner optimizer are not in here).
        """
        pending = {frag: {"merge_step": f.merge_step, "delta": f.result().clone()}
                   for frag, f in self._in_flight.items()}
        return {
            "step": self._step,
            "config": {"sync_every": self.sync_every, "num_fragments": self.num_fragments,
                       "overlap_steps": self.overlap_steps, "fmt": self.fmt, "block_size": self.block_size},
            "param_names": list(self._names),
            "global_params": [[g.clone() for g in frag] for frag in self._global],
            "outer_optimizer": self._outer.state_dict(),
            "errors": [None if e is None else e.clone() for e in self._errors],
            "owner_errors": [None if e is None else e.clone() for e in self._owner_errors],
            "in_flight": pending,
            "local_params": [[p.detach() for _, p in frag] for frag in self.fragments],
            "stats": self.stats.as_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s state, including this worker's parameter values
        (``local_params``), which a broadcast at construction may have replaced. Not a
        collective; every worker loads the state dict it saved."""
        for key in ("step", "config", "param_names", "global_params", "outer_optimizer", "errors", "in_flight"):
            if key not in state:
                raise KeyError(f"state dict lacks {key!r}: not from DiLoCo.state_dict()")
        mine = {"sync_every": self.sync_every, "num_fragments": self.num_fragments,
                "overlap_steps": self.overlap_steps, "fmt": self.fmt, "block_size": self.block_size}
        if state["config"] != mine:
            raise ValueError(f"state dict was saved with {state['config']}, this DiLoCo has {mine}")
        if list(state["param_names"]) != self._names:
            raise ValueError("state dict was saved for a model with different parameter names")
        for frag, saved in zip(self._global, state["global_params"]):
            if len(frag) != len(saved) or any(g.shape != s.shape for g, s in zip(frag, saved)):
                raise ValueError("state dict global_params do not match the model's parameter shapes")
        local = state.get("local_params")  # absent in state dicts of older versions
        if local is not None:
            for frag, saved in zip(self.fragments, local):
                if len(frag) != len(saved) or any(p.shape != s.shape or p.dtype != s.dtype
                                                  for (_, p), s in zip(frag, saved)):
                    raise ValueError("state dict local_params do not match the model's parameters")
        for g, s in zip((g for f in self._global for g in f), (s for f in state["global_params"] for s in f)):
            g.copy_(s)
        self._outer.load_state_dict(state["outer_optimizer"])
        owner_errors = state.get("owner_errors")  # absent in state dicts of older versions
        if owner_errors is None:
            owner_errors = [None] * self.num_fragments
        if len(owner_errors) != self.num_fragments:
            raise ValueError(f"state dict owner_errors has {len(owner_errors)} entries, not one per fragment "
                             f"({self.num_fragments})")
        for frag, o in enumerate(owner_errors):
            if o is None:
                continue
            numel = sum(p.numel() for _, p in self.fragments[frag])
            want = self._owner_numel(numel)
            if not isinstance(o, torch.Tensor) or o.dtype != torch.float32 or o.numel() != want:
                raise ValueError(
                    f"state dict owner_errors[{frag}] must be a float32 tensor of {want} elements (this worker's "
                    f"chunk of fragment {frag} at this world size), got "
                    f"{getattr(o, 'dtype', type(o).__name__)} with {getattr(o, 'numel', lambda: '?')()} elements"
                )
        self._errors = [None if e is None else e.detach().clone() for e in state["errors"]]
        self._owner_errors = [None if o is None else o.detach().clone().reshape(-1) for o in owner_errors]
        self._in_flight = {int(frag): _InFlight(int(f["merge_step"]), f["delta"].detach().clone())
                           for frag, f in state["in_flight"].items()}
        self._step = int(state["step"])
        if local is not None:
            with torch.no_grad():
                for (_, p), s in zip((x for f in self.fragments for x in f), (s for f in local for s in f)):
                    p.copy_(s)
