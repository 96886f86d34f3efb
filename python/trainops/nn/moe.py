"""A small dropless reference MoE layer: router + gated expert MLPs, token permutation
by a stable sort of the expert indices, results added back with index_add."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainops._validation import check_int
from trainops.nn._state import CheckedLoad
from trainops.nn.router import TopKRouter

__all__ = ["MoELayer"]


class MoELayer(CheckedLoad, nn.Module):
    """y = Σ_j w_j · down_e(act(gate_e(x)) ⊙ up_e(x)) over the token's top-k experts e = i_j.

    Dropless: every token reaches its K experts (no capacity factor). Router keyword
    arguments (score, lbl_coeff, scope, group, z_loss_coeff, aux_free_bias, ...) go to
    :class:`~trainops.nn.TopKRouter`. ``forward(x, mask=None)`` → (y like x, aux_loss).
    """

    def __init__(self, hidden_size: int, ffn_size: int, num_experts: int, top_k: int, *,
                 activation=F.silu, device=None, dtype=None, **router_kwargs):
        super().__init__()
        for name, v in (("hidden_size", hidden_size), ("ffn_size", ffn_size), ("num_experts", num_experts)):
            check_int(name, v, lo=1)
        self.hidden_size, self.ffn_size, self.num_experts, self.top_k = hidden_size, ffn_size, num_experts, top_k
        self.activation = activation
        self.router = TopKRouter(hidden_size, num_experts, top_k, device=device, dtype=dtype, **router_kwargs)
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * ffn_size, hidden_size, device=device, dtype=dtype))
        self.down = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_size, device=device, dtype=dtype))
        nn.init.normal_(self.gate_up, std=1.0 / math.sqrt(hidden_size))
        nn.init.normal_(self.down, std=1.0 / math.sqrt(ffn_size))
        self.last_indices: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        # One unbind per weight: taking self.gate_up[e] per expert instead would give each
        # expert's backward a zero gradient of the whole [E, ...] tensor (O(E^2) work and
        # memory, 4x slower at 32 experts: benchmarks/bench_moe_layer.py); unbind's
        # backward stacks the E slices once.
        return self._mix(x, mask, self.gate_up.unbind(0), self.down.unbind(0))

    def _mix(self, x: torch.Tensor, mask: torch.Tensor | None, gate_up, down):
        """The layer's output from per-expert weights ``gate_up[e]`` [2F, H], ``down[e]`` [H, F]."""
        h = x.reshape(-1, self.hidden_size)
        weights, indices, aux = self.router(x, mask=mask)
        self.last_indices = indices.detach()
        flat = indices.reshape(-1)
        order = torch.argsort(flat, stable=True)  # slots grouped by expert, token order kept
        tokens = order // self.top_k
        gates = weights.reshape(-1)[order].to(h.dtype)
        sizes = torch.bincount(flat, minlength=self.num_experts).tolist()
        out = torch.zeros_like(h)
        start = 0
        for e, n in enumerate(sizes):
            if n == 0:
                continue
            tok = tokens[start:start + n]
            g, u = F.linear(h[tok], gate_up[e]).chunk(2, dim=-1)
            y = F.linear(self.activation(g) * u, down[e]) * gates[start:start + n, None]
            out.index_add_(0, tok, y)
            start += n
        return out.view_as(x), aux
