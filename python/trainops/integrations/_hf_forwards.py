"""The replacement forwards installed by trainops.integrations.transformers: the fused
router of one MoE layer (transformers >= 5: the top-k router module; 4.x: the whole sparse
MoE block) and the causal LM's forward that adds the per-layer load-balancing loss. The
wiring (which modules, signatures, revert) is in trainops.integrations.transformers."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from trainops.integrations._hf_lbl_state import _Collector
from trainops.nn.global_counts import in_backward
from trainops.nn.load_balancing import GlobalCountSync
from trainops.ops.router import router_topk

__all__ = ["_route", "_router_forward", "_sparse_block_forward", "_model_forward"]


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
