"""MoRA modules: ``MoRALinear`` (a frozen Linear plus a bank of rank-1 experts; its adapter
part ``MoRAExperts``), ``apply_mora`` (PEFT-style replacement), adapter-only save and load
that carries the settings (``mora_state_dict``/``load_mora_state_dict``, ``save_mora``/
``load_mora`` to safetensors). MoRA as a PEFT method: ``trainops.integrations.peft``.

MoRA ("Little By Little", arXiv 2506.21035) treats each rank-1 pair (A_i, B_i) of a LoRA
adapter as an expert routed by its own key: s = p/‖p‖ with p = x̃ Aᵀ, top-k, softmax
at temperature τ, pruning below δ at eval. For continual learning each task appends new
ranks and freezes all earlier ones; routing runs over all of them.
"""
from __future__ import annotations

import json
import math
import sys
import warnings
from collections.abc import Mapping

import torch
from torch import nn

from trainops._validation import CheckedFloat, check_int
from trainops.nn._replace import module_matcher, replace_linears
from trainops.nn._state import refuse
from trainops.ops.mora import mora_routing

__all__ = ["MoRALinear", "apply_mora", "mora_state_dict", "load_mora_state_dict", "mora_modules"]

_ADAPTER_KEYS = ("frozen_A", "frozen_B", "lora_A", "lora_B", "task_ranks")
# what apply_mora takes that shapes a layer's outputs (or its next task's ranks): saved and compared
SETTINGS = ("rank", "top_k", "temperature", "threshold", "dropout", "scaling")


class MoRAExperts(nn.Module):
    """The adapter of :class:`MoRALinear` without the base layer: ``forward(x)`` returns the
    delta ``((p ⊙ w) Bᵀ) · scaling`` (in x's dtype). Arguments, ranks, tasks, statistics and
    state dict as :class:`MoRALinear`; the PEFT integration keeps one per adapter name."""

    # checked on every assignment, also after construction
    temperature = CheckedFloat(lo=0.0, lo_open=True)
    threshold, scaling = CheckedFloat(), CheckedFloat()
    dropout = CheckedFloat(lo=0.0, hi=1.0, hi_open=True)

    def __init__(self, in_features: int, out_features: int, rank: int = 8, top_k: int = 8,
                 temperature: float = 0.03, threshold: float = 0.2, dropout: float = 0.0, scaling: float = 1.0,
                 capacity: int | None = None, *, device=None, dtype=None):
        super().__init__()
        args = self.check_args(rank, top_k, temperature, threshold, dropout, scaling, capacity)
        self.in_features = check_int("in_features", in_features, lo=1)
        self.out_features = check_int("out_features", out_features, lo=1)
        self.rank, self.top_k = args["rank"], args["top_k"]
        self.temperature, self.threshold = args["temperature"], args["threshold"]
        self.dropout, self.scaling = args["dropout"], args["scaling"]
        self.check_nan = False
        capacity = 4 * rank if args["capacity"] is None else args["capacity"]
        kw = {"device": device, "dtype": dtype}
        self.register_buffer("frozen_A", torch.zeros(capacity, self.in_features, **kw))
        self.register_buffer("frozen_B", torch.zeros(capacity, self.out_features, **kw))
        self.num_frozen = 0
        self.task_ranks: list[int] = [rank]
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **kw))
        self._init_ranks()
        self._stats: dict | None = None
        self._stats_label = 0

    @staticmethod
    def check_args(rank: int = 8, top_k: int = 8, temperature: float = 0.03, threshold: float = 0.2,
                   dropout: float = 0.0, scaling: float = 1.0, capacity: int | None = None) -> dict:
        """The constructor's adapter arguments, checked: TypeError/ValueError naming the
        argument; returns them as ints and floats."""
        cls = MoRAExperts
        out = {"rank": check_int("rank", rank, lo=1), "top_k": check_int("top_k", top_k, lo=1),
               "temperature": cls.temperature.check(temperature), "threshold": cls.threshold.check(threshold),
               "dropout": cls.dropout.check(dropout), "scaling": cls.scaling.check(scaling)}
        out["capacity"] = None if capacity is None else check_int("capacity", capacity, lo=1)
        return out

    def settings(self) -> dict:
        """The arguments that shape this layer's outputs (and its next task's ranks), as saved
        with its tensors and compared on load."""
        return {k: getattr(self, k) for k in SETTINGS}

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
        """The adapter delta for ``x`` [..., in_features], in x's dtype."""
        F = self.num_frozen
        delta, p, idx, rho = mora_routing(
            x, self.lora_A, self.lora_B, top_k=self.top_k, temperature=self.temperature,
            threshold=self.threshold, training=self.training, scaling=self.scaling,
            dropout_p=self.dropout if self.training else 0.0,
            frozen_A=self.frozen_A[:F] if F else None, frozen_B=self.frozen_B[:F].t() if F else None,
            check_nan=self.check_nan)
        if self._stats is not None:
            self._record(p.detach(), idx, rho.detach())
        return delta.to(x.dtype)

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
        for own, child in self._aliases().items():  # checked above: at most one of the two names
            if prefix + own in state_dict:
                state_dict[prefix + child] = state_dict.pop(prefix + own)
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
        for own, child in self._aliases().items():
            shape = tuple(self.get_submodule(child.rpartition(".")[0]).get_parameter(own).shape)
            shapes[own] = shapes[child] = shape
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
            if k in _ADAPTER_KEYS:
                tensors[k] = v
        both = [f"{where}{own} and {where}{child}" for own, child in self._aliases().items()
                if own in sub and child in sub]
        if both:
            raise ValueError(f"{both[0]} name the same tensor: give one of them")
        return ranks, tensors

    def _aliases(self) -> dict:
        """State-dict names of a child's tensors that this module also accepts: own name -> child's."""
        return {}

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
            w, grad = self.lora_A, self.lora_A.requires_grad  # a frozen (inference) adapter stays frozen
            self.lora_A = nn.Parameter(w.new_zeros(cur, self.in_features), requires_grad=grad)
            self.lora_B = nn.Parameter(w.new_zeros(self.out_features, cur), requires_grad=grad)

    def adapter_state_dict(self) -> dict:
        """The adapter's tensors only (no base weights)."""
        sd = self.state_dict()
        return {k: v for k, v in sd.items() if k in _ADAPTER_KEYS}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"tasks={self.num_tasks}, ranks={self.num_ranks} ({self.num_frozen} frozen), "
                f"capacity={self.capacity}, top_k={self.top_k}, temperature={self.temperature}, "
                f"threshold={self.threshold}, dropout={self.dropout}, scaling={self.scaling}")


