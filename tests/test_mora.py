"""trainops.ops.mora on CPU (the ATen path) against the literal reference: outputs and
gradients (gradcheck in fp64), dropout seeds, frozen ranks, opcheck, errors. The Triton
kernels: tests/test_mora_triton.py."""
import pytest
import torch

import trainops  # noqa: F401  (registers the ops)
from trainops.ops import mora, mora_routing
from trainops.reference.mora import mora as ref_mora

HP = dict(temperature=0.03, threshold=0.2)


def make(T, D, N, F, Rt, dtype=torch.float32, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g, dtype=torch.float64).to(dtype)
    A = (torch.randn(Rt, D, generator=g, dtype=torch.float64) / D**0.5).to(dtype)
    B = torch.randn(N, Rt, generator=g, dtype=torch.float64).to(dtype)
    Af = (torch.randn(F, D, generator=g, dtype=torch.float64) / D**0.5).to(dtype)
    Bf = torch.randn(N, F, generator=g, dtype=torch.float64).to(dtype)
    for t in (x, A, B):
        t.requires_grad_(requires_grad)
    return x, Af, Bf, A, B


def close(actual, expected, tol=2e-4):
    scale = expected.abs().max().clamp_min(1e-6)
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * float(scale))


def reference(x, Af, Bf, A, B, dy, **kw):
    """Forward and (dx, dA, dB) of the literal reference, in fp64."""
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))
    out = ref_mora(x64, A64, B64, frozen_A=Af.double() if Af.shape[0] else None,
                   frozen_B=Bf.double() if Af.shape[0] else None, **kw)
    out.backward(dy.double())
    return out.detach(), x64.grad, A64.grad, B64.grad


# T, D, N, frozen ranks, trainable ranks, top_k, training, dropout_p
CASES = [
    (1, 24, 40, 0, 2, 1, True, 0.0),      # T=1, R=2, k raised to 2
    (37, 24, 40, 5, 3, 4, True, 0.0),     # frozen + trainable sources, odd sizes
    (37, 24, 40, 5, 3, 16, False, 0.0),   # k >= R, eval pruning
    (19, 33, 17, 16, 17, 8, False, 0.0),  # R=33: not a power of two
    (21, 24, 40, 0, 12, 3, True, 0.25),   # dropout with a seed
]


@pytest.mark.parametrize("T,D,N,F,Rt,top_k,training,dropout_p",
                         CASES + [(9, 20, 12, 100, 156, 8, True, 0.0), (9, 20, 12, 0, 256, 300, False, 0.0)])
def test_aten_matches_reference(T, D, N, F, Rt, top_k, training, dropout_p):
    x, Af, Bf, A, B = make(T, D, N, F, Rt)
    dy = torch.randn(T, N, generator=torch.Generator().manual_seed(1))
    kw = dict(top_k=top_k, training=training, scaling=0.5, dropout_p=dropout_p, seed=99, **HP)
    exp_out, exp_dx, exp_dA, exp_dB = reference(x, Af, Bf, A, B, dy, **kw)
    out = mora(x, A, B, frozen_A=Af if F else None, frozen_B=Bf if F else None, **kw)
    close(out.double(), exp_out)
    out.backward(dy)
    close(x.grad.double(), exp_dx, 1e-3)
    close(A.grad.double(), exp_dA, 1e-3)
    close(B.grad.double(), exp_dB, 1e-3)


@pytest.mark.parametrize("training,dropout_p,F", [(True, 0.0, 0), (False, 0.0, 3), (True, 0.3, 4)])
def test_gradcheck_fp64(training, dropout_p, F):
    x, Af, Bf, A, B = make(5, 7, 6, F, 5, dtype=torch.float64)
    # A moderate temperature keeps finite differences away from the softmax's saturation.
    fn = lambda x, A, B: mora(x, A, B, top_k=3, temperature=0.5, threshold=0.1, training=training,  # noqa: E731
                              scaling=0.7, dropout_p=dropout_p, seed=5,
                              frozen_A=Af if F else None, frozen_B=Bf if F else None)
    assert torch.autograd.gradcheck(fn, (x, A, B), eps=1e-6, atol=1e-5)


