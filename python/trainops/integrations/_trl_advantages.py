"""Group-relative advantages over groups of fresh and replayed rollouts (RLEP).

The formulas are TRL's ``GRPOTrainer`` ones (``multi_objective_aggregation`` and
``scale_rewards``), applied to groups of N = G fresh + up to M replayed items instead of G:

    sum_then_normalize:  r = Σ_k w_k r_k;  A = (r − mean_group r) / (std_group r + 1e-4)
                         (std over the whole batch with scale_rewards="batch"; no division with "none")
    normalize_then_sum:  r̂_k = (r_k − mean_group r_k) / (std_group r_k + 1e-4);  r = Σ_k w_k r̂_k;
                         A = (r − mean_batch r) / (std_batch r + 1e-4)

std is the unbiased (Bessel-corrected) standard deviation, as TRL's ``nanstd``. A row whose
rewards are all NaN (an absent replay slot, or a completion no reward function scored) is left
out of every mean and std and gets advantage 0.
"""
from __future__ import annotations

import torch

_EPS = 1e-4


def _nanstd(x: torch.Tensor, dim=None, keepdim: bool = False) -> torch.Tensor:
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    out = torch.sqrt(var * count / (count - 1))
    return out if keepdim or dim is None else out.squeeze(dim)


def group_advantages(rewards_per_func: torch.Tensor, reward_weights: torch.Tensor, scale_rewards: str = "group",
                     aggregation: str = "sum_then_normalize") -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages [B, N] and the std each was divided by [B, N] (for logging), from rewards
    [B, N, K] (NaN where absent) and the K reward weights."""
    if rewards_per_func.dim() != 3:
        raise ValueError(f"rewards_per_func must be [groups, items, reward functions], got "
                         f"{tuple(rewards_per_func.shape)}")
    w = reward_weights.to(rewards_per_func)
    absent = torch.isnan(rewards_per_func).all(dim=-1)
    n = rewards_per_func.shape[1]
    if aggregation == "sum_then_normalize":
        rewards = (rewards_per_func * w).nansum(dim=-1).masked_fill(absent, float("nan"))
        mean = torch.nanmean(rewards, dim=1, keepdim=True)
        if scale_rewards in ("group", "none"):
            std = _nanstd(rewards, dim=1, keepdim=True) if n > 1 else torch.zeros_like(mean)
        elif scale_rewards == "batch":
            std = _nanstd(rewards) if rewards.numel() > 1 else torch.zeros(())
        else:
            raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
        std = std.expand_as(rewards)
        adv = rewards - mean
        if scale_rewards != "none":
            adv = adv / (std + _EPS)
    elif aggregation == "normalize_then_sum":
        mean_k = torch.nanmean(rewards_per_func, dim=1, keepdim=True)
        std_k = _nanstd(rewards_per_func, dim=1, keepdim=True) if n > 1 else torch.zeros_like(mean_k)
        rewards = (((rewards_per_func - mean_k) / (std_k + _EPS)) * w).nansum(dim=-1)
        rewards = rewards.masked_fill(absent, float("nan"))
        std = (_nanstd(rewards) if rewards.numel() > 1 else torch.zeros(())).expand_as(rewards)
        adv = (rewards - torch.nanmean(rewards)) / (std + _EPS)
    else:
        raise ValueError(f"multi_objective_aggregation must be 'sum_then_normalize' or 'normalize_then_sum', "
                         f"got {aggregation!r}")
    return torch.nan_to_num(adv, nan=0.0), std
