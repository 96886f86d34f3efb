"""FusedPrioritizedSampler side by side with TorchRL 0.14.1's own PrioritizedSampler, given the
same items and priorities: the same stored weights (p + eps)^alpha, the same default priority
for new items, the same sampling distribution (chi-square of each against the exact
probabilities read from TorchRL's sum tree, and of the two count vectors against each other),
and the same importance weights for the same slots.

TorchRL's PrioritizedSampler needs TorchRL's compiled segment trees, which are built for
torch 2.14 and do not load beside torch 2.13 (the main environment). This file therefore runs
in an environment with torch 2.14.1 + torchrl 0.14.1 and a trainops built against it:
scripts/check_torchrl_stock.sh sets one up and runs it. Elsewhere the module is skipped with
that reason; tests/test_replay_torchrl.py covers the conventions in every environment."""
import math

import pytest
import torch

import trainops

torchrl_prioritized = pytest.importorskip("torchrl.data.replay_buffers.samplers.prioritized")
if torchrl_prioritized.SumSegmentTreeFp32 is None:
    pytest.skip("TorchRL's compiled segment trees do not load with this torch (they need torch 2.14): "
                "run scripts/check_torchrl_stock.sh", allow_module_level=True)
if not trainops.has_extension():
    pytest.skip("trainops._C not built for this torch", allow_module_level=True)

from tensordict import TensorDict  # noqa: E402
from torchrl.data import LazyTensorStorage, ReplayBuffer  # noqa: E402
from torchrl.data.replay_buffers.samplers import PrioritizedSampler  # noqa: E402

from trainops.replay.torchrl import FusedPrioritizedSampler  # noqa: E402

Z_1E4 = 3.719  # standard normal quantile at 1 - 1e-4
CAP, N, ALPHA, BETA, EPS = 128, 100, 0.7, 0.5, 0.05


def chi2_threshold(dof: int) -> float:
    """Upper 1e-4 quantile of chi-square(dof) (Wilson-Hilferty)."""
    a = 2.0 / (9.0 * dof)
    return dof * (1.0 - a + Z_1E4 * math.sqrt(a)) ** 3


def pair():
    """The same items and priorities in a stock buffer with each sampler."""
    bufs = []
    for sampler in (PrioritizedSampler(CAP, ALPHA, BETA, eps=EPS),
                    FusedPrioritizedSampler(CAP, ALPHA, BETA, eps=EPS, seed=0)):
        rb = ReplayBuffer(storage=LazyTensorStorage(CAP), sampler=sampler)
        rb.extend(TensorDict({"x": torch.arange(N, dtype=torch.float32)}, [N]))
        rb.update_priority(torch.arange(N), torch.linspace(0.0, 3.0, N) ** 2)
        bufs.append(rb)
    return bufs


def stock_weights(rb) -> torch.Tensor:
    tree = rb._sampler._sum_tree
    return torch.tensor([tree[i] for i in range(CAP)], dtype=torch.float64)


def test_same_stored_weights_and_default_priority():
    stock, fused = pair()
    torch.testing.assert_close(fused._sampler._weights.double(), stock_weights(stock), rtol=1e-6, atol=0)
    for rb in (stock, fused):  # new items: the largest raw priority so far, transformed once
        rb.extend(TensorDict({"x": torch.zeros(5)}, [5]))
    torch.testing.assert_close(fused._sampler._weights.double(), stock_weights(stock), rtol=1e-6, atol=0)
    for rb in (stock, fused):
        rb._sampler.alpha = 0.4  # annealing alpha re-weighs the stored items in both
    torch.testing.assert_close(fused._sampler._weights.double(), stock_weights(stock), rtol=1e-5, atol=0)


def test_same_distribution_and_importance_weights():
    torch.manual_seed(0)
    import numpy as np

    np.random.seed(0)  # TorchRL's CPU sampler draws with numpy
    stock, fused = pair()
    probs = stock_weights(stock)[:N]
    probs = probs / probs.sum()
    counts = {}
    weight_of = {}
    for name, rb in (("stock", stock), ("fused", fused)):
        c = torch.zeros(N, dtype=torch.float64)
        w = {}
        for _ in range(40):
            _, info = rb.sample(500, return_info=True)
            idx = torch.as_tensor(info["index"])
            c += torch.bincount(idx, minlength=N).double()
            w.update(zip(idx.tolist(), torch.as_tensor(info["priority_weight"]).double().tolist()))
        counts[name], weight_of[name] = c, w
    for name, c in counts.items():
        expected = probs * c.sum()
        keep = expected > 0
        stat = float(((c[keep] - expected[keep]) ** 2 / expected[keep]).sum())
        assert stat < chi2_threshold(int(keep.sum()) - 1), name
    # the two samples come from one distribution (chi-square test of homogeneity)
    a, b = counts["stock"], counts["fused"]
    keep = (a + b) > 0
    pooled = (a + b)[keep] / (a + b).sum()
    stat = float((((a[keep] - pooled * a.sum()) ** 2) / (pooled * a.sum())).sum()
                 + (((b[keep] - pooled * b.sum()) ** 2) / (pooled * b.sum())).sum())
    assert stat < chi2_threshold(int(keep.sum()) - 1)
    common = sorted(set(weight_of["stock"]) & set(weight_of["fused"]))
    assert len(common) > N // 2
    got = torch.tensor([weight_of["fused"][i] for i in common])
    want = torch.tensor([weight_of["stock"][i] for i in common])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
