"""Hugging Face transformers drop-in: global-batch load balancing with the fused router.

``apply_global_load_balancing(model, scope="global")`` rebinds, on a live model, the
``forward`` of every MoE top-k router (Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE) to the
fused ``trainops.ops.router_topk`` kernel and the causal-LM ``forward`` so that the
auxiliary loss is computed per layer from the router statistics (no concatenation of
all layers' logits), with padding tokens (``attention_mask == 0``) excluded. Weights
and ``state_dict`` are untouched; :func:`revert` restores the original forwards. Works
with transformers 4.x (the sparse MoE block's forward is replaced: it routes inline) and
>= 5 (the router module's forward is replaced). The replaced forwards keep the signature
of the ones they replace, which ``Trainer`` (``remove_unused_columns``), accelerate and
PEFT read.

Loss semantics (docs/load_balancing_conventions.md). HF's ``load_balancing_loss_func``
pools the logits of all layers and returns N_E·Σ_i (count_i/T)·P_i, which is K times the
Megatron/DeepSeek convention LBL = N_E·Σ_i (count_i/(K·T))·P_i (a balanced router gives K
vs 1). The patched model returns ``aux_loss = K · mean_over_layers(LBL_layer)`` by default
(``convention="hf"``), so ``config.router_aux_loss_coef`` keeps its scale;
``convention="normalized"`` returns ``mean_over_layers(LBL_layer)``. The training loss is
``lm_loss + router_aux_loss_coef · aux_loss`` as in HF. In training mode the aux loss is
always computed (HF computes it only with ``output_router_logits``, off by default); in
eval mode when ``output_router_logits`` is on (argument or config), as in HF; an explicit
``output_router_logits=False`` turns it off. The patched model returns
``router_logits=None`` (not recorded). With ``scope="global"`` f is summed over ``group``
and over micro-batches until :func:`trainops.nn.reset_load_balancing` (call it after each
optimizer step; under ``Trainer``, :class:`GlobalLoadBalancingCallback` does it and logs
the aux loss and the expert load balance).
"""
from __future__ import annotations

import inspect
import types

from torch import nn

from trainops.integrations._hf_forwards import _model_forward, _router_forward, _sparse_block_forward
from trainops.integrations._hf_lbl_state import _ModelState
# GlobalCountSync is named here too: tests patch its run() through this module.
from trainops.nn.load_balancing import GlobalCountSync, LoadBalancingLoss, _parse_scope  # noqa: F401

__all__ = ["apply_global_load_balancing", "revert", "SUPPORTED_MODEL_TYPES", "GlobalLoadBalancingCallback",
           "add_global_load_balancing_callback"]

# The modules whose forward is rebound, by class name. transformers >= 5 has a router
# module (<Model>TopKRouter: logits -> logits, weights, indices), where the value says
# whether it casts its gate weights to the logits' dtype; transformers 4.x routes inline in
# the sparse MoE block (gate Linear, softmax, top-k, then the experts), whose forward is
# replaced as a whole (_sparse_block_forward).
_ROUTERS = {"Qwen2MoeTopKRouter": True, "Qwen3MoeTopKRouter": True, "OlmoeTopKRouter": True,
            "MixtralTopKRouter": False}
# model_type -> sparse MoE block class name (4.x).
_SPARSE_BLOCK_OF = {"qwen2_moe": "Qwen2MoeSparseMoeBlock", "qwen3_moe": "Qwen3MoeSparseMoeBlock",
                    "mixtral": "MixtralSparseMoeBlock", "olmoe": "OlmoeSparseMoeBlock"}
_SPARSE_BLOCKS = tuple(_SPARSE_BLOCK_OF.values())
SUPPORTED_MODEL_TYPES = tuple(_SPARSE_BLOCK_OF)
_CONVENTIONS = ("hf", "normalized")

def _is_sparse_block(module: nn.Module) -> bool:
    return type(module).__name__ in _SPARSE_BLOCKS


def _router_modules(model: nn.Module) -> list:
    """The modules to patch: the top-k routers (transformers >= 5), else the sparse MoE
    blocks (4.x)."""
    routers = [m for m in model.modules() if type(m).__name__ in _ROUTERS]
    return routers or [m for m in model.modules() if _is_sparse_block(m)]


def _attach_loss(router: nn.Module, scope, group, check_finite: bool) -> LoadBalancingLoss:
    weight = router.gate.weight if _is_sparse_block(router) else router.weight
    lbl = LoadBalancingLoss(router.num_experts, router.top_k, 1.0, scope, group).to(weight.device)
    # Plain attributes, not submodules: the model's state_dict stays as it was.
    router.__dict__["_trainops_lbl_losses"] = [lbl]
    router.__dict__["_trainops_cast"] = _ROUTERS.get(type(router).__name__, True)
    router.__dict__["_trainops_check_finite"] = bool(check_finite)
    return lbl


_ROUTER_ATTRS = ("_trainops_lbl_losses", "_trainops_cast", "_trainops_check_finite", "_trainops_lbl_state")


