"""Expert specialization metrics from routing indices ("Demons in the Detail",
arXiv 2501.11873, §5: with global-batch balancing experts specialize by domain)."""
from __future__ import annotations

import torch

__all__ = ["domain_expert_counts", "expert_selection_frequency", "specialization_score"]


def domain_expert_counts(indices: torch.Tensor, domains: torch.Tensor, num_experts: int,
                         num_domains: int | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """[D, E] number of selections of expert e by tokens of domain d (each of the K picks counts)."""
    if indices.dim() != 2:
        raise ValueError(f"indices must be [tokens, k], got shape {tuple(indices.shape)}")
    domains = domains.reshape(-1).long()
    if domains.numel() != indices.shape[0]:
        raise ValueError(f"domains must have one entry per token ({indices.shape[0]}), got {domains.numel()}")
    D = int(domains.max()) + 1 if num_domains is None else num_domains
    w = torch.ones_like(indices, dtype=torch.float64)
    if mask is not None:
        w = w * mask.reshape(-1, 1).to(torch.float64)
    flat = (domains[:, None] * num_experts + indices.long()).reshape(-1)
    return torch.zeros(D * num_experts, dtype=torch.float64, device=indices.device).index_add_(
        0, flat, w.reshape(-1)).view(D, num_experts)


def expert_selection_frequency(indices, domains, num_experts, num_domains=None, mask=None) -> torch.Tensor:
    """[D, E]: fraction of domain d's expert selections that go to expert e (rows sum to 1)."""
    c = domain_expert_counts(indices, domains, num_experts, num_domains, mask)
    return c / c.sum(1, keepdim=True).clamp_min(1)


def specialization_score(indices, domains, num_experts, num_domains=None, mask=None,
                         normalized: bool = True) -> float:
    """Mutual information I(domain; expert) of the selections, in nats; divided by H(domain)
    when ``normalized`` (0: routing ignores the domain, 1: the expert determines the domain)."""
    c = domain_expert_counts(indices, domains, num_experts, num_domains, mask)
    p = c / c.sum().clamp_min(1)
    pd, pe = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    nz = p > 0
    mi = (p[nz] * (p[nz] / (pd * pe).expand_as(p)[nz]).log()).sum()
    if not normalized:
        return float(mi)
    hd = -(pd[pd > 0] * pd[pd > 0].log()).sum()
    return float(mi / hd) if hd > 0 else 0.0
