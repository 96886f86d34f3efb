"""Literal reference of MoRA ("Little By Little", arXiv 2506.21035; code Artificer-AI-Lab/MoRAM).

Written the way the method is stated, not the way it is computed fast: the old (frozen)
and new ranks are concatenated, the non-selected scores are set to −∞ in a dense score
matrix before the softmax, and every rank-1 expert's output (T×R×d_out) is formed and
then mixed. All math in fp32 (fp64 stays fp64); autograd gives the gradients.
"""
from __future__ import annotations

import torch

from trainops._counter_rng import dropout_keep_mask

EPS = 1e-12


def mora(x, A, B, *, top_k=8, temperature=0.03, threshold=0.2, training=True, scaling=1.0,
         dropout_p=0.0, seed=0, frozen_A=None, frozen_B=None):
    """delta = ((p ⊙ w) Bᵀ) · scaling, with p = x̃ Aᵀ, s = p/‖p‖, w = softmax(top-k(s)/τ)
    (· 1[s ≥ δ] in eval), x̃ = dropout(x) in training. Frozen ranks come first.

    x [..., D]; A [R, D]; B [N, R]; returns [..., N] in x.dtype."""
    out_dtype = x.dtype
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    if frozen_A is not None and frozen_A.shape[0] > 0:
        A = torch.cat([frozen_A, A], dim=0)         # old and new ranks, concatenated
        B = torch.cat([frozen_B, B], dim=1)
    A, B = A.to(ct), B.to(ct)
    shape = x.shape
    xt = x.reshape(-1, shape[-1]).to(ct)
    if training and dropout_p > 0.0:
        keep = dropout_keep_mask(xt.shape, seed, dropout_p, xt.device)
        xt = torch.where(keep, xt * (1.0 / (1.0 - dropout_p)), torch.zeros_like(xt))
    R = A.shape[0]
    k = min(max(top_k, 2), R)
    p = xt @ A.t()                                              # [T, R] self-activated scores
    s = torch.nn.functional.normalize(p, p=2.0, dim=-1, eps=EPS)
    vals, idx = torch.topk(s, k, dim=-1)                        # signed top-k
    scores = torch.full_like(s, float("-inf")).scatter(-1, idx, vals)
    w = torch.softmax(scores / temperature, dim=-1)             # dense, zero off the top-k
    if not training:
        w = w * (s >= threshold).to(w.dtype)                    # rank pruning, no renormalization
    experts = p.unsqueeze(-1) * B.t().unsqueeze(0)              # [T, R, N]: each rank-1 expert's output
    delta = (w.unsqueeze(-1) * experts).sum(dim=1) * scaling
    return delta.to(out_dtype).reshape(*shape[:-1], B.shape[0])