class MoRALinear(MoRAExperts):
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
    depend on the capacity, and loading it resizes the module to the saved task layout. The
    base Linear's tensors keep the names they have without MoRA (``weight``, ``bias``, not
    ``base.weight``), so a model saved with MoRA applied loads into the same model without
    it (e.g. ``from_pretrained`` of Hugging Face); ``base.weight`` is still accepted on load.
    Statistics: :meth:`enable_stats` counts, per input label, how often each task's ranks
    are selected (and, at eval, not pruned); see :meth:`activation_stats`.
    """

    def __init__(self, base: nn.Linear, rank: int = 8, top_k: int = 8, temperature: float = 0.03,
                 threshold: float = 0.2, dropout: float = 0.0, scaling: float = 1.0, capacity: int | None = None):
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        w = base.weight
        super().__init__(base.in_features, base.out_features, rank, top_k, temperature, threshold, dropout,
                         scaling, capacity, device=w.device, dtype=w.dtype)
        self.base = base
        for prm in base.parameters():
            prm.requires_grad_(False)
        self.register_state_dict_post_hook(_base_entries_as_own)

    @classmethod
    def from_linear(cls, base: nn.Linear, **kwargs) -> "MoRALinear":
        """Wrap ``base`` (frozen) with MoRA; keyword arguments as the constructor."""
        return cls(base, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = super().forward(x)  # first: it checks x's shape with a clear error
        return self.base(x) + delta

    def _aliases(self) -> dict:
        return {k: f"base.{k}" for k, v in self.base.named_parameters(recurse=False) if v is not None}


def _base_entries_as_own(module: MoRALinear, state_dict, prefix: str, local_metadata) -> None:
    # "q_proj.base.weight" -> "q_proj.weight": the name the weight has in the model without MoRA
    for own, child in module._aliases().items():
        if prefix + child in state_dict:
            state_dict[prefix + own] = state_dict.pop(prefix + child)


# --- model-level helpers ------------------------------------------------------------------

def _peft_layer_types() -> tuple:
    # PEFT is optional: when it was never imported, no module of the model can be one of its layers
    if "peft" not in sys.modules:
        return ()
    from peft.tuners.tuners_utils import BaseTunerLayer
    return (BaseTunerLayer,)


def _adapter_params(model: nn.Module) -> set[int]:
    """ids of the parameters that belong to adapters (MoRA's, or any PEFT method's): freezing
    "the rest of the model" leaves them as they are."""
    out = set()
    peft_layers = _peft_layer_types()
    for mod in model.modules():
        if isinstance(mod, MoRAExperts):
            out.update(id(p) for p in mod.parameters(recurse=False))
        elif peft_layers and isinstance(mod, peft_layers):
            base = mod.get_base_layer()
            base_ids = {id(p) for p in base.parameters()}
            out.update(id(p) for p in mod.parameters() if id(p) not in base_ids)
    return out


def _refuse_wrapped(model: nn.Module, name: str, mod: nn.Module) -> None:
    """ValueError when the target ``name`` is (or is the wrapped base of) an adapter layer."""
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else None
    peft_layers = _peft_layer_types()
    for layer_name, layer in ((name, mod), (parent_name, parent)):
        if isinstance(layer, MoRAExperts):
            raise ValueError(f"target_modules matched {layer_name!r}, which already is a MoRA layer")
        if peft_layers and isinstance(layer, peft_layers):
            raise ValueError(
                f"target_modules matched {layer_name!r}, which PEFT has wrapped ({type(layer).__module__}."
                f"{type(layer).__name__}): apply_mora does not nest inside a PEFT layer. Put MoRA on it "
                "through PEFT instead (trainops.integrations.peft.MoRAConfig), or leave it out of target_modules")


def apply_mora(model: nn.Module, target_modules, **kwargs) -> nn.Module:
    """Replace matching ``nn.Linear`` layers of ``model`` by ``MoRALinear`` and freeze the rest.

    ``target_modules``: a regex string (full match on the qualified module name, as PEFT) or
    a list of names, each matching a qualified name exactly or its last component (e.g.
    ``["q_proj", "v_proj"]``). Other keyword arguments go to :class:`MoRALinear`. Every
    parameter that is not an adapter's gets ``requires_grad=False``; adapters already in the
    model (earlier MoRA layers, PEFT layers such as LoRA) keep their flags. A target that is
    already a MoRA layer or a PEFT layer is refused (ValueError): a PEFT-wrapped layer takes
    MoRA through :class:`trainops.integrations.peft.MoRAConfig`. With PEFT, call it after
    ``get_peft_model``: PEFT freezes every parameter outside its own layers, a MoRALinear's
    included. Returns ``model`` (changed in place).
    """
    match = module_matcher(target_modules)
    MoRALinear.check_args(**kwargs)  # before the model is touched: a bad argument changes nothing
    for name, mod in model.named_modules():
        if name and match(name) and isinstance(mod, (nn.Linear, MoRAExperts, *_peft_layer_types())):
            _refuse_wrapped(model, name, mod)
    return replace_linears(model, match, lambda linear: MoRALinear(linear, **kwargs),
                           no_match=f"target_modules {target_modules!r} matched no nn.Linear in the model",
                           keep_trainable=_adapter_params(model))


def mora_modules(model: nn.Module):
    """(qualified name, MoRALinear) pairs of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoRALinear)]


