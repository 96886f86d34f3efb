"""Plain-PyTorch specification of the MoE router op and of the load-balancing loss.

``router_topk`` is the spec of ``trainops.ops.router_topk``: scores in fp32, top-k with
ties broken by the lower expert index, per-expert selection counts and per-expert sums
of the score distribution over valid (unmasked) tokens, and the sum of squared
log-sum-exps (router z-loss numerator, ST-MoE, arXiv 2202.08906).

The load-balancing loss (Switch Transformer, arXiv 2101.03961; global-batch variant of
"Demons in the Detail", arXiv 2501.11873) is

    LBL = coeff · N_E · Σ_i f_i · P_i,   f_i = count_i / (K · T_f),   P_i = prob_sum_i / T_p

where count_i and T_f may be summed over data-parallel ranks and micro-batches (global
scope) while P_i is always local. A perfectly balanced router gives ``coeff``.
"""
from __future__ import annotations

import torch

from trainops._router_scores import probability, router_scores

__all__ = ["router_scores", "router_topk", "lbl_from_stats", "load_balancing_loss", "sequence_load_balancing_loss"]


def router_topk(logits: torch.Tensor, k: int, *, score: str = "softmax", renormalize: bool = True,
                expert_bias: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                z_loss: bool = False):
    """(weights fp32 [T,k], indices int64 [T,k], counts int64 [E], prob_sum fp32 [E][, z_sum fp32 []]).

    Experts are picked on ``scores + expert_bias`` (DeepSeek-V3 aux-loss-free balancing);
    gate weights come from the raw scores, divided by their sum when ``renormalize``.
    Rows with ``mask == False`` are routed but do not count in ``counts``, ``prob_sum``
    or ``z_sum``.
    """
    s = router_scores(logits, score)
    sel = s if expert_bias is None else s + expert_bias.float()
    # Stable descending sort: equal scores keep ascending expert order (lower index wins).
    indices = torch.sort(sel, dim=-1, descending=True, stable=True).indices[:, :k]
    weights = s.gather(1, indices)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    valid = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device) if mask is None else mask.bool()
    E = logits.shape[1]
    counts = torch.zeros(E, dtype=torch.int64, device=logits.device)
    counts.index_add_(0, indices[valid].reshape(-1), torch.ones_like(indices[valid].reshape(-1)))
    prob_sum = (probability(s, score) * valid[:, None]).sum(0)
    out = (weights, indices, counts, prob_sum)
    if z_loss:
        lse = torch.logsumexp(logits.float(), dim=-1)
        out = out + (((lse * lse) * valid).sum(),)
    return out


def lbl_from_stats(counts: torch.Tensor, prob_sum: torch.Tensor, tokens_f, tokens_p, top_k: int,
                   coeff: float = 1.0) -> torch.Tensor:
    """coeff · N_E · Σ_i (count_i / (K·tokens_f)) · (prob_sum_i / tokens_p); 0 when no tokens."""
    E = prob_sum.shape[-1]
    tf = torch.as_tensor(tokens_f, dtype=torch.float32, device=prob_sum.device).clamp_min(1)
    tp = torch.as_tensor(tokens_p, dtype=torch.float32, device=prob_sum.device).clamp_min(1)
    f = counts.float() / (top_k * tf)
    return coeff * E * (f * (prob_sum / tp)).sum()


def load_balancing_loss(logits: torch.Tensor, top_k: int, coeff: float = 1.0, *, score: str = "softmax",
                        mask: torch.Tensor | None = None, expert_bias: torch.Tensor | None = None,
                        global_counts: torch.Tensor | None = None, global_tokens=None) -> torch.Tensor:
    """Micro-batch LBL of one layer's router logits [T, E]; with ``global_counts`` /
    ``global_tokens`` given, f is taken from those (global-batch LBL) and P stays local."""
    _, _, counts, prob_sum = router_topk(logits, top_k, score=score, expert_bias=expert_bias, mask=mask)
    n_valid = logits.shape[0] if mask is None else int(mask.sum())
    if global_counts is None:
        return lbl_from_stats(counts, prob_sum, n_valid, n_valid, top_k, coeff)
    return lbl_from_stats(global_counts, prob_sum, global_tokens, n_valid, top_k, coeff)


def sequence_load_balancing_loss(logits: torch.Tensor, top_k: int, seq_len: int, coeff: float = 1.0, *,
                                 score: str = "softmax", mask: torch.Tensor | None = None) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise LBL: the micro-batch formula per sequence, averaged over sequences
    (sequences with no valid token are skipped). ``logits``: [B·seq_len, E], rows by sequence."""
    T, E = logits.shape
    B = T // seq_len
    m = torch.ones(T, dtype=torch.bool, device=logits.device) if mask is None else mask.bool()
    losses = []
    for b in range(B):
        rows = slice(b * seq_len, (b + 1) * seq_len)
        if m[rows].any():
            losses.append(load_balancing_loss(logits[rows], top_k, coeff, score=score, mask=m[rows]))
    if not losses:
        return logits.float().sum() * 0.0
    return torch.stack(losses).mean()
