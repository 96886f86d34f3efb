"""Fuzz: router_topk forward (wrapper and raw op) and router_topk_backward (raw op), C++ CPU
kernels, against trainops.reference.router. See tests/test_fuzz_common.py for the rules."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import trainops
from trainops import reference as ref
from trainops.reference import router as ref_router
from trainops.ops import router_topk
from test_fuzz_common import all_finite, case_counter, expect_clear_error, fuzz_settings, hostile_tensor

pytestmark = pytest.mark.skipif(not trainops.has_extension(), reason="C++ extension not built")

CASES, _fuzz_summary = case_counter("router")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]



@st.composite
def forward_case(draw):
    T, E = draw(st.integers(0, 40)), draw(st.integers(0, 70))
    dtype = draw(st.sampled_from(DTYPES))
    logits = draw(hostile_tensor((T, E), dtype, hostile_p=0.2, exponents=(-40, 1)))
    if T > 1 and E > 1 and draw(st.booleans()):  # a non-contiguous view with the same values
        logits = logits.t().contiguous().t()
    k = draw(st.one_of(st.integers(1, max(E, 1)), st.sampled_from([0, -1, E + 1])))
    score = draw(st.sampled_from(["softmax", "sigmoid", "softmax", "relu"]))
    bias = draw(st.sampled_from([None, "ok", "ok", "nan", "inf", "short"]))
    if bias is not None:
        n = E + 1 if bias == "short" else E
        b = torch.randn(n, generator=torch.Generator().manual_seed(T * 100 + E)) * 0.05
        if bias in ("nan", "inf") and n:
            b[draw(st.integers(0, n - 1))] = float(bias)
        bias = b
    mask = draw(st.sampled_from([None, "bool", "int", "short"]))
    if mask is not None:
        m = torch.rand(T + (mask == "short"), generator=torch.Generator().manual_seed(T + E)) > 0.3
        mask = m.int() if mask == "int" else m
    return logits, k, score, bias, mask, draw(st.booleans()), draw(st.booleans()), draw(st.booleans())


@fuzz_settings(300)
@given(case=forward_case())
def test_fuzz_router_topk_forward(case):
    CASES["router_topk"] += 1
    logits, k, score, bias, mask, renorm, z_loss, check_finite = case
    T, E = logits.shape
    call = lambda: router_topk(logits, k, score=score, renormalize=renorm, expert_bias=bias, mask=mask,  # noqa: E731
                               z_loss=z_loss, check_finite=check_finite)
    if (T == 0 or E == 0 or not 1 <= k <= E or score == "relu" or (bias is not None and bias.shape != (E,))
            or (mask is not None and mask.numel() != T)):
        expect_clear_error(call)
        return
    if bias is not None and not all_finite(bias):
        expect_clear_error(call, types=ValueError, match="expert_bias")
        return
    valid = torch.ones(T, dtype=torch.bool) if mask is None else mask.bool()
    if not all_finite(logits):
        # check_finite raises when the non-finite logits make the outputs non-finite; some do
        # not (sigmoid(+-inf) is 1 or 0, softmax gives -inf a zero probability), and those
        # rows get finite outputs.
        try:
            out = call()
        except ValueError as e:
            assert check_finite and str(e)
            return
        if check_finite:
            assert all_finite(out[0][valid]) and all_finite(out[3]), "non-finite outputs passed check_finite"
        # Whatever the values, the indices are experts and only valid rows are counted.
        assert int(out[1].min()) >= 0 and int(out[1].max()) < E
        assert int(out[2].sum()) == k * int(valid.sum())
        return
    got = call()
    want = ref.router_topk(logits, k, score=score, renormalize=renorm, expert_bias=bias, mask=mask, z_loss=z_loss)
    # Indices: the same experts, or (near-ties, where the fp32 scores of the kernel and of torch
    # round differently, e.g. logits 1e-8 apart) experts of the same selection score.
    s = ref_router.router_scores(logits, score)
    sel = s if bias is None else s + bias.float()
    idx = got[1]
    assert int(idx.min()) >= 0 and int(idx.max()) < E
    assert all(len(set(row)) == k for row in idx.tolist())
    torch.testing.assert_close(sel.gather(1, idx), sel.gather(1, want[1]), rtol=1e-5, atol=1e-6)
    counts = torch.bincount(idx[valid].reshape(-1), minlength=E)
    assert torch.equal(got[2], counts)
    w = s.gather(1, idx)
    w = w / w.sum(-1, keepdim=True) if renorm else w
    # Sigmoid scores of logits below ~-88 are floored at ~4.5e-39 by the kernel's exp (torch
    # gives 0 or a subnormal): a row whose every score underflows differs (0/0 in the reference).
    degenerate = score == "sigmoid" and bool((logits.float() < -87.0).all(-1).any())
    if not degenerate:
        torch.testing.assert_close(got[0], w, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[3], want[3], rtol=1e-5, atol=1e-4)
    if z_loss:
        n_valid = max(int(valid.sum()), 1)
        torch.testing.assert_close(got[4], want[4] / n_valid, rtol=1e-5, atol=1e-5)


def _reference_backward(gw, gp, gz, logits, indices, mask, score, renorm, with_z):
    """dL/dlogits of L = <w, gw> + <prob_sum, gp> + z_sum * gz by autograd of the reference's
    formulas, at the given indices."""
    x = logits.detach().float().requires_grad_()
    s = ref_router.router_scores(x, score)
    w = s.gather(1, indices.long())
    if renorm:
        w = w / w.sum(-1, keepdim=True)
    valid = torch.ones(x.shape[0], dtype=torch.bool) if mask is None else mask
    loss = (w * gw.float()).sum() + ((ref_router.probability(s, score) * valid[:, None]).sum(0) * gp.float()).sum()
    if with_z:
        lse = torch.logsumexp(x, -1)
        loss = loss + ((lse * lse) * valid).sum() * gz.float()
    loss.backward()
    return x.grad


@st.composite
def backward_case(draw):
    T, E = draw(st.integers(0, 30)), draw(st.integers(1, 40))
    k = draw(st.integers(1, min(E, 10)))
    dtype = draw(st.sampled_from(DTYPES))
    logits = draw(hostile_tensor((T, E), dtype, hostile_p=0.0, exponents=(-3, 0)))
    score = draw(st.sampled_from(["softmax", "sigmoid"]))
    mask = (torch.rand(T, generator=torch.Generator().manual_seed(E)) > 0.3) if draw(st.booleans()) else None
    indices = torch.empty(T, k, dtype=torch.long)
    if T:
        indices = torch.sort(ref_router.router_scores(logits, score), dim=-1, descending=True, stable=True).indices[:, :k]
    g = torch.Generator().manual_seed(T * 7 + k)
    gw, gp, gz = torch.randn(T, k, generator=g), torch.randn(E, generator=g), torch.randn((), generator=g)
    damage = draw(st.sampled_from(["none", "none", "none", "index_high", "index_negative", "index_huge",
                                   "float_indices", "gw_shape", "gp_shape", "gz_shape", "k_too_big", "meta_gp"]))
    if damage.startswith("index") and T:
        bad = {"index_high": E, "index_negative": -1, "index_huge": 2**40}[damage]
        indices[draw(st.integers(0, T - 1)), draw(st.integers(0, k - 1))] = bad
    elif damage == "float_indices":
        indices = indices.float()
    elif damage == "gw_shape":
        gw = gw[:, :-1]
    elif damage == "gp_shape":
        gp = gp[:-1]
    elif damage == "gz_shape":
        gz = torch.zeros(2)
    elif damage == "k_too_big":
        indices = torch.zeros(T, E + 1, dtype=torch.long)
        gw = torch.zeros(T, E + 1)
    elif damage == "meta_gp":
        gp = gp.to("meta")
    return gw, gp, gz, logits, indices, mask, score, draw(st.booleans()), draw(st.booleans()), damage


@fuzz_settings(250)
@given(case=backward_case())
def test_fuzz_router_topk_backward(case):
    """torch.ops.trainops.router_topk_backward directly: any index outside [0, E) is an IndexError
    (it used to be read and written out of bounds), bad shapes/dtypes/devices raise."""
    CASES["router_topk_backward"] += 1
    gw, gp, gz, logits, indices, mask, score, renorm, with_z, damage = case
    call = lambda: torch.ops.trainops.router_topk_backward(gw, gp, gz, logits, indices, mask, score,  # noqa: E731
                                                           renorm, with_z)
    T = logits.shape[0]
    if damage != "none" and not (damage.startswith("index") and T == 0):
        expect_clear_error(call, types=IndexError if damage.startswith("index") else (TypeError, ValueError,
                                                                                        RuntimeError))
        return
    grad = call()
    assert grad.shape == logits.shape and grad.dtype == logits.dtype
    want = _reference_backward(gw, gp, gz, logits, indices, mask, score, renorm, with_z)
    tol = 1e-4 if logits.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(grad.float(), want, rtol=tol, atol=tol)
