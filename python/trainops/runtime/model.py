"""A small causal MoE transformer on byte tokens, and the per-task adapters of the runtime.

Block: x + attn(ln(x)), then x + MoE(ln(x)) with :class:`trainops.nn.MoELayer` (top-k
router with a load-balancing loss at the configured scope). Attention projections are
``nn.Linear`` named ``q, k, v, o`` and the output head ``head``: the adapter targets.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from trainops.nn import LoRALinear, MoELayer, add_task, apply_mora
from trainops.nn._replace import module_matcher, replace_linears

__all__ = ["MoETransformer", "LoRALinear", "apply_adapter", "next_task_adapter", "lbl_disabled"]


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x):
        B, S, D = x.shape
        split = lambda t: t.view(B, S, self.heads, D // self.heads).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True)
        return self.o(y.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.n_heads)
        self.moe = MoELayer(cfg.d_model, cfg.ffn_size, cfg.num_experts, cfg.top_k, lbl_coeff=cfg.lbl_coeff,
                            scope=cfg.lbl_scope)

    def forward(self, x, mask=None):
        x = x + self.attn(self.ln1(x))
        y, aux = self.moe(self.ln2(x), mask=mask)
        return x + y, aux


class MoETransformer(nn.Module):
    """``forward(tokens [B, S], mask=None) -> (logits [B, S, vocab], aux loss summed over layers)``;
    ``mask`` [B, S] (nonzero = real token) leaves the other tokens out of the load-balancing
    loss (rows of fixed-shape batches that hold nothing)."""

    def __init__(self, cfg, vocab: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, cfg.d_model)
        self.pos = nn.Parameter(torch.randn(cfg.seq_len, cfg.d_model) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, vocab, bias=False)

    def forward(self, tokens, mask=None):
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        aux = x.new_zeros(())
        for blk in self.blocks:
            x, a = blk(x, mask)
            aux = aux + a
        return self.head(self.ln_f(x)), aux

    def moe_layers(self) -> list[MoELayer]:
        return [b.moe for b in self.blocks]


@contextlib.contextmanager
def lbl_disabled(model: MoETransformer):
    """Evaluation without the load-balancing loss (no collective, no counts accumulated)."""
    saved = [m.router.lbl for m in model.moe_layers()]
    for m in model.moe_layers():
        m.router.lbl = None
    try:
        yield
    finally:
        for m, lbl in zip(model.moe_layers(), saved):
            m.router.lbl = lbl


def _target_regex(leaf_regex: str) -> str:
    return rf"(.*\.)?({leaf_regex})"


def apply_adapter(model: nn.Module, cfg, num_tasks: int) -> None:
    """Before the first task: ``mora`` (frozen base, MoRA ranks), ``lora`` (frozen base, one
    LoRA adapter of rank ``adapter_rank · tasks``, MoRA's final size) or ``none`` (all trainable)."""
    if cfg.adapter == "mora":
        apply_mora(model, _target_regex(cfg.adapter_targets), rank=cfg.adapter_rank, top_k=cfg.mora_top_k,
                   temperature=cfg.mora_temperature)
    elif cfg.adapter == "lora":
        replace_linears(model, module_matcher(_target_regex(cfg.adapter_targets)),
                        lambda linear: LoRALinear(linear, cfg.adapter_rank * num_tasks),
                        no_match=f"adapter_targets={cfg.adapter_targets!r} matched no nn.Linear")


def next_task_adapter(model: nn.Module, cfg) -> None:
    """Between tasks: MoRA freezes the ranks learned so far and appends new ones."""
    if cfg.adapter == "mora":
        add_task(model, cfg.adapter_rank)