def _bind_forward(module: nn.Module, func, orig) -> None:
    """``module.forward = func`` bound to module, with the signature of ``orig`` (the bound
    forward it replaces): ``Trainer`` keeps only the dataset columns that the forward's
    signature names, and accelerate and PEFT read it too. A bound method (not a closure over
    the module), so that ``copy.deepcopy`` binds the copy's forward to the copy."""
    def forward(self, *args, **kwargs):
        return func(self, *args, **kwargs)

    sig = inspect.signature(orig)
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    forward.__signature__ = sig.replace(parameters=[self_param, *sig.parameters.values()])
    forward.__name__, forward.__qualname__ = "forward", f"{type(module).__qualname__}.forward"
    forward.__doc__ = getattr(orig, "__doc__", None)
    forward.__trainops_impl__ = func  # which replacement it runs
    module.forward = types.MethodType(forward, module)


def _patch_router(router: nn.Module, scope, group, state: _ModelState, check_finite: bool = True) -> LoadBalancingLoss:
    lbl = _attach_loss(router, scope, group, check_finite)
    router.__dict__["_trainops_lbl_state"] = state
    _bind_forward(router, _sparse_block_forward if _is_sparse_block(router) else _router_forward, router.forward)
    return lbl


def _lm_patch(orig, options: dict, routers: list, state: _ModelState) -> dict:
    """What a patched causal LM keeps: its original forward and that forward's signature,
    the options of apply_global_load_balancing (convention, group, batch_all_reduce)."""
    sig = inspect.signature(orig)
    var_kw = next((p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    return {"orig": orig, "signature": sig, "var_kw": var_kw, "routers": routers, "state": state, **options}


def apply_global_load_balancing(model: nn.Module, scope="global", *, group=None, convention: str = "hf",
                                check_finite: bool = True, batch_all_reduce: bool = False):
    """Patch a live Qwen2-MoE / Qwen3-MoE / Mixtral / OLMoE causal LM in place (the
    ``*ForCausalLM`` module, before wrapping it in DDP or PEFT); returns the list of the
    per-layer :class:`~trainops.nn.LoadBalancingLoss` modules. One entry point for the four
    model types (dispatched on ``config.model_type``), on the instance rather than on the
    classes: models built elsewhere in the process keep HF's forward, and :func:`revert`
    undoes one model's patch.

    ``scope``: ``"global"``, ``"micro_batch"``, ``"sequence"`` or a mapping scope → weight
    (e.g. ``{"global": 1.0, "micro_batch": 0.01}``). ``group``: data-parallel process group
    for the global scope. ``convention``: ``"hf"`` (×K, HF's scale) or ``"normalized"``.
    ``check_finite``: each router raises on NaN/Inf logits (``router_topk``'s check; on
    CUDA a host read per layer, which under torch.compile is also a graph break).
    ``batch_all_reduce``: the global scope's counts of all layers are all-reduced together,
    once per forward, instead of one all-reduce per layer (:class:`~trainops.nn.GlobalCountSync`;
    same result, one collective instead of one per layer, no overlap with the layers' work;
    under torch.compile too, inside the graph).

    In training mode the aux loss is computed without ``output_router_logits=True``. The
    global scope's counts accumulate until they are reset: after each optimizer step,
    ``trainops.nn.reset_load_balancing(model)`` (or ``register_reset_hook``); under
    ``Trainer``, :class:`GlobalLoadBalancingCallback`.

    Activation checkpointing must be non-reentrant (``gradient_checkpointing_kwargs=
    {"use_reentrant": False}``); a layer run without gradients inside a forward that computes
    them (reentrant checkpointing) raises RuntimeError, as its loss would get no gradient.
    """
    if convention not in _CONVENTIONS:
        raise ValueError(f"convention must be one of {_CONVENTIONS}, got {convention!r}")
    # Only the global scope has counts to all-reduce.
    options = {"convention": convention, "group": group,
               "batch_all_reduce": bool(batch_all_reduce) and "global" in _parse_scope(scope)}
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers MoE causal-LM module, got {type(model).__name__}")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if "_trainops_lbl_patch" in model.__dict__:
        raise RuntimeError("apply_global_load_balancing: this model is already patched (call revert first)")
    routers = _router_modules(model)
    if not routers:
        raise ValueError(f"no MoE router ({', '.join((*_ROUTERS, *_SPARSE_BLOCKS))}) found in the model")
    if not hasattr(model, "router_aux_loss_coef"):
        raise ValueError("the model has no router_aux_loss_coef: pass the *ForCausalLM model")
    state = _ModelState()
    losses = [_patch_router(r, scope, group, state, check_finite) for r in routers]
    orig = model.forward
    model.__dict__["_trainops_lbl_patch"] = _lm_patch(orig, options, routers, state)
    _bind_forward(model, _model_forward, orig)
    return losses


def revert(model: nn.Module):
    """Undo :func:`apply_global_load_balancing` (restores the original forwards)."""
    patch = model.__dict__.pop("_trainops_lbl_patch", None) if isinstance(model, nn.Module) else None
    if patch is None:
        raise ValueError("revert: the model is not patched")
    for r in patch["routers"]:
        for name in ("forward", *_ROUTER_ATTRS):
            r.__dict__.pop(name, None)
    model.__dict__.pop("forward", None)
    return model


def patched_models(model: nn.Module) -> list:
    """The causal LMs patched by :func:`apply_global_load_balancing` in ``model`` (itself
    or inside a wrapper: DDP, PEFT)."""
    return [m for m in model.modules() if "_trainops_lbl_patch" in m.__dict__]


def __getattr__(name):
    # The Trainer callback imports transformers' trainer_callback: only when asked for.
    if name in ("GlobalLoadBalancingCallback", "add_global_load_balancing_callback"):
        from trainops.integrations import transformers_callback

        return getattr(transformers_callback, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
