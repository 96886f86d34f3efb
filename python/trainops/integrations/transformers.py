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

import functools
import inspect
import types

import torch
import torch.nn.functional as F
from torch import nn

from trainops.nn.global_counts import in_backward
from trainops.nn.load_balancing import GlobalCountSync, LoadBalancingLoss, _parse_scope
from trainops.ops.router import router_topk

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

class _Collector:
    """What one causal-LM forward gives its routers (the padding mask, the sequence length)
    and gets back from them (each layer's load-balancing term)."""

    def __init__(self, mask, seq_len, sync: GlobalCountSync | None = None):
        # terms: tensors, or functions that give them after sync.run() (batched all-reduce)
        self.mask, self.seq_len, self.terms, self.sync = mask, seq_len, [], sync
        self.counts = []  # each layer's local expert counts, for the training metrics
        self.grad_enabled = torch.is_grad_enabled()
        self.tokens = None  # rows routed per layer, checked when a layer is recomputed


class _ModelState:
    """Shared by a patched causal LM and its routers: the collector of the forward that is
    running, if any. A plain attribute rather than a context variable or a thread-local,
    which torch.compile cannot trace (a graph break at every layer); it is per model, so
    different models may run in different threads."""

    def __init__(self):
        self.collector = None
        # The collector of the forward whose backward runs (else of the latest forward):
        # activation checkpointing recomputes its layers during backward, after the forward
        # has returned, and each layer must then repeat its original computation (the same
        # masked routing and loss ops, whose saved tensors non-reentrant checkpointing
        # matches one by one).
        self.last = None
        # Training metrics since the last take_metrics() (GlobalLoadBalancingCallback turns
        # recording on): sum of the aux losses, number of forwards, expert counts [layers, E].
        self.recording = False
        self.aux_sum = self.loads = None
        self.forwards = 0

    def record(self, aux: torch.Tensor, counts: list) -> None:
        aux = aux.detach()
        loads = torch.stack([c.to(aux.device) for c in counts])
        if self.loads is None:
            self.aux_sum, self.loads = aux, loads
        else:
            self.aux_sum, self.loads = self.aux_sum + aux, self.loads + loads
        self.forwards += 1

    def take_metrics(self):
        """(aux sum, forwards, loads [layers, E]) recorded since the last call, then cleared."""
        out = (self.aux_sum, self.forwards, self.loads)
        self.aux_sum = self.loads = None
        self.forwards = 0
        return out

    def backward_started(self, collector, grad) -> None:
        """Hook on a forward's aux loss, whose gradient comes before its layers' (the loss
        is computed after them): that forward's layers are the ones recomputed next, also
        when later forwards ran before this backward (pipelined micro-batches)."""
        self.last = collector


def _route(module, router_logits):
    """The fused router on one layer's logits: (gate weights fp32, expert indices); adds the
    layer's load-balancing term to the collector of the running forward, if any."""
    state = getattr(module, "_trainops_lbl_state", None)
    coll = None if state is None else state.collector
    recomputing = False
    if coll is None and state is not None and state.last is not None and not torch.compiler.is_compiling() \
            and in_backward():
        coll, recomputing = state.last, True
        if coll.tokens != router_logits.shape[0]:
            raise RuntimeError("trainops: a layer recomputed by activation checkpointing routes "
                               f"{router_logits.shape[0]} tokens, but its forward routed {coll.tokens} (is the "
                               "aux loss part of the loss whose backward runs?)")
    elif coll is not None and coll.grad_enabled and not torch.is_grad_enabled():
        raise RuntimeError("trainops: a MoE layer runs without gradients inside a forward that computes them "
                           "(reentrant activation checkpointing): its load-balancing loss would get no gradient. "
                           "Use non-reentrant checkpointing, e.g. model.gradient_checkpointing_enable("
                           "gradient_checkpointing_kwargs={'use_reentrant': False})")
    mask = None
    if coll is not None and coll.mask is not None and coll.mask.numel() == router_logits.shape[0]:
        mask = coll.mask
    renormalize = getattr(module, "norm_topk_prob", True)  # Mixtral always renormalizes
    weights, indices, counts, prob_sum = router_topk(router_logits, module.top_k, renormalize=renormalize, mask=mask,
                                                     check_finite=module._trainops_check_finite)
    if coll is not None:
        lbl = module._trainops_lbl_losses[0]
        stats = dict(logits=router_logits, indices=indices, mask=mask, seq_len=coll.seq_len)
        if coll.sync is not None:
            term = lbl.deferred(counts, prob_sum, sync=coll.sync, **stats)
        else:
            term = lbl(counts, prob_sum, **stats)
        if not recomputing:  # a recomputed term only repeats the original's saved tensors
            coll.terms.append(term)
            coll.counts.append(counts)
            coll.tokens = router_logits.shape[0]
    return weights, indices


