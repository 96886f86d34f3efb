"""MoRA as a PEFT method: ``get_peft_model(model, MoRAConfig(...))``, ``save_pretrained``
(``adapter_config.json`` beside ``adapter_model.safetensors``) and ``PeftModel.from_pretrained``.

Importing this module registers the method with PEFT under the type ``"TRAINOPS_MORA"``
(prefix ``mora_``): import it before ``PeftModel.from_pretrained`` of a saved MoRA adapter.
PEFT's ``register_peft_method`` only accepts members of its own ``PeftType`` enum, so the
config, tuner and prefix go into the same three tables it fills (``peft.mapping``), keyed by a
``str`` enum of this module whose value is the string saved in ``adapter_config.json``.

Each targeted ``nn.Linear`` becomes a :class:`MoRALayer` (a PEFT tuner layer): the base layer
plus one :class:`trainops.nn.mora.MoRAExperts` per adapter name, so the adapter's tensors are
those of ``MoRALinear`` (``lora_A``, ``lora_B``, ``frozen_A``, ``frozen_B``, ``task_ranks``)
and ``trainops.nn.add_task`` / the statistics helpers work on PEFT models too. The saved
``task_ranks`` resize a freshly loaded layer to the saved task layout.

Composition with PEFT LoRA: a ``PeftModel`` holds one PEFT method, so MoRA joins a LoRA
``PeftModel`` (LoRA on ``v_proj``, MoRA on ``q_proj``) through :func:`add_mora_adapter`
(PEFT's ``inject_adapter_in_model`` under its own adapter name). PEFT decides trainability
from its tuner layers, so neither method freezes the other's parameters.
``save_pretrained`` writes the LoRA adapter and ``<dir>/<mora adapter name>/``;
``PeftModel.from_pretrained`` then :func:`load_mora_adapter` read them back.
``trainops.nn.apply_mora`` on a PEFT model leaves PEFT's adapters trainable and refuses a
layer PEFT has wrapped.

Merging is impossible (the gate depends on the input): ``merge``/``merge_and_unload`` raise;
``unload`` returns the base model.
"""
from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

try:
    import peft
except ImportError as e:  # an optional extra
    raise ImportError("trainops.integrations.peft needs peft >= 0.21.2: pip install 'trainops[peft]'") from e
from peft import PeftModel, inject_adapter_in_model, load_peft_weights, set_peft_model_state_dict
from peft.config import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from trainops.nn.mora import SETTINGS, MoRAExperts, MoRALinear

if not all(hasattr(BaseTuner, h) for h in ("_get_adapter_state_dict", "_remap_adapter_state_dict_for_load")):
    # save/load of a method outside PEFT goes through these tuner hooks (tested with peft 0.21.2)
    raise ImportError(f"trainops.integrations.peft needs peft >= 0.21.2, found {peft.__version__}")

__all__ = ["MoRAConfig", "MoRAModel", "MoRALayer", "TrainopsPeftType", "add_mora_adapter", "load_mora_adapter",
           "register"]


class TrainopsPeftType(str, enum.Enum):
    """The PEFT type of trainops' methods. A ``str`` enum like PEFT's own ``PeftType``: equal
    to (and hashed like) its value, which is what ``adapter_config.json`` holds."""

    MORA = "TRAINOPS_MORA"

    def __hash__(self):  # as the plain string, so PEFT's tables find it by the string read from JSON
        return hash(self.value)


