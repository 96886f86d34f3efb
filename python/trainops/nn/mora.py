"""MoRA modules: ``MoRALinear`` (a frozen Linear plus a bank of rank-1 experts),
``apply_mora`` (PEFT-style replacement), adapter-only save and load.

MoRA ("Little By Little", arXiv 2506.21035) treats each rank-1 pair (A_i, B_i) of a LoRA
adapter as an expert routed by its own key: s = p/‖p‖ with p = x̃ Aᵀ, top-k, softmax
at temperature τ, pruning below δ at eval. For continual learning each task appends new
ranks and freezes all earlier ones; routing runs over all of them.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
from torch import nn

from trainops._validation import CheckedFloat, check_int
from trainops.nn._state import refuse
from trainops.ops.mora import mora_routing

__all__ = ["MoRALinear", "apply_mora", "mora_state_dict", "load_mora_state_dict", "mora_modules"]

_ADAPTER_KEYS = ("frozen_A", "frozen_B", "lora_A", "lora_B", "task_ranks")


class MoRALinear(nn.Module):
    """``y = base(x) + ((p ⊙ w) Bᵀ) · scaling``: a frozen ``nn.Linear`` with MoRA rank-1 experts.

    Args:
        base: the ``nn.Linear`` to adapt; its parameters are frozen.
        rank: ranks added per task (also the first task's).
        top_k: experts kept per token, k = max(top_k, 2).
        temperature: softmax temperature τ of the gate.
        threshold: eval-time pruning δ: ranks with s < δ get weight 0 (not renormalized).
        dropout: dropout on the adapter input x̃ (training only; the base sees x).
        scaling: multiplier of the adapter delta.
        capacity: initial size of the frozen-rank bank (default 4·rank); it doubles when full.

    Ranks: the current task's ``lora_A`` [rank, in] and ``lora_B`` [out, rank] are the only
    trainable parameters. Earlier tasks' ranks live in preallocated buffers ``frozen_A``
    [capacity, in] and ``frozen_B`` [capacity, out] (B stored transposed so a prefix of
    rows is the active bank) with ``num_frozen`` rows in use: no concatenation per forward.
    :meth:`add_task` copies the current ranks into the bank and starts new ones (LoRA
    init: A Kaiming-uniform, B zero). The new values start at zero, but the new keys join
    the routing (norm and top-k run over all ranks), so the output may move through the
    gate. Re-create the optimizer afterwards: the parameters are new objects.

    Merging is impossible: the gate w depends on the input x (through the top-k and the
    softmax of s), so ((p ⊙ w) Bᵀ) is not x ΔWᵀ for any fixed ΔW; the adapter always runs
    next to the base layer.

    ``state_dict`` holds only the active ranks (``frozen_A[:num_frozen]``), so it does not
    depend on the capacity, and loading it resizes the module to the saved task layout.
    Statistics: :meth:`enable_stats` counts, per input label, how often each task's ranks
    are selected (and, at eval, not pruned); see :meth:`activation_stats`.
    """

    # checked on every assignment, also after construction
    temperature = CheckedFloat(lo=0.0, lo_open=True)
    threshold, scaling = CheckedFloat(), CheckedFloat()
    dropout = CheckedFloat(lo=0.0, hi=1.0, hi_open=True)

    def __init__(self, base: nn.Linear, rank: int = 8, top_k: int = 8, temperature: float = 0.03,
                 threshold: float = 0.2, dropout: float = 0.0, scaling: float = 1.0, capacity: int | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        args = self.check_args(rank, top_k, temperature, threshold, dropout, scaling, capacity)
        self.base = base
        for prm in base.parameters():
            prm.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.top_k = args["rank"], args["top_k"]
        self.temperature, self.threshold = args["temperature"], args["threshold"]
        self.dropout, self.scaling = args["dropout"], args["scaling"]
        self.check_nan = False
        w = base.weight
        capacity = 4 * rank if capacity is None else capacity
        self.register_buffer("frozen_A", torch.zeros(capacity, self.in_features, device=w.device, dtype=w.dtype))
        self.register_buffer("frozen_B", torch.zeros(capacity, self.out_features, device=w.device, dtype=w.dtype))
        self.num_frozen = 0
        self.task_ranks: list[int] = [rank]
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        self._init_ranks()
        self._stats: dict | None = None
        self._stats_label = 0

    @staticmethod
    def check_args(rank: int = 8, top_k: int = 8, temperature: float = 0.03, threshold: float = 0.2,
                   dropout: float = 0.0, scaling: float = 1.0, capacity: int | None = None) -> dict:
        """The constructor's arguments (after ``base``), checked: TypeError/ValueError naming
        the argument; returns them as ints and floats."""
        cls = MoRALinear
        out = {"rank": check_int("rank", rank, lo=1), "top_k": check_int("top_k", top_k, lo=1),
               "temperature": cls.temperature.check(temperature), "threshold": cls.threshold.check(threshold),
               "dropout": cls.dropout.check(dropout), "scaling": cls.scaling.check(scaling)}
        out["capacity"] = None if capacity is None else check_int("capacity", capacity, lo=1)
        return out

    @classmethod
    def from_linear(cls, base: nn.Linear, **kwargs) -> "MoRALinear":
        """Wrap ``base`` (frozen) with MoRA; keyword arguments as the constructor."""
        return cls(base, **kwargs)

    def _init_ranks(self) -> None:
        # LoRA init: A like nn.Linear's weight, B zero, so a new task starts from delta = 0.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    # --- ranks ---------------------------------------------------------------------------

    @property
    def num_ranks(self) -> int:
        return self.num_frozen + self.lora_A.shape[0]

    @property
    def capacity(self) -> int:
        return self.frozen_A.shape[0]

    @property
    def num_tasks(self) -> int:
        return len(self.task_ranks)

    def _reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        cap = max(needed, 2 * self.capacity)
        for name in ("frozen_A", "frozen_B"):
            old = getattr(self, name)
            new = old.new_zeros(cap, old.shape[1])
            new[: self.num_frozen] = old[: self.num_frozen]
            setattr(self, name, new)

    @torch.no_grad()
    def add_task(self, rank: int | None = None) -> "MoRALinear":
        """Freeze every existing rank and append ``rank`` (default ``self.rank``) new trainable ones."""
        rank = self.rank if rank is None else check_int("rank", rank, lo=1)
        cur = self.lora_A.shape[0]
        self._reserve(self.num_frozen + cur)
        self.frozen_A[self.num_frozen: self.num_frozen + cur] = self.lora_A
        self.frozen_B[self.num_frozen: self.num_frozen + cur] = self.lora_B.t()
        self.num_frozen += cur
        w = self.lora_A
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        self._init_ranks()
        self.task_ranks.append(rank)
        return self

    def task_slices(self) -> list[slice]:
        """Rank range of each task in routing order (frozen tasks first, then the current one)."""
        out, start = [], 0
        for r in self.task_ranks:
            out.append(slice(start, start + r))
            start += r
        return out

    # --- forward -------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        F = self.num_frozen
        delta, p, idx, rho = mora_routing(
            x, self.lora_A, self.lora_B, top_k=self.top_k, temperature=self.temperature,
            threshold=self.threshold, training=self.training, scaling=self.scaling,
            dropout_p=self.dropout if self.training else 0.0,
            frozen_A=self.frozen_A[:F] if F else None, frozen_B=self.frozen_B[:F].t() if F else None,
            check_nan=self.check_nan)
        if self._stats is not None:
            self._record(p.detach(), idx, rho.detach())
        return self.base(x) + delta.to(x.dtype)

    # --- statistics ----------------------------------------------------------------------

    def enable_stats(self, enabled: bool = True) -> None:
        """Start (or stop) counting rank activations; counts are kept until :meth:`reset_stats`."""
        self._stats = ({} if self._stats is None else self._stats) if enabled else None

    def reset_stats(self) -> None:
        if self._stats is not None:
            self._stats = {}

    def set_stats_label(self, label) -> None:
        """Label of the inputs that follow (e.g. the data's task id): counts are kept per label."""
        self._stats_label = label

    @torch.no_grad()
    def _record(self, p, idx, rho) -> None:
        fired = idx
        if not self.training:
            s = p.gather(1, idx) * rho[:, None]
            fired = torch.where(s >= self.threshold, idx, torch.full_like(idx, self.num_ranks))
        counts = torch.bincount(fired.reshape(-1), minlength=self.num_ranks + 1)[: self.num_ranks]
        entry = self._stats.setdefault(self._stats_label, {"tokens": 0, "rank_counts": torch.zeros_like(counts)})
        if entry["rank_counts"].numel() != counts.numel():  # ranks were added since
            grown = torch.zeros_like(counts)
            grown[: entry["rank_counts"].numel()] = entry["rank_counts"]
            entry["rank_counts"] = grown
        entry["rank_counts"] += counts
        entry["tokens"] += idx.shape[0]

    def activation_stats(self) -> dict:
        """Per input label: tokens seen, activation counts per rank, and per adapter task the
        fraction of all activations that went to that task's ranks (``task_frequency``)."""
        out = {}
        for label, entry in (self._stats or {}).items():
            counts = entry["rank_counts"].cpu()
            if counts.numel() < self.num_ranks:  # recorded before later tasks were added
                counts = torch.cat([counts, counts.new_zeros(self.num_ranks - counts.numel())])
            per_task = torch.stack([counts[sl].sum() for sl in self.task_slices()])
            total = per_task.sum().clamp_min(1)
            out[label] = {"tokens": entry["tokens"], "rank_counts": counts,
                          "task_frequency": (per_task.double() / total).tolist()}
        return out

    # --- state dict: only the active bank, resized on load -------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        F = self.num_frozen
        destination[prefix + "frozen_A"] = self.frozen_A[:F] if keep_vars else self.frozen_A[:F].detach().clone()
        destination[prefix + "frozen_B"] = self.frozen_B[:F] if keep_vars else self.frozen_B[:F].detach().clone()
        destination[prefix + "task_ranks"] = torch.tensor(self.task_ranks, dtype=torch.int64)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        sub = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        try:
            plan = self._check_adapter_state(sub, prefix)
        except ValueError as e:  # nothing of this layer (base included) is loaded; torch raises
            refuse(state_dict, prefix, error_msgs, [str(e)])
            return
        self._apply_adapter_state(*plan)
        handled = set(_ADAPTER_KEYS)
        rest = {k: v for k, v in state_dict.items() if k[len(prefix):] not in handled}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        missing_keys[:] = [k for k in missing_keys if k[len(prefix):] not in handled]
        missing_keys.extend(prefix + k for k in ("lora_A", "lora_B") if k not in sub)

    def _check_adapter_state(self, sub: dict, where: str = "") -> tuple[list[int], dict]:
        """(task layout, adapter tensors) that loading ``sub`` (this layer's entries, keys
        without prefix) would apply; ValueError naming the entry when one does not fit. Changes
        nothing: check every layer, then :meth:`_apply_adapter_state` each."""
        ranks = list(self.task_ranks)
        if "task_ranks" in sub:
            t = sub["task_ranks"]
            if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() == 0 or t.is_floating_point() \
                    or t.is_complex() or t.dtype == torch.bool:
                raise ValueError(f"{where}task_ranks must be a non-empty 1-D integer tensor")
            ranks = [int(r) for r in t.tolist()]
            if min(ranks) < 1:
                raise ValueError(f"{where}task_ranks must be positive, got {ranks}")
            absent = [k for k in ("frozen_A", "frozen_B", "lora_A", "lora_B") if k not in sub]
            if absent:
                raise ValueError(f"{where}task_ranks comes without {absent}: the layer cannot be resized")
        F, cur = sum(ranks[:-1]), ranks[-1]
        shapes = {"frozen_A": (F, self.in_features), "frozen_B": (F, self.out_features),
                  "lora_A": (cur, self.in_features), "lora_B": (self.out_features, cur)}
        shapes.update({f"base.{k}": tuple(v.shape) for k, v in self.base.state_dict().items()})
        tensors = {}
        for k, shape in shapes.items():
            if k not in sub:
                continue
            v = sub[k]
            if not isinstance(v, torch.Tensor) or not v.is_floating_point() or tuple(v.shape) != shape \
                    or v.device.type == "meta":
                got = f"{v.dtype} {tuple(v.shape)} on {v.device}" if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"{where}{k} must be a floating-point tensor of shape {shape} with data "
                                 f"(task_ranks {ranks}), got {got}")
            if not k.startswith("base."):
                tensors[k] = v
        return ranks, tensors

    @torch.no_grad()
    def _apply_adapter_state(self, ranks: list[int], tensors: dict) -> None:
        """Apply what :meth:`_check_adapter_state` returned (cannot fail on a checked state)."""
        self._resize_to(ranks)
        F = self.num_frozen
        for k, v in tensors.items():
            dst = getattr(self, k)
            (dst[:F] if k.startswith("frozen_") else dst).copy_(v)

    @torch.no_grad()
    def _resize_to(self, task_ranks: list[int]) -> None:
        F = sum(task_ranks[:-1])
        self._reserve(F)
        self.num_frozen = F
        self.task_ranks = list(task_ranks)
        cur = task_ranks[-1]
        if self.lora_A.shape[0] != cur:
            w = self.lora_A
            self.lora_A = nn.Parameter(w.new_zeros(cur, self.in_features))
            self.lora_B = nn.Parameter(w.new_zeros(self.out_features, cur))

    def adapter_state_dict(self) -> dict:
        """The adapter's tensors only (no base weights)."""
        sd = self.state_dict()
        return {k: v for k, v in sd.items() if k in _ADAPTER_KEYS}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"tasks={self.num_tasks}, ranks={self.num_ranks} ({self.num_frozen} frozen), "
                f"capacity={self.capacity}, top_k={self.top_k}, temperature={self.temperature}, "
                f"threshold={self.threshold}, dropout={self.dropout}, scaling={self.scaling}")


