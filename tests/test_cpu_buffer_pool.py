"""The CPU buffer pool (csrc/cpu/buffer_pool.h) behind the router's outputs."""
import pytest
import torch

import trainops

pytestmark = pytest.mark.skipif(not trainops.has_extension(), reason="C++ extension not built")


@pytest.fixture(autouse=True)
def empty_pool():
    torch.ops.trainops.cpu_pool_empty()
    yield
    torch.ops.trainops.cpu_pool_empty()
    assert torch.ops.trainops.cpu_pool_cached_bytes() == 0


def _step(x, k):
    x.grad = None
    w, _, counts, prob_sum = trainops.ops.router_topk(x, k)
    ((w * w).sum() + prob_sum.sum()).backward()
    return x.grad


def test_buffers_are_reused_and_results_unchanged(monkeypatch):
    monkeypatch.setenv("TRAINOPS_CPU_POOL_MB", "256")
    x = torch.randn(8192, 64, requires_grad=True)  # 2 MiB gradient: pooled
    first = _step(x, 4).clone()
    small = 8192 * 4 * (4 + 8)  # the weights and indices, freed with the graph
    assert torch.ops.trainops.cpu_pool_cached_bytes() >= small
    x.grad = None
    assert torch.ops.trainops.cpu_pool_cached_bytes() >= small + 8192 * 64 * 4  # and the gradient
    ptrs = set()
    for _ in range(3):
        g = _step(x, 4)
        ptrs.add(g.data_ptr())
        torch.testing.assert_close(g, first, rtol=0, atol=0)  # reused memory, same bits
    assert len(ptrs) <= 2  # the same blocks come back


def test_pool_limit_and_off(monkeypatch):
    monkeypatch.setenv("TRAINOPS_CPU_POOL_MB", "0")
    x = torch.randn(8192, 64, requires_grad=True)
    reference = _step(x, 4).clone()
    x.grad = None
    assert torch.ops.trainops.cpu_pool_cached_bytes() == 0  # freeing with the pool off empties it
    monkeypatch.setenv("TRAINOPS_CPU_POOL_MB", "3")  # room for one 2 MiB block only
    g = _step(x, 4)
    torch.testing.assert_close(g, reference, rtol=0, atol=0)
    x.grad = None
    assert 0 < torch.ops.trainops.cpu_pool_cached_bytes() <= 3 << 20


def test_small_outputs_are_not_pooled(monkeypatch):
    monkeypatch.setenv("TRAINOPS_CPU_POOL_MB", "0")
    x = torch.randn(64, 64, requires_grad=True)
    _step(x, 2)
    monkeypatch.setenv("TRAINOPS_CPU_POOL_MB", "256")
    x.grad = None
    _step(x, 2)
    x.grad = None
    assert torch.ops.trainops.cpu_pool_cached_bytes() == 0


def test_pooled_tensors_behave_like_any_other(monkeypatch):
    import copy
    import io
    monkeypatch.setenv("TRAINOPS_CPU_POOL_MB", "256")
    x = torch.randn(8192, 64, requires_grad=True)
    g = _step(x, 4)
    assert g.is_contiguous() and g.storage_offset() == 0
    assert torch.equal(copy.deepcopy(g), g)
    buf = io.BytesIO()
    torch.save(g, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf), g)
    w, idx, _, _ = trainops.ops.router_topk(x.detach(), 4)
    grown = idx.clone().resize_(3 * 8192, 4)  # a copy grows like any tensor
    assert torch.equal(grown[:8192], idx)
    with pytest.raises(RuntimeError, match="not resizable"):  # a pooled block does not grow in place:
        idx.resize_(3 * 8192, 4)  # the stable ABI has no resizable storage with a custom deleter
    w.resize_(10, 4)  # shrinks in place
    assert w.shape == (10, 4)