def _experts(model: nn.Module):
    # MoRALinear layers and the MoRA adapters inside PEFT layers alike
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoRAExperts)]


def add_task(model: nn.Module, rank: int | None = None) -> nn.Module:
    """``add_task`` on every MoRA layer of ``model`` (also those added through PEFT)."""
    for _, m in _experts(model):
        m.add_task(rank)
    return model


# --- save and load: tensors plus the settings that shape the outputs ---------------------

CONFIG_KEY = "_mora_config"  # the state-dict entry that holds the JSON settings (UTF-8 bytes, uint8)
_FORMAT, _VERSION = "trainops.mora", 1


def mora_config(model: nn.Module) -> dict:
    """The settings of every MoRA layer of ``model`` (what :func:`apply_mora` took, per layer
    qualified name, with its shape and task layout), as saved by :func:`mora_state_dict`."""
    return {"format": _FORMAT, "version": _VERSION,
            "layers": {name: {**m.settings(), "in_features": m.in_features, "out_features": m.out_features,
                              "task_ranks": list(m.task_ranks)} for name, m in mora_modules(model)}}


def mora_state_dict(model: nn.Module, config: bool = True) -> dict:
    """Only the MoRA adapters' tensors of ``model`` (qualified keys), for saving; with
    ``config`` also :func:`mora_config` as JSON under ``CONFIG_KEY`` (a uint8 tensor, so the
    dict stays tensors only: ``torch.save``/``torch.load(weights_only=True)`` and safetensors
    keep it), which :func:`load_mora_state_dict` checks the model against."""
    out = {}
    for name, m in mora_modules(model):
        for k, v in m.adapter_state_dict().items():
            out[f"{name}.{k}"] = v
    if config:
        data = json.dumps(mora_config(model), sort_keys=True).encode()
        out[CONFIG_KEY] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return out