@dataclass
class MoRAConfig(PeftConfig):
    """Configuration of a MoRA adapter (arguments as :class:`trainops.nn.MoRALinear`).

    Args:
        target_modules: module names or a regex (PEFT's matching); default: the LoRA
            defaults of the model type (e.g. ``q_proj``, ``v_proj`` for Llama).
        exclude_modules: module names or a regex not to adapt.
        rank: ranks added per task (also the first task's).
        top_k: experts kept per token, k = max(top_k, 2).
        temperature: softmax temperature τ of the gate.
        threshold: eval-time pruning δ.
        dropout: dropout on the adapter input (training only).
        scaling: multiplier of the adapter delta.
        modules_to_save: other modules to train and save in full (PEFT's meaning).
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex of the nn.Linear layers to adapt"})
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex of layers not to adapt"})
    rank: int = field(default=8, metadata={"help": "Ranks added per task (also the first task's)"})
    top_k: int = field(default=8, metadata={"help": "Experts kept per token, k = max(top_k, 2)"})
    temperature: float = field(default=0.03, metadata={"help": "Softmax temperature of the gate"})
    threshold: float = field(default=0.2, metadata={"help": "Eval-time pruning threshold"})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input (training only)"})
    scaling: float = field(default=1.0, metadata={"help": "Multiplier of the adapter delta"})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Other modules to train and save in full"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = TrainopsPeftType.MORA
        MoRAExperts.check_args(**self.mora_kwargs())  # TypeError/ValueError naming the argument
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)

    def mora_kwargs(self) -> dict:
        """The :class:`MoRALinear` keyword arguments of this config."""
        return {k: getattr(self, k) for k in SETTINGS}


class MoRALayer(nn.Module, BaseTunerLayer):
    """``base_layer(x) + Σ_active MoRA delta(x)``: an ``nn.Linear`` with MoRA adapters by name."""

    adapter_layer_names = ("mora_experts",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MoRAConfig) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"MoRA adapts nn.Linear layers only, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.mora_experts = nn.ModuleDict()
        self._disable_adapters = False
        self.merged_adapters = []
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.update_layer(adapter_name, config)
        self._active_adapter = adapter_name

    def update_layer(self, adapter_name: str, config: MoRAConfig) -> None:
        w = self.base_layer.weight
        self.mora_experts[adapter_name] = MoRAExperts(self.in_features, self.out_features, **config.mora_kwargs(),
                                                      device=w.device, dtype=w.dtype)
        self.set_adapter(self.active_adapters)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name in self.mora_experts:
                result = result + self.mora_experts[name](x).to(result.dtype)
        return result

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise ValueError("a MoRA adapter cannot be merged into the base weight: its gate depends on the input")

    def unmerge(self) -> None:
        pass  # never merged

    def __repr__(self) -> str:
        return "mora." + super().__repr__()


class MoRAModel(BaseTuner):
    """PEFT tuner that puts :class:`MoRALayer` on the targeted ``nn.Linear`` layers."""

    prefix: str = "mora_"
    tuner_layer_cls = MoRALayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _create_and_replace(self, config: MoRAConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, parameter_name: Optional[str] = None) -> None:
        if parameter_name is not None:
            raise ValueError("MoRA targets modules (nn.Linear), not parameters: leave target_parameters unset")
        if isinstance(target, MoRALayer):
            target.update_layer(adapter_name, config)
            return
        if isinstance(target, MoRALinear):
            raise ValueError(f"{current_key!r} already is a trainops MoRALinear (apply_mora): give it to PEFT as "
                             "a plain nn.Linear, or keep trainops' save/load for it")
        if isinstance(target, BaseTunerLayer):
            raise ValueError(f"{current_key!r} is already wrapped by another PEFT method "
                             f"({type(target).__name__}): MoRA does not nest inside it")
        if not isinstance(target, nn.Linear):
            raise ValueError(f"target module {current_key!r} is a {type(target).__name__}; MoRA adapts nn.Linear only")
        new_module = MoRALayer(target, adapter_name, config).train(target.training)  # keep the model's mode
        if adapter_name not in self.active_adapters:  # an additional adapter is not trainable until set active
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # PEFT upcasts 16-bit adapter parameters to fp32; the frozen-rank bank (buffers) follows,
        # since the kernel takes the frozen ranks in the dtype of the trainable ones
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        for module in self.model.modules():
            if isinstance(module, MoRALayer) and adapter_name in module.mora_experts:
                experts = module.mora_experts[adapter_name]
                experts.frozen_A = experts.frozen_A.to(experts.lora_A.dtype)
                experts.frozen_B = experts.frozen_B.to(experts.lora_A.dtype)

    def _check_merge_allowed(self):
        raise ValueError("MoRA adapters cannot be merged into the base weights: the gate depends on the input")


def _inner_model(model: nn.Module) -> nn.Module:
    # a PeftModel's tuner layers live in base_model.model; a plain model takes them directly
    return model.base_model.model if isinstance(model, PeftModel) else model


def add_mora_adapter(model: nn.Module, config: MoRAConfig, adapter_name: str = "mora") -> nn.Module:
    """Put a MoRA adapter named ``adapter_name`` on ``model``: a plain model or a ``PeftModel``
    of another method (e.g. LoRA on other layers). The adapter is active and trainable (unless
    ``config.inference_mode``); the other method's adapters keep their flags, the base weights
    are frozen. ``model.save_pretrained(d)`` of a PeftModel then also writes ``d/<adapter_name>/``
    (``adapter_config.json`` and weights); read it back with :func:`load_mora_adapter`."""
    if not isinstance(config, MoRAConfig):
        raise TypeError(f"config must be a MoRAConfig, got {type(config).__name__}")
    inner = _inner_model(model)
    if adapter_name in getattr(inner, "peft_config", {}):
        raise ValueError(f"adapter_name {adapter_name!r} is already an adapter of the model")
    with warnings.catch_warnings():  # PEFT warns that the model already holds adapters: that is the point here
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(config, inner, adapter_name=adapter_name)
    return model


def load_mora_adapter(model: nn.Module, path, adapter_name: str = "mora", is_trainable: bool = False) -> nn.Module:
    """Add the MoRA adapter saved at ``path`` (``adapter_config.json`` + weights, as written by
    ``save_pretrained``) to ``model`` (plain or a ``PeftModel`` of another method) under
    ``adapter_name``; frozen unless ``is_trainable``. Every saved tensor must find its place
    (KeyError otherwise); the saved task layout resizes the layers."""
    config = MoRAConfig.from_pretrained(str(path))
    config.inference_mode = not is_trainable
    add_mora_adapter(model, config, adapter_name)
    weights = load_peft_weights(str(path), device="cpu")
    result = set_peft_model_state_dict(_inner_model(model), weights, adapter_name=adapter_name)
    missing = [k for k in result.missing_keys if f".mora_experts.{adapter_name}." in k]
    if missing or result.unexpected_keys:
        raise KeyError(f"MoRA adapter at {str(path)!r} does not fit the model: missing {missing[:4]}, "
                       f"unexpected {list(result.unexpected_keys)[:4]}")
    return model


def register() -> None:
    """Register MoRA with PEFT (idempotent; done on import of this module)."""
    key = TrainopsPeftType.MORA
    if PEFT_TYPE_TO_TUNER_MAPPING.get(key) is MoRAModel:
        return
    if key in PEFT_TYPE_TO_CONFIG_MAPPING or MoRAModel.prefix in PEFT_TYPE_TO_PREFIX_MAPPING.values():
        warnings.warn(f"PEFT already has a method {key.value!r} or the prefix {MoRAModel.prefix!r}: "
                      "trainops' MoRA replaces it", UserWarning, stacklevel=2)
    PEFT_TYPE_TO_CONFIG_MAPPING[key] = MoRAConfig
    PEFT_TYPE_TO_TUNER_MAPPING[key] = MoRAModel
    PEFT_TYPE_TO_PREFIX_MAPPING[key] = MoRAModel.prefix


register()
