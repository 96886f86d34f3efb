"""Triton router kernels (kernels/router.py) against the reference: on CUDA, or on CPU
tensors under TRITON_INTERPRET=1 (small shapes: the interpreter is slow)."""
import pytest
import torch

from tolerances import random_sum_tolerance, reduction_tolerance, rounding_tolerance
from trainops import reference as ref
from trainops._triton import triton_runs_on

pytestmark = pytest.mark.skipif(not triton_runs_on("cuda" if torch.cuda.is_available() else "cpu"),
                                reason="Triton cannot run here")


def _run(device, T, E, k, dtype, score, renorm, masked, biased, seed=0):
    from trainops.kernels import router as tr

    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(T, E, generator=g) * 2).to(dtype)
    mask = (torch.rand(T, generator=g) > 0.3) if masked else None
    bias = (torch.randn(E, generator=g) * 0.05) if biased else None
    gw, gp, gz = torch.randn(T, k, generator=g), torch.randn(E, generator=g), torch.randn((), generator=g)
    to = (lambda t: None if t is None else t.to(device))
    w, idx, counts, psum, zsum = tr.router_topk(to(logits), k, score, renorm, to(bias), to(mask), True)
    x = logits.clone().requires_grad_()
    ew, eidx, ecounts, epsum, ez = ref.router_topk(x, k, score=score, renormalize=renorm, expert_bias=bias,
                                                   mask=mask, z_loss=True)
    assert torch.equal(idx.cpu(), eidx)
    assert torch.equal(counts.cpu(), ecounts)
    _assert_stats_close((w, psum, zsum), (ew, epsum, ez), T, E)
    ((ew * gw).sum() + (epsum * gp).sum() + ez * gz).backward()
    grad = tr.router_topk_backward(to(gw), to(gp), to(gz), to(logits), idx, to(mask), score, renorm, True)
    assert grad.dtype == dtype
    _assert_grad_close(grad, x.grad, E, dtype)


def _assert_stats_close(got, want, T, E):
    """Scores, weights and their sums are sums of positive terms computed in fp32 (also for half
    logits): the scores of a row sum E terms (plus an exp / sigmoid of another math library,
    a few ulps), the probability sums and the z-loss add those over T tokens."""
    (w, psum, zsum), (ew, epsum, ez) = got, want
    row = reduction_tolerance(torch.float32, E) + rounding_tolerance(torch.float32, 4)
    total = row + reduction_tolerance(torch.float32, T)
    torch.testing.assert_close(w.cpu(), ew, rtol=row, atol=row)  # weights are in [0, 1]
    torch.testing.assert_close(psum.cpu(), epsum, rtol=total, atol=total * max(1.0, float(epsum.abs().max())))
    torch.testing.assert_close(zsum.cpu(), ez, rtol=2 * total, atol=2 * total)  # lse²: twice lse's relative error


def _assert_grad_close(grad, want, E, dtype, upstream=0.0):
    """The score backward reduces E terms of both signs per row in fp32 (s·(ds − Σ s·ds)), then
    the gradient is stored in the logits' dtype (one rounding on each side); ``upstream``: the
    relative tolerance of an incoming gradient computed from the forward's sums."""
    tol = random_sum_tolerance(E) + upstream + (rounding_tolerance(dtype) if dtype != torch.float32 else 0.0)
    torch.testing.assert_close(grad.cpu().float(), want.float(), rtol=tol, atol=tol * float(want.abs().max()))


@pytest.mark.parametrize("T,E,k", [(1, 8, 1), (37, 13, 3), (20, 130, 8)])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_triton_matches_reference(triton_device, T, E, k, score):
    _run(triton_device, T, E, k, torch.float32, score, True, False, False)
    _run(triton_device, T, E, k, torch.float32, score, False, True, True, seed=1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_half(triton_device, dtype):
    _run(triton_device, 19, 24, 4, dtype, "softmax", True, True, False)


def test_triton_ties_and_determinism(triton_device):
    from trainops.kernels import router as tr

    logits = torch.zeros(5, 6, device=triton_device)
    logits[1, 4] = logits[1, 2] = 1.0
    a = tr.router_topk(logits, 3, "softmax", True, None, None, True)
    b = tr.router_topk(logits, 3, "softmax", True, None, None, True)
    assert a[1][0].tolist() == [0, 1, 2] and a[1][1].tolist() == [2, 4, 0]
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.gpu
def test_cuda_op_dispatch_and_grad():
    from trainops.ops import router_topk

    torch.manual_seed(0)
    logits = torch.randn(4096, 64, device="cuda", requires_grad=True)
    w, idx, counts, psum = router_topk(logits, 8)
    x = logits.detach().cpu().requires_grad_()
    ew, eidx, ecounts, epsum = ref.router_topk(x, 8)
    assert torch.equal(idx.cpu(), eidx) and torch.equal(counts.cpu(), ecounts)
    total = reduction_tolerance(torch.float32, 64) + rounding_tolerance(torch.float32, 4) + \
        reduction_tolerance(torch.float32, 4096)
    torch.testing.assert_close(psum.cpu(), epsum, rtol=total, atol=total * float(epsum.abs().max()))
    (w.sum() + psum.pow(2).sum()).backward()
    (ew.sum() + epsum.pow(2).sum()).backward()
    _assert_grad_close(logits.grad, x.grad, 64, torch.float32, upstream=total)  # d(psum²) = 2·psum·d(psum)
    torch.library.opcheck(torch.ops.trainops.router_topk.default,
                          (logits.detach().requires_grad_(), 4, "softmax", True, None, None, True))
