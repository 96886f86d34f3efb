"""Replay buffers: :class:`ReplayBuffer` (fused device-resident sampling, PER, recency,
power-law rehearsal, reservoir eviction, RLEP grouped replay; dict or TensorDict rows).
For TorchRL's own buffers: ``trainops.replay.torchrl.FusedPrioritizedSampler`` (needs torchrl;
not imported here, so ``import trainops`` does not import torchrl or tensordict)."""
from trainops.replay.buffer import EVICTIONS, SAMPLERS, GroupBatch, ReplayBatch, ReplayBuffer

__all__ = ["ReplayBuffer", "ReplayBatch", "GroupBatch", "SAMPLERS", "EVICTIONS"]