def test_frozen_ranks_get_no_gradient():
    x, Af, Bf, A, B = make(8, 12, 10, 4, 4)
    Af.requires_grad_(False)
    Bf.requires_grad_(False)
    mora(x, A, B, frozen_A=Af, frozen_B=Bf, top_k=4).sum().backward()
    assert Af.grad is None and Bf.grad is None
    assert A.grad.shape == A.shape and B.grad.shape == B.shape and A.grad.abs().sum() > 0


def test_dropout_seed_reproducible():
    x, Af, Bf, A, B = make(13, 20, 9, 0, 6, requires_grad=False)
    kw = dict(top_k=3, training=True, scaling=1.0, dropout_p=0.5, **HP)
    a = mora(x, A, B, seed=7, **kw)
    torch.testing.assert_close(a, mora(x, A, B, seed=7, **kw), rtol=0, atol=0)
    assert not torch.allclose(a, mora(x, A, B, seed=8, **kw))
    torch.manual_seed(3)
    b = mora(x, A, B, seed=None, **kw)
    torch.manual_seed(3)
    torch.testing.assert_close(b, mora(x, A, B, seed=None, **kw), rtol=0, atol=0)
    # Dropout is a training-time thing: eval ignores dropout_p.
    torch.testing.assert_close(mora(x, A, B, seed=7, **{**kw, "training": False}),
                               mora(x, A, B, seed=8, **{**kw, "training": False}), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("adapter_fp32", [False, True])
def test_low_precision_activations(dtype, adapter_fp32):
    x, Af, Bf, A, B = make(11, 32, 24, 0, 8, requires_grad=False)
    xl = x.to(dtype)
    Al, Bl = (A, B) if adapter_fp32 else (A.to(dtype), B.to(dtype))
    out = mora(xl, Al, Bl, top_k=4, temperature=0.3, training=False, threshold=-1.0)
    assert out.dtype == dtype
    exp = ref_mora(xl.float(), Al.float(), Bl.float(), top_k=4, temperature=0.3, training=False, threshold=-1.0)
    torch.testing.assert_close(out.float(), exp, rtol=2e-2, atol=2e-2 * float(exp.abs().max()))


def test_routing_outputs():
    x, Af, Bf, A, B = make(6, 10, 5, 0, 9, requires_grad=False)
    delta, p, idx, rho = mora_routing(x.view(2, 3, 10), A, B, top_k=4)
    assert delta.shape == (2, 3, 5) and p.shape == (6, 9) and idx.shape == (6, 4) and rho.shape == (6,)
    torch.testing.assert_close(p, x @ A.t())
    s = p * rho[:, None]
    torch.testing.assert_close(s.gather(1, idx), s.topk(4, dim=1).values)


def test_opcheck():
    x, Af, Bf, A, B = make(7, 12, 10, 3, 5)
    args = (x, Af, Bf, A, B, 4, 0.1, 0.2, True, 0.5, 0.2, 11)
    torch.library.opcheck(torch.ops.trainops.mora_fwd.default, args)
    out, p, idx, rho = torch.ops.trainops.mora_fwd(*args)
    dy = torch.randn_like(out)
    bargs = (dy, x.detach(), Af, Bf, A.detach(), B.detach(), p.detach(), idx, rho.detach(), 4, 0.1, 0.2, True,
             0.5, 0.2, 11, True, True, False)
    torch.library.opcheck(torch.ops.trainops.mora_bwd.default, bargs)


def test_bad_inputs():
    x, Af, Bf, A, B = make(4, 8, 6, 2, 3, requires_grad=False)
    with pytest.raises(ValueError, match="top_k"):
        mora(x, A, B, top_k=0)
    with pytest.raises(TypeError, match="top_k"):
        mora(x, A, B, top_k=2.5)
    with pytest.raises(ValueError, match="temperature"):
        mora(x, A, B, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        mora(x, A, B, temperature=-1.0)
    with pytest.raises(ValueError, match="A must have shape"):
        mora(x, A[:, :5], B)
    with pytest.raises(ValueError, match="B must have shape"):
        mora(x, A, B[:, :2])
    with pytest.raises(ValueError, match="frozen_B must have shape"):
        mora(x, A, B, frozen_A=Af, frozen_B=Bf[:, :1])
    with pytest.raises(ValueError, match="together"):
        mora(x, A, B, frozen_A=Af)
    with pytest.raises(TypeError, match="x must have dtype"):
        mora(x.int(), A, B)
    with pytest.raises(TypeError, match="A must have dtype"):
        mora(x, A.half(), B)  # low-precision adapters need low-precision activations
    with pytest.raises(TypeError, match="B must have dtype"):
        mora(x, A, B.double())
    with pytest.raises(ValueError, match="x is empty"):
        mora(x[:0], A, B)
    with pytest.raises(ValueError, match="dropout_p"):
        mora(x, A, B, dropout_p=1.0)
    with pytest.raises(ValueError, match="x contains NaN"):
        mora(torch.full_like(x, float("nan")), A, B)
    with pytest.raises(TypeError, match="seed"):
        mora(x, A, B, dropout_p=0.1, seed="1")


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=20, deadline=None)
@given(T=st.integers(1, 9), D=st.integers(1, 10), N=st.integers(1, 7), F=st.integers(0, 5), Rt=st.integers(1, 12),
       top_k=st.integers(1, 20), training=st.booleans(), seed=st.integers(0, 2**31))
def test_aten_matches_reference_random_shapes(T, D, N, F, Rt, top_k, training, seed):
    x, Af, Bf, A, B = make(T, D, N, F, Rt, dtype=torch.float64, seed=seed)
    dy = torch.randn(T, N, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    kw = dict(top_k=top_k, training=training, scaling=1.5, temperature=0.2, threshold=0.1)
    exp_out, exp_dx, exp_dA, exp_dB = reference(x, Af, Bf, A, B, dy, **kw)
    out = mora(x, A, B, frozen_A=Af if F else None, frozen_B=Bf if F else None, **kw)
    out.backward(dy)
    for got, want in ((out, exp_out), (x.grad, exp_dx), (A.grad, exp_dA), (B.grad, exp_dB)):
        close(got.detach(), want, 1e-9)


def test_raw_ops_validate_scalars_and_indices():
    x, Af, Bf, A, B = make(4, 8, 6, 2, 3, requires_grad=False)
    args = [x, Af, Bf, A, B, 2, 0.1, 0.2, True, 1.0, 0.0, 0]
    for pos, value, match in ((9, float("inf"), "scaling"), (9, float("nan"), "scaling"), (6, float("nan"), "temperature"),
                              (6, 0.0, "temperature"), (7, float("nan"), "threshold"), (10, 1.0, "dropout_p"),
                              (5, 0, "top_k")):
        bad = list(args)
        bad[pos] = value
        with pytest.raises(ValueError, match=match):
            torch.ops.trainops.mora_fwd(*bad)
    with pytest.raises(ValueError, match="scaling must be finite"):
        mora(x, A, B, scaling=float("inf"))
    with pytest.raises(ValueError, match="B_f must have shape"):
        torch.ops.trainops.mora_fwd(x, Af, Bf[:, :1], A, B, 2, 0.1, 0.2, True, 1.0, 0.0, 0)
    out, p, idx, rho = torch.ops.trainops.mora_fwd(*args)
    bad_idx = idx.clone()
    bad_idx[1, 0] = p.shape[1]
    with pytest.raises(IndexError, match="idx"):
        torch.ops.trainops.mora_bwd(torch.randn_like(out), x, Af, Bf, A, B, p, bad_idx, rho, 2, 0.1, 0.2, True, 1.0,
                                    0.0, 0, True, True, True)