def _read_config(value) -> dict:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        raise ValueError(f"{CONFIG_KEY} must be a 1-D uint8 tensor of JSON text, got "
                         f"{getattr(value, 'dtype', type(value).__name__)}")
    try:
        cfg = json.loads(bytes(value.cpu().tolist()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{CONFIG_KEY} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict) or cfg.get("format") != _FORMAT or not isinstance(cfg.get("layers"), dict):
        raise ValueError(f"{CONFIG_KEY} is not a {_FORMAT} config")
    if cfg.get("version") != _VERSION:
        raise ValueError(f"{CONFIG_KEY} has version {cfg.get('version')!r}; this trainops reads {_VERSION}")
    for name, layer in cfg["layers"].items():
        if not isinstance(layer, dict) or any(k not in layer for k in SETTINGS):
            raise ValueError(f"{CONFIG_KEY}: layer {name!r} lacks some of the settings {list(SETTINGS)}")
    return cfg


def _check_settings(model: nn.Module, cfg: dict) -> None:
    """ValueError naming the layer and the setting where ``model`` differs from the saved one."""
    for name, m in mora_modules(model):
        saved = cfg["layers"].get(name)
        if saved is None:
            continue  # the tensors' check reports a missing layer
        for key, value in m.settings().items():
            if saved[key] != value:
                raise ValueError(f"MoRA layer {name!r}: {key} is {value!r} in the model but {saved[key]!r} in the "
                                 f"saved adapter; load it into a model built with the saved settings "
                                 f"(load_mora_state_dict on a model without MoRA layers applies them)")


def _layers_from_config(model: nn.Module, cfg: dict) -> dict:
    """New ``MoRALinear`` per saved layer, built on ``model``'s Linear of that name (not yet
    put in place); KeyError/TypeError/ValueError naming the layer when one does not fit."""
    new = {}
    for name, layer in cfg["layers"].items():
        if not isinstance(name, str) or not name:
            raise KeyError(f"the saved MoRA layer name {name!r} is not a submodule name")
        try:
            base = model.get_submodule(name)
        except AttributeError:
            raise KeyError(f"the saved MoRA layer {name!r} is not a module of the model") from None
        if not isinstance(base, nn.Linear):
            raise TypeError(f"the saved MoRA layer {name!r} is a {type(base).__name__} in the model, not an nn.Linear")
        kwargs = {k: layer[k] for k in SETTINGS}
        MoRALinear.check_args(**kwargs)
        new[name] = MoRALinear(base, **kwargs).train(base.training)
    return new


def load_mora_state_dict(model: nn.Module, state_dict: dict, strict: bool = True) -> nn.Module:
    """Load adapters saved by :func:`mora_state_dict` (resizing each layer to its saved tasks).

    Settings: when ``state_dict`` carries its config (``CONFIG_KEY``), a model without MoRA
    layers gets them first, on the saved layer names with the saved settings (no need to
    repeat the :func:`apply_mora` arguments; the rest of the model is frozen as apply_mora
    does), and a model with MoRA layers must match every saved setting (rank, top_k,
    temperature, threshold, dropout, scaling): a difference is a ValueError naming the layer
    and the setting. A state dict without config (saved by an older trainops) loads as before,
    unchecked, with a warning.

    Every layer's entries are checked (task layout, shapes, floating dtypes; with ``strict``
    also missing and unknown keys, including any base weights) before any layer is changed:
    a load that fails leaves the whole model as it was. Non-strict loads skip layers without
    entries and ignore unknown keys.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    cfg = _read_config(state_dict[CONFIG_KEY]) if CONFIG_KEY in state_dict else None
    state_dict = {k: v for k, v in state_dict.items() if k != CONFIG_KEY}
    if cfg is None:
        warnings.warn("the MoRA state dict carries no config (saved by an older trainops): its settings are not "
                      "checked against the model; save it again with mora_state_dict to keep them", UserWarning,
                      stacklevel=2)
    elif not mora_modules(model):
        flags = [(p, p.requires_grad) for p in model.parameters()]
        try:  # wrapping freezes the base weights: undone if the load fails
            added = _layers_from_config(model, cfg)
            return _load_checked(model, state_dict, strict, added)
        except BaseException:
            for prm, flag in flags:
                prm.requires_grad_(flag)
            raise
    else:
        _check_settings(model, cfg)
    return _load_checked(model, state_dict, strict, {})


def _load_checked(model: nn.Module, state_dict: dict, strict: bool, added: dict) -> nn.Module:
    """Check every layer's entries (``added``: new layers not yet in the model), then apply all."""
    layers = [(name, m) for name, m in mora_modules(model)] + list(added.items())
    plans, seen = [], set()
    for name, m in layers:
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
    if added:
        keep = _adapter_params(model)
        for prm in model.parameters():
            if id(prm) not in keep:
                prm.requires_grad_(False)
        for name, m in added.items():
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, m)
    for m, plan in plans:
        m._apply_adapter_state(*plan)
    return model