def _router_forward(self, hidden_states):
    """Fused replacement of ``<Model>TopKRouter.forward`` (transformers >= 5): same outputs,
    plus this layer's LBL."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    weights, indices = _route(self, router_logits)
    if self._trainops_cast:
        weights = weights.to(router_logits.dtype)
    return router_logits, weights, indices


def _sparse_block_forward(self, hidden_states):
    """Fused replacement of ``<Model>SparseMoeBlock.forward`` (transformers 4.x): the block's
    own computation (jitter, gate, dropless experts in ascending order, Qwen2-MoE's gated
    shared expert) with the routing done by the fused router; plus this layer's LBL."""
    batch, seq, hidden = hidden_states.shape
    jitter = getattr(self, "jitter_noise", 0)
    if self.training and jitter > 0:  # HF scales in place; nothing reads the block's input after it
        hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(1.0 - jitter, 1.0 + jitter)
    x = hidden_states.view(-1, hidden)
    router_logits = self.gate(x)
    weights, indices = _route(self, router_logits)
    weights = weights.to(x.dtype)
    out = torch.zeros_like(x)
    # [E, k, T] selection mask; torch.where over an expert's slice lists its tokens by slot,
    # then by token, so the sums below add in HF's order.
    selected = F.one_hot(indices, num_classes=self.num_experts).permute(2, 1, 0)
    for e in torch.greater(selected.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist():
        slot, token = torch.where(selected[e])
        y = self.experts[e](x[token]) * weights[token, slot, None]
        out.index_add_(0, token, y.to(x.dtype))
    if hasattr(self, "shared_expert"):
        out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
    return out.reshape(batch, seq, hidden), router_logits


def _is_sparse_block(module: nn.Module) -> bool:
    return type(module).__name__ in _SPARSE_BLOCKS


def _router_modules(model: nn.Module) -> list:
    """The modules to patch: the top-k routers (transformers >= 5), else the sparse MoE
    blocks (4.x)."""
    routers = [m for m in model.modules() if type(m).__name__ in _ROUTERS]
    return routers or [m for m in model.modules() if _is_sparse_block(m)]


def _model_forward(self, *args, **kwargs):
    """Causal-LM forward: the original one without HF's pooled aux loss, plus ours."""
    patch = self._trainops_lbl_patch
    bound = patch["signature"].bind_partial(*args, **kwargs)
    call = dict(bound.arguments)
    extra = dict(call.pop(patch["var_kw"], {})) if patch["var_kw"] else {}
    return_dict = extra.pop("return_dict", call.pop("return_dict", None))
    want = call.get("output_router_logits")
    if want is None:  # training needs the aux loss whatever the config says (HF: off by default)
        want = self.training or bool(getattr(self.config, "output_router_logits", False))
    call["output_router_logits"] = False  # HF would record and pool every layer's logits
    mask = call.get("attention_mask")
    ids = call.get("input_ids")
    if ids is None:
        ids = call.get("inputs_embeds")
    seq_len = ids.shape[1] if ids is not None and ids.dim() >= 2 else None
    flat_mask = mask.reshape(-1) != 0 if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    coll = None
    if want:
        coll = _Collector(flat_mask, seq_len, GlobalCountSync(patch["group"]) if patch["batch_all_reduce"] else None)
    state = patch["state"]
    if coll is not None:
        state.last = coll
    outer, state.collector = state.collector, coll
    try:
        out = patch["orig"](**call, **extra)
    finally:
        state.collector = outer
    if coll is not None and coll.terms:
        if coll.sync is not None:  # every layer's global counts in one all-reduce
            coll.sync.run()
            coll.terms = [term() if callable(term) else term for term in coll.terms]
        aux = torch.stack([t.to(coll.terms[0].device) for t in coll.terms]).mean()
        coll.terms = []  # state.last keeps the collector for recomputation, not these
        if aux.requires_grad and not torch.compiler.is_compiling():  # compiled: recomputed in the graph
            aux.register_hook(functools.partial(state.backward_started, coll))
        if patch["convention"] == "hf":
            aux = aux * self.num_experts_per_tok
        if state.recording and self.training:
            state.record(aux, coll.counts)
        coll.counts = []
        out["aux_loss"] = aux  # item assignment: ModelOutput keeps keys and attributes in step
        if out.loss is not None:
            out["loss"] = out.loss + self.router_aux_loss_coef * aux.to(out.loss.device)
    return out.to_tuple() if return_dict is False else out


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
