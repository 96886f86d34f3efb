"""Router score functions, shared by the load-balancing modules and the router reference.

score s_ie = softmax_e(z_i) or sigmoid(z_ie), in fp32; the distribution that the
load-balancing loss averages, P_i, is the softmax as is and the sigmoid normalized per
token (DeepSeek-V3, arXiv 2412.19437).
"""
from __future__ import annotations

import torch

__all__ = ["SCORES", "router_scores", "probability"]

SCORES = ("softmax", "sigmoid")


def router_scores(logits: torch.Tensor, score: str = "softmax") -> torch.Tensor:
    """fp32 score of every expert: softmax over experts, or elementwise sigmoid."""
    x = logits.float()
    if score == "softmax":
        return torch.softmax(x, dim=-1)
    if score == "sigmoid":
        return torch.sigmoid(x)
    raise ValueError(f"score must be 'softmax' or 'sigmoid', got {score!r}")


def probability(scores: torch.Tensor, score: str) -> torch.Tensor:
    """The distribution P_i averages: softmax as is; sigmoid normalized per token."""
    return scores if score == "softmax" else scores / scores.sum(-1, keepdim=True)
