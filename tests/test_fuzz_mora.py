"""Fuzz: the MoRA ops (torch.ops.trainops.mora_fwd / mora_bwd, ATen on CPU, and the mora()
wrapper) against trainops.reference.mora, with hostile scalars, shapes and indices.
See tests/test_fuzz_common.py for the rules."""
import importlib
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from trainops.ops import mora
from test_fuzz_common import HOSTILE, case_counter, expect_clear_error, fuzz_settings

ref_mora = importlib.import_module("trainops.reference.mora")  # the module (the package exports a function)

CASES, _fuzz_summary = case_counter("mora")
NUMBERS = st.one_of(st.floats(-3, 3, allow_nan=False), st.sampled_from(HOSTILE[:5]))



@st.composite
def mora_case(draw):
    T, D, N = draw(st.integers(1, 6)), draw(st.integers(1, 8)), draw(st.integers(1, 6))
    F, Rt = draw(st.integers(0, 3)), draw(st.integers(0, 6))
    g = torch.Generator().manual_seed(T * 1000 + D * 100 + N * 10 + F + Rt)
    x, A, B = torch.randn(T, D, generator=g), torch.randn(Rt, D, generator=g), torch.randn(N, Rt, generator=g)
    Af, Bf = torch.randn(F, D, generator=g), torch.randn(N, F, generator=g)
    shape_damage = draw(st.sampled_from(["none"] * 6 + ["A_cols", "B_rows", "Bf_cols", "x_3d"]))
    if shape_damage == "A_cols":
        A = torch.randn(Rt, D + 1)
    elif shape_damage == "B_rows":
        B = torch.randn(N, Rt + 1)
    elif shape_damage == "Bf_cols":
        Bf = torch.randn(N, F + 1)
    elif shape_damage == "x_3d":
        x = x[None]
    scalars = dict(top_k=draw(st.one_of(st.integers(1, 8), st.sampled_from([0, -1]))),
                   temperature=draw(st.one_of(st.floats(0.01, 2), NUMBERS)),
                   threshold=draw(NUMBERS), training=draw(st.booleans()), scaling=draw(NUMBERS),
                   dropout_p=draw(st.one_of(st.sampled_from([0.0, 0.3]), st.sampled_from([1.0, -0.1, float("nan")]))),
                   seed=draw(st.integers(0, 2**31)))
    return x, Af, Bf, A, B, shape_damage, scalars


def _scalars_ok(s) -> bool:
    t, thr, sc, dp = s["temperature"], s["threshold"], s["scaling"], s["dropout_p"]
    return (s["top_k"] >= 1 and t > 0 and math.isfinite(t) and not math.isnan(thr) and math.isfinite(sc)
            and 0.0 <= dp < 1.0)


@fuzz_settings(250)
@given(case=mora_case(), raw=st.booleans())
def test_fuzz_mora_forward(case, raw):
    CASES["mora_fwd"] += 1
    x, Af, Bf, A, B, damage, s = case
    if raw:
        call = lambda: torch.ops.trainops.mora_fwd(x, Af, Bf, A, B, s["top_k"], s["temperature"],  # noqa: E731
                                                   s["threshold"], s["training"], s["scaling"], s["dropout_p"],
                                                   s["seed"])[0]
    else:
        fa, fb = (Af, Bf) if Af.shape[0] else (None, None)
        call = lambda: mora(x, A, B, frozen_A=fa, frozen_B=fb, **s)  # noqa: E731
    no_ranks = Af.shape[0] + A.shape[0] == 0
    if damage != "none" or not _scalars_ok(s) or no_ranks or (not raw and A.shape[0] == 0):
        if not raw and damage == "x_3d" and _scalars_ok(s) and not no_ranks and A.shape[0]:
            call()  # the wrapper flattens leading dimensions: valid
            return
        expect_clear_error(call)
        return
    got = call()
    want = ref_mora.mora(x, A, B, frozen_A=Af, frozen_B=Bf, **s)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@fuzz_settings(100)
@given(T=st.integers(1, 6), R=st.integers(1, 8), bad=st.sampled_from([None, -1, "R", 2**40]), top_k=st.integers(1, 8))
def test_fuzz_mora_backward_indices(T, R, bad, top_k):
    """mora_bwd's idx addresses columns of p: any entry outside [0, R) is an IndexError on CPU."""
    CASES["mora_bwd"] += 1
    g = torch.Generator().manual_seed(T * 10 + R)
    x, A, B = torch.randn(T, 5, generator=g), torch.randn(R, 5, generator=g), torch.randn(4, R, generator=g)
    Af, Bf = torch.zeros(0, 5), torch.zeros(4, 0)
    out, p, idx, rho = torch.ops.trainops.mora_fwd(x, Af, Bf, A, B, top_k, 0.5, 0.1, True, 1.0, 0.0, 0)
    if bad is not None:
        idx = idx.clone()
        idx[T - 1, 0] = R if bad == "R" else bad
    call = lambda: torch.ops.trainops.mora_bwd(torch.ones_like(out), x, Af, Bf, A, B, p, idx, rho, top_k,  # noqa
                                               0.5, 0.1, True, 1.0, 0.0, 0, True, True, True)
    if bad is not None:
        expect_clear_error(call, types=IndexError)
        return
    dx, dA, dB = call()
    xr, Ar, Br = (t.clone().requires_grad_() for t in (x, A, B))
    ref_mora.mora(xr, Ar, Br, top_k=top_k, temperature=0.5, threshold=0.1, training=True).sum().backward()
    for got, want in ((dx, xr.grad), (dA, Ar.grad), (dB, Br.grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
