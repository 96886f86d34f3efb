"""trainops.kernels.mora, the Triton kernels of MoRA (interpreter on CPU, or a GPU), against
the literal reference: forward and (dx, dA, dB), rank banks wider than a tile, and the
dropout stream shared with the ATen path."""
import pytest
import torch

import trainops  # noqa: F401  (registers the ops)
from trainops.ops import mora
from trainops.ops.mora import num_selected
from test_mora import CASES, HP, close, make, reference


@pytest.mark.parametrize("T,D,N,F,Rt,top_k,training,dropout_p", CASES)
def test_triton_kernels_match_reference(triton_device, T, D, N, F, Rt, top_k, training, dropout_p):
    from trainops.kernels import mora as km

    x, Af, Bf, A, B = make(T, D, N, F, Rt, requires_grad=False)
    dy = torch.randn(T, N, generator=torch.Generator().manual_seed(1))
    kw = dict(top_k=top_k, training=training, scaling=0.5, dropout_p=dropout_p, seed=1234, **HP)
    exp_out, exp_dx, exp_dA, exp_dB = reference(x, Af, Bf, A, B, dy, **kw)
    dev = triton_device
    args = [t.to(dev) for t in (x, Af, Bf, A, B)]
    Bf_strided = args[2].t().contiguous().t()  # a column slice of a bank: non-contiguous
    out, p, idx, rho = km.mora_forward(args[0], args[1], Bf_strided, args[3], args[4], top_k, HP["temperature"],
                                       HP["threshold"], training, 0.5, dropout_p, 1234)
    assert idx.shape == (T, num_selected(top_k, F + Rt))
    close(out.cpu().double(), exp_out)
    dx, dA, dB = km.mora_backward(dy.to(dev), args[0], args[1], Bf_strided, args[3], args[4], p, idx, rho, top_k,
                                  HP["temperature"], HP["threshold"], training, 0.5, dropout_p, 1234)
    close(dx.cpu().double(), exp_dx, 1e-3)
    close(dA.cpu().double(), exp_dA, 1e-3)
    close(dB.cpu().double(), exp_dB, 1e-3)


def test_triton_large_rank_bank(triton_device):
    """R=160 (tile 256), k=16: the top-k by repeated row max over a wide tile."""
    from trainops.kernels import mora as km

    x, Af, Bf, A, B = make(5, 16, 16, 96, 64, requires_grad=False)
    dy = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    exp_out, exp_dx, exp_dA, exp_dB = reference(x, Af, Bf, A, B, dy, top_k=16, training=True, scaling=1.0, **HP)
    out, p, idx, rho = km.mora_forward(x, Af, Bf, A, B, 16, HP["temperature"], HP["threshold"], True, 1.0, 0.0, 0)
    close(out.double(), exp_out)
    dx, dA, dB = km.mora_backward(dy, x, Af, Bf, A, B, p, idx, rho, 16, HP["temperature"], HP["threshold"], True,
                                  1.0, 0.0, 0)
    close(dx.double(), exp_dx, 1e-3)
    close(dA.double(), exp_dA, 1e-3)
    close(dB.double(), exp_dB, 1e-3)


def test_dropout_matches_aten(triton_device):
    """Dropout is a counter-based hash of the element index: Triton and ATen drop the same elements."""
    from trainops.kernels import mora as km

    x, Af, Bf, A, B = make(13, 20, 9, 0, 6, requires_grad=False)
    aten = mora(x, A, B, seed=7, top_k=3, training=True, scaling=1.0, dropout_p=0.5, **HP)
    dev = triton_device
    t_out = km.mora_forward(*(t.to(dev) for t in (x, Af, Bf, A, B)), 3, HP["temperature"], HP["threshold"],
                            True, 1.0, 0.5, 7)[0]
    close(t_out.cpu(), aten)
