"""A TorchRL sampler backed by the fused replay kernels: :class:`FusedPrioritizedSampler`.

Drop-in for ``torchrl.data.PrioritizedSampler`` (TorchRL 0.14) in a stock TorchRL buffer::

    rb = torchrl.data.ReplayBuffer(storage=LazyTensorStorage(N),
                                   sampler=FusedPrioritizedSampler(N, alpha=0.6, beta=0.4))

It is a ``PrioritizedSampler`` subclass (TorchRL's buffers check for that class to route
priorities), but keeps its state in flat tensors updated by ``trainops.ops.replay_*`` instead
of TorchRL's compiled segment trees, so it needs neither.

TorchRL's conventions, kept: the stored sampling weight of slot i is w_i = (p_i + eps)^alpha,
P(i) = w_i / sum_{j < len(storage)} w_j, the importance weight is
(N P(i))^-beta / max_j (N P(j))^-beta = (w_i / min_j w_j)^-beta, and new items get the largest
priority given so far (1.0 before any), raw (the transform is applied once).

Differences, all documented behaviour of the fused op (:func:`trainops.ops.replay_sample`):
  * a batch of B draws is stratified (draw j falls in the j-th 1/B of the probability mass,
    as in Schaul et al. 2016): each draw's slot still has probability P(i) overall and the
    batch's counts the same expectation, with less variance; indices come in slot order.
  * random numbers are Philox4x32-10 counters (``seed``, a per-call counter), or seeded from
    the buffer's generator when it has one (``ReplayBuffer(generator=...)``); states resume
    the same stream.
  * all weights zero: uniform over the stored items (TorchRL raises); priorities that are NaN,
    infinite, negative, or whose weight overflows float32 raise ValueError.
  * storages of one dimension only (``LazyTensorStorage(N)``, not ``ndim=2``), float32 weights,
    and ``max_priority_within_buffer=False``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torchrl.data.replay_buffers.samplers import PrioritizedSampler

from trainops._validation import check_finite_float, raise_for_invalid_priorities
from trainops import _extension
from trainops.ops import replay as rops
from trainops.replay._host import host_range

__all__ = ["FusedPrioritizedSampler"]

_FORMAT = "trainops.replay.torchrl/1"
_FILE = "sampler.safetensors"
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


class FusedPrioritizedSampler(PrioritizedSampler):
    """Prioritized sampler of a TorchRL replay buffer, sampled by the fused trainops op.

    Args: as ``PrioritizedSampler``: ``max_capacity``, ``alpha``, ``beta``, ``eps`` (added to
    priorities before ^alpha, default 1e-8), ``dtype`` (float32 only), ``reduction`` (how
    TorchRL's buffers reduce a multi-element priority), ``max_priority_within_buffer`` (False
    only), ``device`` (default: the CPU, or the storage's CUDA device on first use); and
    ``seed`` (default: drawn from torch's global generator).
    """

    def __init__(self, max_capacity: int, alpha: float, beta: float, eps: float = 1e-8, dtype=torch.float,
                 reduction: str = "max", max_priority_within_buffer: bool = False, device=None, *,
                 seed: int | None = None) -> None:
        if isinstance(max_capacity, bool) or not isinstance(max_capacity, int) or not 0 < max_capacity < 2**31:
            raise ValueError(f"max_capacity must be an int in [1, 2^31), got {max_capacity!r}")
        self._alpha = check_finite_float("alpha", alpha, lo=0.0)
        self._beta = check_finite_float("beta", beta, lo=0.0)
        self._eps = check_finite_float("eps", eps, lo=0.0)
        if dtype not in (torch.float, torch.float32):
            raise ValueError(f"dtype must be torch.float32 (the fused op keeps float32 weights), got {dtype}")
        if max_priority_within_buffer:
            raise ValueError("max_priority_within_buffer=True is not supported: new items get the largest "
                             "priority given since construction")
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self._max_capacity = max_capacity
        self.dtype = torch.float32
        self.reduction = reduction
        self._max_priority_within_buffer = False
        self._device = None if device is None else torch.device(device)
        self._seed, self._offset = seed, 0
        _extension.require("replay_update_priorities")  # update_priority calls the registered op directly
        self._allocate(self._device or torch.device("cpu"))

    def _allocate(self, device: torch.device) -> None:
        cap = self._max_capacity
        # ``_shifted`` holds p + eps, the value the op raises to alpha (with its own eps = 0)
        self._shifted = torch.zeros(cap, dtype=torch.float32, device=device)
        self._weights = torch.zeros(cap, dtype=torch.float32, device=device)
        self._block_stats = torch.zeros(2, rops.num_blocks(cap), dtype=torch.float64, device=device)
        self._block_stats[1].fill_(float("inf"))
        self._winner = torch.full((cap,), -1, dtype=torch.int32, device=device)
        self._generations = torch.zeros(cap, dtype=torch.int64, device=device)  # no staleness checks here
        self._rows = torch.zeros(cap, 1, dtype=torch.uint8, device=device)  # the op gathers rows; TorchRL does
        self._max_p = torch.full((1,), float("-inf"), dtype=torch.float32, device=device)  # -inf: none yet
        self._max_value = float("-inf")  # its value on the host

    # ------------------------------------------------------------------ TorchRL's Sampler API
    def __repr__(self) -> str:
        return f"{type(self).__name__}(alpha={self._alpha}, beta={self._beta}, eps={self._eps}, seed={self._seed})"

    @property
    def device(self) -> torch.device:
        return self._weights.device

    @property
    def alpha(self):
        return self._alpha

    @alpha.setter
    def alpha(self, value):  # the weights follow at once (p + eps is kept per slot)
        value = check_finite_float("alpha", value, lo=0.0)
        if value != self._alpha:
            self._alpha = value
            self._reweigh(self._shifted.clone(), self._weights > 0)

    @property
    def beta(self):
        return self._beta

    @beta.setter
    def beta(self, value):  # annealed by assignment (or TorchRL's ParameterScheduler)
        self._beta = check_finite_float("beta", value, lo=0.0)

    def _maybe_init_from_storage(self, storage) -> None:
        """Follow a CUDA storage (as TorchRL's sampler does), keeping the priorities."""
        if self._device is not None or storage is None:
            return
        dev = getattr(storage, "device", None)
        if dev is None or dev == "auto":
            return
        dev = torch.device(dev)
        if dev.type == "cuda" and dev != self.device:
            _extension.require_cuda("replay_update_priorities")
            for name in ("_shifted", "_weights", "_block_stats", "_winner", "_generations", "_rows", "_max_p"):
                setattr(self, name, getattr(self, name).to(dev))
            self._device = dev

    def _empty(self) -> None:
        self._allocate(self.device)  # the random stream goes on: a cleared buffer does not replay it

    @property
    def default_priority(self) -> torch.Tensor:
        """The largest raw priority given so far (1.0 before any), as a 0-d tensor."""
        return torch.where(self._max_p > float("-inf"), self._max_p, torch.ones_like(self._max_p))[0]

    def _check_storage(self, storage) -> int:
        if storage is None:
            return self._max_capacity
        if getattr(storage, "ndim", 1) > 1:
            raise ValueError("FusedPrioritizedSampler supports one-dimensional storages only (got ndim > 1)")
        return min(len(storage), self._max_capacity)

    def sample(self, storage, batch_size: int):
        """(slot indices int64 [batch_size], {"priority_weight": float32 [batch_size]})."""
        self._maybe_init_from_storage(storage)
        n = self._check_storage(storage)
        if n == 0:
            raise RuntimeError("Cannot sample from an empty storage.")
        if self._rng is not None:  # the buffer's generator decides the stream
            seed, offset = int(torch.randint(0, 2**62, (), generator=self._rng, device=self._rng.device)), 0
        else:
            seed, offset = self._seed, self._offset
            self._offset += 1
        # The launcher without the wrapper's Python checks (the op checks every size, index and
        # device itself): every tensor is the sampler's own, shaped and typed at construction,
        # and at small batches the wrapper's checks cost as much as the draws.
        batch_size = int(batch_size)
        if batch_size < 0:
            raise ValueError(f"batch_size must be >= 0, got {batch_size}")
        _, index, isw, _ = rops.launch_sample([self._rows], batch_size, n, None, None, [False], "weights",
                                              self._weights, self._block_stats, None, None, 0, float(self._beta),
                                              False, True, seed, offset)
        return index, {"priority_weight": isw}

    @torch.no_grad()
    def update_priority(self, index, priority, *, storage=None) -> None:
        """Set the priorities of slots: w = (priority + eps)^alpha. Negative indices (TorchRL's
        "do not update") and slots not yet in ``storage`` (when given) are skipped; ``priority``
        is one number or one per index."""
        self._maybe_init_from_storage(storage)
        bound = self._check_storage(storage)
        dev = self.device
        index = torch.as_tensor(index, device=dev)
        if index.is_floating_point() or index.dtype == torch.bool or index.dim() > 1:
            raise ValueError(f"index must be an int or a 1-d integer tensor (one-dimensional storages), got "
                             f"{index.dtype} of shape {tuple(index.shape)}")
        index = index.reshape(-1).long()
        n = index.numel()
        priority = torch.as_tensor(priority, device=dev).detach()
        if priority.numel() == 1:
            priority = priority.reshape(1).expand(n)
        elif priority.numel() != n:
            raise ValueError(f"priority must be one number or one per index ({n}), got {priority.numel()}")
        if n == 0:
            return
        priority = priority.reshape(n).float()
        (imin, imax), (pmin, pmax) = host_range(index), host_range(priority)
        if imax >= self._max_capacity:
            raise ValueError(f"index must be < max_capacity={self._max_capacity}, got {int(imax)}")
        self._check_values(priority, pmin, pmax)
        if imin < -1:
            index = index.clamp_min(-1)  # any negative index: skipped
        shifted = priority + self._eps if self._eps else priority
        # The raw op: every tensor here is the sampler's own, shaped and typed at construction.
        torch.ops.trainops.replay_update_priorities(self._shifted, self._weights, self._block_stats, self._winner,
                                                   self._generations, index, shifted.contiguous(), None,
                                                   float(self._alpha), 0.0, int(bound))
        top = pmax if imin >= 0 and imax < bound else float(
            torch.where((index >= 0) & (index < bound), priority, float("-inf")).max())
        if top > self._max_value:
            self._max_value = top
            self._max_p.fill_(top)

    def _check_values(self, priority: torch.Tensor, pmin: float, pmax: float) -> None:
        if pmin >= 0 and math.isfinite(pmax) and (pmax + self._eps) ** self._alpha < _FLOAT32_MAX:
            return
        raise_for_invalid_priorities(priority, "priority")
        raise ValueError(f"priority too large: (p + eps)^alpha (alpha={self._alpha}) overflows float32")

    def mark_update(self, index, *, storage=None) -> None:
        """New items (called by TorchRL's writers): the default priority."""
        self.update_priority(index, self.default_priority, storage=storage)

    def _reweigh(self, shifted: torch.Tensor, written: torch.Tensor) -> None:
        """Rebuild weights and block sums of the ``written`` slots from ``shifted`` (p + eps)."""
        shifted_now = torch.zeros_like(self._shifted)
        weights = torch.zeros_like(self._weights)
        block_stats = torch.zeros_like(self._block_stats)
        block_stats[1].fill_(float("inf"))
        slots = torch.nonzero((shifted > 0) | written).reshape(-1)
        if slots.numel():
            rops.replay_update_priorities(shifted_now, weights, block_stats, self._winner, self._generations, slots,
                                          shifted[slots], None, alpha=self._alpha, eps=0.0,
                                          size=self._max_capacity, validate=False)
        self._shifted, self._weights, self._block_stats = shifted_now, weights, block_stats

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Tensors and plain numbers only: p + eps and the weights per slot, the largest priority,
        alpha, beta, eps, seed and the call counter."""
        return {"_format": _FORMAT, "_max_capacity": self._max_capacity, "_alpha": self._alpha, "_beta": self._beta,
                "_eps": self._eps, "_seed": self._seed, "_offset": self._offset,
                "_shifted": self._shifted.clone(), "_weights": self._weights.clone(), "_max_p": self._max_p.clone()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict`; everything is checked before anything changes."""
        sd = state_dict
        if not isinstance(sd, dict) or sd.get("_format") != _FORMAT:
            raise ValueError(f"not a FusedPrioritizedSampler state (format {_FORMAT!r})")
        if sd.get("_max_capacity") != self._max_capacity:
            raise ValueError(f"the state is for max_capacity={sd.get('_max_capacity')!r}, this sampler has "
                             f"{self._max_capacity}")
        alpha = check_finite_float("_alpha", sd.get("_alpha"), lo=0.0)
        beta = check_finite_float("_beta", sd.get("_beta"), lo=0.0)
        eps = check_finite_float("_eps", sd.get("_eps"), lo=0.0)
        for name in ("_seed", "_offset"):
            v = sd.get(name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63:
                raise ValueError(f"state entry {name!r} must be an int in [0, 2^63), got {v!r}")
        cap = self._max_capacity
        for name, shape in (("_shifted", (cap,)), ("_weights", (cap,)), ("_max_p", (1,))):
            t = sd.get(name)
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or tuple(t.shape) != shape:
                raise ValueError(f"state entry {name!r} must be a float32 tensor of shape {shape}")
        shifted, weights, max_p = (sd[k].detach().to(self.device) for k in ("_shifted", "_weights", "_max_p"))
        finite = ((shifted >= 0) & (shifted < float("inf"))).all() & ((weights >= 0) & (weights < float("inf"))).all()
        if not bool(finite):
            raise ValueError("state entries '_shifted' and '_weights' must be finite and >= 0")
        if not bool((max_p < float("inf")).all()) or bool(torch.isnan(max_p).any()):
            raise ValueError("state entry '_max_p' must be finite or -inf")
        old = (self._alpha, self._shifted, self._weights, self._block_stats)
        self._alpha = alpha
        self._reweigh(shifted, weights > 0)
        if not torch.equal(self._weights, weights):
            self._alpha, self._shifted, self._weights, self._block_stats = old
            raise ValueError("state entry '_weights' is not (p + eps)^alpha of '_shifted'")
        self._beta, self._eps, self._seed, self._offset = beta, eps, sd["_seed"], sd["_offset"]
        self._max_p = max_p.clone()
        self._max_value = float(max_p[0])

    def dumps(self, path) -> None:
        """Write the state to ``path/sampler.safetensors`` (``path``: a directory, as TorchRL's
        ``ReplayBuffer.dumps`` passes it)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sd = self.state_dict()
        tensors = {k: sd.pop(k).cpu().contiguous() for k in ("_shifted", "_weights", "_max_p")}
        save_file(tensors, str(path / _FILE), metadata={"trainops.replay.torchrl": json.dumps(sd)})

    def loads(self, path) -> None:
        """Read a :meth:`dumps` directory (safetensors only; checked before anything changes)."""
        from safetensors import SafetensorError, safe_open

        file = Path(path) / _FILE
        try:
            with safe_open(str(file), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["trainops.replay.torchrl"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as e:
            raise ValueError(f"{file} is not a readable FusedPrioritizedSampler file: {e}") from None
        if not isinstance(meta, dict):
            raise ValueError(f"{file} is not a FusedPrioritizedSampler file")
        self.load_state_dict({**meta, **tensors})