# --- model-level helpers ------------------------------------------------------------------

def _matcher(target_modules):
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        return lambda name: pattern.fullmatch(name) is not None
    if isinstance(target_modules, (list, tuple, set)) and target_modules and all(
            isinstance(t, str) for t in target_modules):
        names = set(target_modules)
        return lambda name: name in names or name.rsplit(".", 1)[-1] in names
    raise TypeError("target_modules must be a regex string or a non-empty list of module names, "
                    f"got {target_modules!r}")


def apply_mora(model: nn.Module, target_modules, **kwargs) -> nn.Module:
    """Replace matching ``nn.Linear`` layers of ``model`` by ``MoRALinear`` and freeze the rest.

    ``target_modules``: a regex string (full match on the qualified module name, as PEFT) or
    a list of names, each matching a qualified name exactly or its last component (e.g.
    ``["q_proj", "v_proj"]``). Other keyword arguments go to :class:`MoRALinear`. Every
    non-adapter parameter gets ``requires_grad=False``. Returns ``model`` (changed in place).
    """
    match = _matcher(target_modules)
    MoRALinear.check_args(**kwargs)  # before the model is touched: a bad argument changes nothing
    targets = [(name, mod) for name, mod in model.named_modules()
               if name and isinstance(mod, nn.Linear) and match(name)]
    if not targets:
        raise ValueError(f"target_modules {target_modules!r} matched no nn.Linear in the model")
    for prm in model.parameters():
        prm.requires_grad_(False)
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, MoRALinear(mod, **kwargs).train(mod.training))  # keep the model's mode
    return model


