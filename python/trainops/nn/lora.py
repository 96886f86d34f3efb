"""``LoRALinear``: plain LoRA on a frozen ``nn.Linear`` (Hu et al., arXiv 2106.09685), the
baseline MoRA is compared with (the runtime's ``--adapter lora``, the continual-learning
example)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainops._validation import CheckedFloat, check_int

__all__ = ["LoRALinear"]


class LoRALinear(nn.Module):
    """``base(x) + (x Aᵀ Bᵀ) · scaling`` with ``base`` frozen; A [rank, in] Kaiming-uniform
    (as ``nn.Linear``'s weight) and B [out, rank] zero, so training starts from ``base``.
    A and B take ``base``'s device and dtype."""

    scaling = CheckedFloat()  # checked on every assignment

    def __init__(self, base: nn.Linear, rank: int, scaling: float = 1.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be a torch.nn.Linear, got {type(base).__name__}")
        check_int("rank", rank, lo=1)
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling
