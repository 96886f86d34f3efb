"""Host-side reads of small tensors for the replay buffers' argument checks."""
from __future__ import annotations

import torch


def host_range(t: torch.Tensor) -> tuple:
    """(min, max) of a non-empty tensor as Python numbers (NaN if it holds one). A CPU tensor is
    read through NumPy (a view, no copy), whose reductions cost a fraction of torch's per-call
    dispatch at small sizes; elsewhere both reductions come back in one host read."""
    if t.device.type == "cpu":
        a = t.detach().numpy()
        return a.min().item(), a.max().item()
    lo, hi = torch.aminmax(t)
    return tuple(torch.stack([lo.double(), hi.double()]).tolist())