def mora_modules(model: nn.Module):
    """(qualified name, MoRALinear) pairs of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoRALinear)]


def add_task(model: nn.Module, rank: int | None = None) -> nn.Module:
    """``add_task`` on every ``MoRALinear`` of ``model``."""
    for _, m in mora_modules(model):
        m.add_task(rank)
    return model


def mora_state_dict(model: nn.Module) -> dict:
    """Only the MoRA adapters' tensors of ``model`` (qualified keys), for saving."""
    out = {}
    for name, m in mora_modules(model):
        for k, v in m.adapter_state_dict().items():
            out[f"{name}.{k}"] = v
    return out


def load_mora_state_dict(model: nn.Module, state_dict: dict, strict: bool = True) -> nn.Module:
    """Load adapters saved by :func:`mora_state_dict` (resizing each layer to its saved tasks).

    Every layer's entries are checked (task layout, shapes, floating dtypes; with ``strict``
    also missing and unknown keys, including any ``base.*`` weights) before any layer is
    changed: a load that fails leaves the whole model as it was. Non-strict loads skip layers
    without entries and ignore unknown keys.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    plans, seen = [], set()
    for name, m in mora_modules(model):
        sub = {k[len(name) + 1:]: v for k, v in state_dict.items() if k.startswith(name + ".")}
        if not sub:
            if strict:
                raise KeyError(f"no adapter tensors for MoRA layer {name!r} in state_dict")
            continue
        seen.update(f"{name}.{k}" for k in sub)
        missing = [k for k in _ADAPTER_KEYS if k not in sub]
        unexpected = sorted(set(sub) - set(_ADAPTER_KEYS))
        if strict and (missing or unexpected):
            raise KeyError(f"MoRA layer {name!r}: missing {missing}, unexpected {unexpected}")
        adapter = {k: v for k, v in sub.items() if k in _ADAPTER_KEYS}
        plans.append((m, m._check_adapter_state(adapter, f"{name}.")))
    extra = set(state_dict) - seen
    if strict and extra:
        raise KeyError(f"state_dict keys with no MoRA layer: {sorted(extra)[:5]}")
    for m, plan in plans:
        m._apply_adapter_state(*plan)
    return model


def mora_activation_stats(model: nn.Module) -> dict:
    """``activation_stats()`` of every MoRA layer, by qualified name."""
    return {n: m.activation_stats() for n, m in mora_modules(model)}


def set_mora_stats(model: nn.Module, enabled: bool = True, label=None) -> None:
    """Enable/disable statistics on every MoRA layer and set the label of the coming inputs."""
    for _, m in mora_modules(model):
        m.enable_stats(enabled)
        if label is not None:
            m.set_stats_label(label)


__all__ += ["add_task", "mora_activation_stats", "set_mora_stats"]
