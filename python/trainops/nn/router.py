"""Top-k MoE router on the fused ``trainops.ops.router_topk`` kernel."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from trainops._validation import CheckedFloat, check_bool, check_finite_float, check_int
from trainops.nn._state import CheckedLoad, finite, nonnegative
from trainops.nn.global_counts import add_unless_recomputing
from trainops.nn.load_balancing import LoadBalancingLoss
from trainops.ops.router import router_topk

__all__ = ["TopKRouter"]


class TopKRouter(CheckedLoad, nn.Module):
    """Linear router → fused scores/top-k/statistics → (weights, indices, aux_loss).

    Args:
        hidden_size, num_experts, top_k: sizes.
        score: ``"softmax"`` or ``"sigmoid"``; renormalize: gate weights sum to 1.
        lbl_coeff: load-balancing loss weight (0 disables it); scope, group: see
            :class:`~trainops.nn.LoadBalancingLoss`.
        z_loss_coeff: weight of the router z-loss (mean logsumexp², ST-MoE).
        aux_free_bias: keep a DeepSeek-V3 aux-loss-free bias b that only changes which
            experts are picked; :meth:`update_bias` applies b_i ← b_i + γ·sign(mean load − load_i)
            with γ = ``bias_update_rate`` from the loads counted since the last update.

    ``forward(x, mask=None, seq_len=None)``: x [..., hidden]; mask [...] nonzero = real token.
    Returns weights fp32 [T, K], indices int64 [T, K], aux_loss (fp32 scalar).

    ``load_state_dict`` checks the router's entries and its loss's (shapes, finite bias,
    loads and counts >= 0) before copying any of them.
    """

    _STATE_CHECKS = {"expert_bias": finite, "load": nonnegative}
    z_loss_coeff, bias_update_rate = CheckedFloat(lo=0.0), CheckedFloat(lo=0.0)  # checked on every assignment

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, score: str = "softmax",
                 renormalize: bool = True, lbl_coeff: float = 0.01, scope="global", group=None,
                 z_loss_coeff: float = 0.0, aux_free_bias: bool = False, bias_update_rate: float = 1e-3,
                 device=None, dtype=None):
        super().__init__()
        check_int("hidden_size", hidden_size, lo=1)
        check_int("num_experts", num_experts, lo=1)
        check_int("top_k (at most num_experts)", top_k, lo=1, hi=num_experts)
        if score not in ("softmax", "sigmoid"):
            raise ValueError(f"score must be 'softmax' or 'sigmoid', got {score!r}")
        check_bool("renormalize", renormalize)
        check_bool("aux_free_bias", aux_free_bias)
        lbl_coeff = check_finite_float("lbl_coeff", lbl_coeff, lo=0.0)
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k
        self.score, self.renormalize = score, renormalize
        self.z_loss_coeff, self.bias_update_rate = z_loss_coeff, bias_update_rate
        self.group = group
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.lbl = LoadBalancingLoss(num_experts, top_k, lbl_coeff, scope, group) if lbl_coeff > 0 else None
        if aux_free_bias:
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32, device=device))
            self.register_buffer("load", torch.zeros(num_experts, dtype=torch.int64, device=device))
        else:
            self.expert_bias = None
        self.last_counts: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, seq_len: int | None = None):
        h = x.reshape(-1, self.hidden_size)
        logits = F.linear(h, self.weight)
        flat_mask = None if mask is None else mask.reshape(-1)
        out = router_topk(logits, self.top_k, score=self.score, renormalize=self.renormalize,
                          expert_bias=self.expert_bias, mask=flat_mask, z_loss=self.z_loss_coeff > 0)
        weights, indices, counts, prob_sum = out[:4]
        aux = prob_sum.new_zeros(())
        if self.lbl is not None:
            if seq_len is None and x.dim() >= 3:
                seq_len = x.shape[-2]
            aux = aux + self.lbl(counts, prob_sum, logits=logits, indices=indices, mask=flat_mask,
                                 seq_len=seq_len, score=self.score)
        if self.z_loss_coeff > 0:
            aux = aux + self.z_loss_coeff * out[4]
        if self.expert_bias is not None and self.training:
            add_unless_recomputing(self.load, counts)
        self.last_counts = counts
        return weights, indices, aux

    @torch.no_grad()
    def update_bias(self) -> None:
        """Aux-loss-free balancing step (DeepSeek-V3): b ← b + γ·sign(mean load − load)."""
        if self.expert_bias is None:
            raise RuntimeError("update_bias needs TopKRouter(aux_free_bias=True)")
        load = self.load.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(load, group=self.group)
        if load.sum() > 0:
            lf = load.to(torch.float32)
            self.expert_bias += self.bias_update_rate * torch.sign(lf.mean() - lf)
        self.load.zero_()
