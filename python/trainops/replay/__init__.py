"""Replay buffers: :class:`ReplayBuffer` (fused device-resident sampling, PER, recency,
power-law rehearsal, reservoir eviction, RLEP grouped replay)."""
from trainops.replay.buffer import EVICTIONS, SAMPLERS, GroupBatch, ReplayBatch, ReplayBuffer

__all__ = ["ReplayBuffer", "ReplayBatch", "GroupBatch", "SAMPLERS", "EVICTIONS"]
