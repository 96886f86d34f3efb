"""Load-balancing loss for MoE routers, with the global-batch scope of "Demons in the
Detail" (arXiv 2501.11873).

    LBL = coeff · N_E · Σ_i f_i · P_i,   f_i = count_i / (K · T_f),   P_i = prob_sum_i / T_local

``micro_batch``: f from this micro-batch's local tokens (Switch Transformer).
``sequence``: the same per sequence, averaged over sequences (DeepSeek-V3's
sequence-wise balance loss).
``global``: counts and valid-token totals all-reduced over ``group`` (one small int64
all-reduce per call) and accumulated over gradient-accumulation micro-batches until
:meth:`LoadBalancingLoss.reset` — micro-batch m uses the counts of 1..m (the paper's
Algorithm 1). Only f is synchronized; P stays local and carries the gradient.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from trainops._validation import CheckedFloat, check_finite_float, check_int
from trainops.nn._state import CheckedLoad, nonnegative
from trainops.nn.global_counts import (SNAPSHOTS, accumulate_global, all_reduce_counts, count_buffer, group_name,
                                      in_backward)
from trainops._router_scores import probability, router_scores

__all__ = ["LoadBalancingLoss", "GlobalCountSync", "reset_load_balancing", "register_reset_hook", "SCOPES"]

SCOPES = ("micro_batch", "sequence", "global")


def _parse_scope(scope) -> dict[str, float]:
    if isinstance(scope, str):
        scopes = {scope: 1.0}
    elif isinstance(scope, Mapping):
        scopes = {str(k): check_finite_float(f"scope weight of {k!r}", v, lo=0.0) for k, v in scope.items()}
    else:
        raise TypeError(f"scope must be a str or a mapping scope -> weight, got {type(scope).__name__}")
    if not scopes:
        raise ValueError("scope must name at least one of " + ", ".join(SCOPES))
    for name in scopes:
        if name not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)} (or a mapping of them), got {name!r}")
    return scopes


class LoadBalancingLoss(CheckedLoad, nn.Module):
    """Auxiliary load-balancing loss of one MoE layer.

    Args:
        num_experts: N_E.
        top_k: K, experts per token.
        coeff: loss weight; a perfectly balanced router gives ``coeff`` (times the scope weights).
        scope: ``"global"``, ``"micro_batch"``, ``"sequence"``, or a mapping scope → weight to
            combine them, e.g. ``{"global": 1.0, "micro_batch": 0.01}`` (the paper's recipe).
        group: process group of the data-parallel ranks whose counts are summed (global scope);
            ``None``: the default group when torch.distributed is initialized.

    The accumulated global counts are buffers (``acc_counts``, ``acc_tokens``), so they are
    saved in ``state_dict``; loading checks them (shape, integer, >= 0) before copying either,
    and forgets the recomputation snapshots of earlier forwards. A forward that runs during
    backward (activation recomputation) reuses the statistics of its original forward instead
    of adding the counts again.
    """

    _STATE_CHECKS = {"acc_counts": nonnegative, "acc_tokens": nonnegative}
    coeff = CheckedFloat(lo=0.0)  # checked on every assignment

    def __init__(self, num_experts: int, top_k: int, coeff: float, scope="global", group=None):
        super().__init__()
        check_int("num_experts", num_experts, lo=1)
        check_int("top_k (at most num_experts)", top_k, lo=1, hi=num_experts)
        self.num_experts, self.top_k = num_experts, top_k
        self.coeff = coeff
        self.scopes = _parse_scope(scope)
        self.group = group
        self.register_buffer("acc_counts", torch.zeros(num_experts, dtype=torch.int64))
        self.register_buffer("acc_tokens", torch.zeros((), dtype=torch.int64))
        # What a recomputed forward looks up (see trainops.nn.global_counts). Plain tensors,
        # not buffers: they hold this rank's local counts, which DDP's buffer broadcast would
        # overwrite with rank 0's; they follow acc_counts to its device at first use. The
        # number written stays a host tensor, so the forward never reads the device for it.
        self._snap_counts = torch.zeros(SNAPSHOTS, num_experts, dtype=torch.int64)
        self._snap_totals = torch.zeros(SNAPSHOTS, num_experts + 1, dtype=torch.int64)
        self._snap_len = torch.zeros((), dtype=torch.int64)
        self._group_name = group_name(group)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, coeff={self.coeff}, scope={self.scopes}"

    @property
    def scope(self):
        return next(iter(self.scopes)) if len(self.scopes) == 1 else dict(self.scopes)

    def _after_load(self) -> None:
        self._snap_len.zero_()  # snapshots of forwards before the load no longer match its counts

    def reset(self) -> None:
        """Start a new global batch (call after each optimizer step)."""
        self.acc_counts.zero_()
        self.acc_tokens.zero_()
        self._snap_len.zero_()

    def global_stats(self, counts: torch.Tensor, num_tokens, reduced: torch.Tensor | None = None):
        """(accumulated counts [E], accumulated valid tokens) including this call's
        micro-batch summed over the group (``reduced``: that sum, already all-reduced);
        idempotent under recomputation. One op, ``trainops::lbl_accumulate_global``."""
        if self._snap_counts.device != self.acc_counts.device:  # the module has moved
            self._snap_counts = self._snap_counts.to(self.acc_counts.device)
            self._snap_totals = self._snap_totals.to(self.acc_counts.device)
        totals = accumulate_global(self.acc_counts, self.acc_tokens, self._snap_counts, self._snap_totals,
                                   self._snap_len, counts, torch.as_tensor(num_tokens, device=counts.device),
                                   reduced, self._group_name)
        return totals[:-1], totals[-1]

    def forward(self, counts: torch.Tensor, prob_sum: torch.Tensor, num_tokens=None, *,
                logits: torch.Tensor | None = None, indices: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, seq_len: int | None = None,
                score: str = "softmax") -> torch.Tensor:
        """Loss of one micro-batch from the router statistics of ``trainops.ops.router_topk``.

        ``counts`` [E] (local selection counts), ``prob_sum`` [E] (local sums of the score
        distribution, differentiable), ``num_tokens``: local valid tokens (default
        counts.sum() / K). The ``sequence`` scope also needs ``logits`` [B·S, E],
        ``indices`` [B·S, K], ``seq_len`` = S and ``mask`` if any.
        """
        num_tokens = self._check_stats(counts, prob_sum, num_tokens)
        return self._loss(counts, prob_sum, num_tokens, None, logits, indices, mask, seq_len, score)

    def deferred(self, counts: torch.Tensor, prob_sum: torch.Tensor, num_tokens=None, *,
                 sync: "GlobalCountSync", **kwargs):
        """:meth:`forward` with the global scope's all-reduce batched into ``sync`` (shared by
        the layers of a model): returns a function that gives the loss once ``sync.run()``
        has reduced every layer's counts in one collective. Same arguments and result as
        :meth:`forward`. Modules without the global scope compute theirs at once and never
        wait on ``sync``, nor does a recomputed forward (activation checkpointing). Under
        torch.compile the whole exchange stays in the graph."""
        num_tokens = self._check_stats(counts, prob_sum, num_tokens)
        if "global" not in self.scopes:
            loss = self(counts, prob_sum, num_tokens, **kwargs)
            return lambda: loss
        if not torch.compiler.is_compiling() and in_backward():
            # Recomputation: as in the original forward, nothing here saves tensors for
            # backward (non-reentrant checkpointing matches them one by one); the loss, if
            # asked for, is the original's (global counts looked up, no collective).
            return lambda: self(counts, prob_sum, num_tokens, **kwargs)
        if sync.group is not self.group:
            raise ValueError("deferred: sync.group must be this module's group (the counts are summed over it)")
        ticket = sync.add(counts, torch.as_tensor(num_tokens, device=counts.device), self.acc_counts.device)

        def loss() -> torch.Tensor:
            return self._loss(counts, prob_sum, num_tokens, sync.result(ticket), **kwargs)

        return loss

    def _check_stats(self, counts, prob_sum, num_tokens):
        E, K = self.num_experts, self.top_k
        if counts.shape != (E,) or prob_sum.shape != (E,):
            raise ValueError(f"counts and prob_sum must have shape [{E}], got {tuple(counts.shape)} and "
                             f"{tuple(prob_sum.shape)}")
        return counts.sum() // K if num_tokens is None else num_tokens

    def _loss(self, counts, prob_sum, num_tokens, reduced, logits=None, indices=None, mask=None, seq_len=None,
              score="softmax") -> torch.Tensor:
        """The loss; ``reduced``: this call's [counts, tokens] already summed over the group
        (by GlobalCountSync), or None."""
        E, K = self.num_experts, self.top_k
        # The f-scopes are linear in P = prob_sum / n: their sum is <c, prob_sum> with the
        # per-expert constant c = coeff · Σ_scope weight · N_E · f_scope / n (no gradient):
        # one autograd node instead of a chain of small ones.
        if isinstance(num_tokens, torch.Tensor):
            num_tokens = num_tokens.to(counts.device)
            n = num_tokens.clamp_min(1).to(torch.float32)
            n_dev = n.to(prob_sum.device)
        else:  # a Python number: the scale stays on the host
            n = n_dev = float(max(num_tokens, 1))
        coef = None
        seq_total = None
        for name in self.scopes:
            weight = self.scopes[name]
            if name == "sequence":
                term = (self.coeff * weight) * self._sequence_term(logits, indices, mask, seq_len, score)
                seq_total = term if seq_total is None else seq_total + term
                continue
            if name == "micro_batch":
                term = counts.to(torch.float32) * (self.coeff * weight * E / K) / (n * n)
            else:
                acc_counts, acc_tokens = self.global_stats(counts, num_tokens, reduced)
                acc_n = acc_tokens.clamp_min(1).to(prob_sum.device, torch.float32)
                term = acc_counts.to(prob_sum.device, torch.float32) * (self.coeff * weight * E / K) / (acc_n * n_dev)
            coef = term if coef is None else coef + term
        total = seq_total
        if coef is not None:
            total = torch.dot(coef.to(prob_sum.device), prob_sum.to(torch.float32))
            if seq_total is not None:
                total = total + seq_total
        return total

    def _sequence_term(self, logits, indices, mask, seq_len, score) -> torch.Tensor:
        # Composed PyTorch: per-sequence statistics are a segmented reduction the fused op
        # does not produce; the cost is one extra pass over the logits.
        if logits is None or indices is None or seq_len is None:
            raise ValueError("scope 'sequence' needs logits, indices and seq_len")
        T, E = logits.shape
        if seq_len < 1 or T % seq_len:
            raise ValueError(f"seq_len must divide the number of tokens {T}, got {seq_len}")
        B = T // seq_len
        valid = (torch.ones(T, dtype=torch.bool, device=logits.device) if mask is None
                 else mask.reshape(-1).bool()).view(B, seq_len)
        p = probability(router_scores(logits, score), score).view(B, seq_len, E) * valid[..., None]
        n = valid.sum(1)
        hits = torch.zeros(B, seq_len, E, dtype=torch.float32, device=logits.device)
        hits.scatter_(2, indices.view(B, seq_len, -1), 1.0)
        counts = (hits * valid[..., None]).sum(1)
        nf = n.clamp_min(1).to(torch.float32)[:, None]
        per_seq = E * ((counts / (self.top_k * nf)) * (p.sum(1) / nf)).sum(1)
        has = (n > 0).to(torch.float32)
        return (per_seq * has).sum() / has.sum().clamp_min(1)


class GlobalCountSync:
    """One all-reduce for the global-scope counts of several :class:`LoadBalancingLoss`
    modules (every MoE layer of a model) instead of one per module: the issue's "one per
    step when batched". Each layer's loss then waits until the end of the forward, so the
    per-layer collectives' overlap with compute is traded for a single collective, which
    is the better trade when collectives are latency-bound (many layers, many nodes)::

        sync = GlobalCountSync(group)
        terms = [lbl.deferred(counts, prob_sum, sync=sync) for lbl, counts, prob_sum in layers]
        sync.run()
        aux = sum(term() for term in terms)

    Use a new one per forward. Integer sums: the result equals per-layer all-reduces'.
    """

    def __init__(self, group=None):
        self.group = group
        self._group_name = group_name(group)
        self._parts: list[torch.Tensor] = []
        self._reduced = None

    def add(self, counts: torch.Tensor, num_tokens: torch.Tensor, device) -> int:
        """Queue one module's [counts, valid tokens]; returns its ticket for :meth:`result`."""
        if self._reduced is not None:
            raise RuntimeError("GlobalCountSync.add after run(): use a new GlobalCountSync per forward")
        self._parts.append(count_buffer(counts, num_tokens, device))
        return len(self._parts) - 1

    def run(self) -> None:
        """The single all-reduce (none with one process); idempotent. An op
        (``trainops::all_reduce_counts``), so that torch.compile keeps it in the graph."""
        if self._reduced is not None:
            return
        if not self._parts:
            self._reduced = ()
            return
        flat = all_reduce_counts(torch.cat(self._parts), self._group_name)
        self._reduced = flat.split([p.numel() for p in self._parts])

    def result(self, ticket: int) -> torch.Tensor:
        """[counts, valid tokens] of ticket's module, summed over the group."""
        if self._reduced is None:
            raise RuntimeError("GlobalCountSync: call run() before evaluating the deferred losses")
        return self._reduced[ticket]


def reset_load_balancing(model: nn.Module, update_bias: bool = True) -> None:
    """After an optimizer step: reset every LoadBalancingLoss in ``model`` (also those held
    by a Hugging Face patch) and apply the pending aux-loss-free bias updates."""
    for m in model.modules():
        if isinstance(m, LoadBalancingLoss):
            m.reset()
        for lbl in getattr(m, "_trainops_lbl_losses", ()):
            lbl.reset()
        if update_bias and hasattr(m, "update_bias") and getattr(m, "expert_bias", None) is not None:
            m.update_bias()


def register_reset_hook(optimizer: torch.optim.Optimizer, model: nn.Module, update_bias: bool = True):
    """Call :func:`reset_load_balancing` after every ``optimizer.step()``; returns the hook handle."""
    return optimizer.register_step_post_hook(lambda opt, args, kwargs: reset_load_balancing(model, update_bias))