def save_mora(model: nn.Module, path) -> None:
    """Write :func:`mora_state_dict` of ``model`` to a safetensors file at ``path``; the config
    also goes to the file's metadata (``"mora_config"``, readable without trainops)."""
    from safetensors.torch import save_file  # in the `runtime` and `test` extras

    sd = mora_state_dict(model)
    data = bytes(sd.pop(CONFIG_KEY).tolist()).decode()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={"format": _FORMAT, "mora_config": data})


def load_mora(model: nn.Module, path, strict: bool = True) -> nn.Module:
    """Load a file written by :func:`save_mora` into ``model`` as :func:`load_mora_state_dict`
    does (a model without MoRA layers gets them from the saved config). No pickle: safetensors
    and JSON only."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        sd = {k: f.get_tensor(k) for k in f.keys()}
    if "mora_config" in meta:
        sd[CONFIG_KEY] = torch.frombuffer(bytearray(meta["mora_config"].encode()), dtype=torch.uint8)
    return load_mora_state_dict(model, sd, strict=strict)


def mora_activation_stats(model: nn.Module) -> dict:
    """``activation_stats()`` of every MoRA layer (also those added through PEFT), by qualified name."""
    return {n: m.activation_stats() for n, m in _experts(model)}


def set_mora_stats(model: nn.Module, enabled: bool = True, label=None) -> None:
    """Enable/disable statistics on every MoRA layer and set the label of the coming inputs."""
    for _, m in _experts(model):
        m.enable_stats(enabled)
        if label is not None:
            m.set_stats_label(label)


__all__ += ["add_task", "mora_activation_stats", "set_mora_stats", "MoRAExperts", "mora_config", "save_mora",
            "load_mora", "CONFIG_KEY"]
