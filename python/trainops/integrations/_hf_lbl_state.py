"""State shared by a causal LM patched by trainops.integrations.transformers and its
routers: the collector of the running forward (padding mask, sequence length, each
layer's load-balancing term) and the training metrics the Trainer callback reads."""
from __future__ import annotations

import torch

from trainops.nn.load_balancing import GlobalCountSync

__all__ = ["_Collector", "_ModelState"]


class _Collector:
    """What one causal-LM forward gives its routers (the padding mask, the sequence length)
    and gets back from them (each layer's load-balancing term)."""

    def __init__(self, mask, seq_len, sync: GlobalCountSync | None = None):
        # terms: tensors, or functions that give them after sync.run() (batched all-reduce)
        self.mask, self.seq_len, self.terms, self.sync = mask, seq_len, [], sync
        self.counts = []  # each layer's local expert counts, for the training metrics
        self.grad_enabled = torch.is_grad_enabled()
        self.tokens = None  # rows routed per layer, checked when a layer is recomputed


class _ModelState:
    """Shared by a patched causal LM and its routers: the collector of the forward that is
    running, if any. A plain attribute rather than a context variable or a thread-local,
    which torch.compile cannot trace (a graph break at every layer); it is per model, so
    different models may run in different threads."""

    def __init__(self):
        self.collector = None
        # The collector of the forward whose backward runs (else of the latest forward):
        # activation checkpointing recomputes its layers during backward, after the forward
        # has returned, and each layer must then repeat its original computation (the same
        # masked routing and loss ops, whose saved tensors non-reentrant checkpointing
        # matches one by one).
        self.last = None
        # Training metrics since the last take_metrics() (GlobalLoadBalancingCallback turns
        # recording on): sum of the aux losses, number of forwards, expert counts [layers, E].
        self.recording = False
        self.aux_sum = self.loads = None
        self.forwards = 0

    def record(self, aux: torch.Tensor, counts: list) -> None:
        aux = aux.detach()
        loads = torch.stack([c.to(aux.device) for c in counts])
        if self.loads is None:
            self.aux_sum, self.loads = aux, loads
        else:
            self.aux_sum, self.loads = self.aux_sum + aux, self.loads + loads
        self.forwards += 1

    def take_metrics(self):
        """(aux sum, forwards, loads [layers, E]) recorded since the last call, then cleared."""
        out = (self.aux_sum, self.forwards, self.loads)
        self.aux_sum = self.loads = None
        self.forwards = 0
        return out

    def backward_started(self, collector, grad) -> None:
        """Hook on a forward's aux loss, whose gradient comes before its layers' (the loss
        is computed after them): that forward's layers are the ones recomputed next, also
        when later forwards ran before this backward (pipelined micro-batches)."""
        self.last = collector
