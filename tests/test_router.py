"""trainops.ops.router_topk (C++ CPU kernel) against trainops.reference.router_topk."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import trainops
from trainops import reference as ref
from trainops.ops import router_topk

pytestmark = pytest.mark.skipif(not trainops.has_extension(), reason="C++ extension not built")



@pytest.fixture(autouse=True, params=["native", "portable"])
def row_kernels(request, monkeypatch):
    """Run every test with the build's row kernels (AVX2 + FMA on x86-64) and with the
    portable ones that other CPUs run (selected per call by TRAINOPS_ROUTER_PORTABLE)."""
    monkeypatch.setenv("TRAINOPS_ROUTER_PORTABLE", "1" if request.param == "portable" else "0")
    return request.param


TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}


def _inputs(T, E, dtype, seed, masked=False, biased=False):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(T, E, generator=g) * 2).to(dtype)
    mask = (torch.rand(T, generator=g) > 0.3) if masked else None
    bias = (torch.randn(E, generator=g) * 0.05) if biased else None
    return logits, mask, bias


def _losses(out, g):
    w, _, _, p, z = out
    return (w * g[0]).sum() + (p * g[1]).sum() + z * g[2]


def _check(T, E, k, dtype, score, renorm, masked, biased, seed=0):
    logits, mask, bias = _inputs(T, E, dtype, seed, masked, biased)
    x1 = logits.clone().requires_grad_()
    x2 = logits.clone().requires_grad_()
    got = router_topk(x1, k, score=score, renormalize=renorm, expert_bias=bias, mask=mask, z_loss=True)
    exp = ref.router_topk(x2, k, score=score, renormalize=renorm, expert_bias=bias, mask=mask, z_loss=True)
    n_valid = T if mask is None else int(mask.sum())
    exp = exp[:4] + (exp[4] / max(n_valid, 1),)
    assert torch.equal(got[1], exp[1])
    assert torch.equal(got[2], exp[2])
    assert got[2].sum() == k * n_valid
    tol = TOL[dtype]
    torch.testing.assert_close(got[0], exp[0], rtol=tol, atol=tol)
    torch.testing.assert_close(got[3], exp[3], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got[4], exp[4], rtol=1e-5, atol=1e-5)
    gen = torch.Generator().manual_seed(seed + 1)
    g = (torch.randn(T, k, generator=gen), torch.randn(E, generator=gen), torch.randn((), generator=gen))
    _losses(got, g).backward()
    _losses(exp, g).backward()
    gtol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(x1.grad.float(), x2.grad.float(), rtol=gtol, atol=gtol)
    assert x1.grad.dtype == dtype


@pytest.mark.parametrize("T,E,k", [(1, 8, 1), (37, 13, 3), (129, 60, 8), (300, 256, 8), (64, 100, 5)])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_matches_reference_fp32(T, E, k, score):
    for i, (renorm, masked, biased) in enumerate([(True, False, False), (False, True, False), (True, True, True)]):
        _check(T, E, k, torch.float32, score, renorm, masked, biased, seed=i)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_matches_reference_half(dtype, score):
    _check(77, 24, 4, dtype, score, True, True, False)


@settings(max_examples=20, deadline=None)
@given(T=st.integers(1, 70), E=st.integers(2, 70), kf=st.floats(0, 1), score=st.sampled_from(["softmax", "sigmoid"]),
       renorm=st.booleans(), masked=st.booleans(), biased=st.booleans(), seed=st.integers(0, 2**16))
def test_random_shapes(T, E, kf, score, renorm, masked, biased, seed):
    k = 1 + int(kf * (min(E, 8) - 1))
    _check(T, E, k, torch.float32, score, renorm, masked, biased, seed)


def test_ties_pick_lower_index():
    logits = torch.zeros(3, 6)
    logits[1, 4] = logits[1, 2] = 1.0
    w, idx, counts, _ = router_topk(logits, 3)
    assert idx[0].tolist() == [0, 1, 2]
    assert idx[1].tolist() == [2, 4, 0]
    assert counts.tolist() == [3, 2, 3, 0, 1, 0]


def test_bias_changes_choice_not_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 10.0])
    w, idx, _, _ = router_topk(logits, 2, expert_bias=bias, renormalize=False)
    s = torch.softmax(logits, -1)
    assert idx.tolist() == [[3, 0]]
    torch.testing.assert_close(w, s[:, [3, 0]])


def test_padding_excluded():
    logits, _, _ = _inputs(50, 16, torch.float32, 3)
    mask = torch.zeros(50, dtype=torch.bool)
    mask[:20] = True
    full = router_topk(logits[:20], 4)
    part = router_topk(logits, 4, mask=mask)
    assert torch.equal(full[2], part[2])
    torch.testing.assert_close(full[3], part[3])
    torch.testing.assert_close(full[0], part[0][:20])
    # integer attention masks are accepted too
    assert torch.equal(router_topk(logits, 4, mask=mask.long())[2], part[2])


def test_non_finite_padding_rows_do_not_reach_statistics():
    """Rows are processed in pairs: a NaN/Inf padding row next to a valid one (either
    position, odd T) must not leak into prob_sum or counts."""
    logits, _, _ = _inputs(41, 24, torch.float32, 9)
    mask = torch.tensor([i % 3 != 1 for i in range(41)])
    dirty = logits.clone()
    dirty[~mask] = float("nan")
    dirty[1, 5] = float("inf")  # row 1 is padding (1 % 3 == 1)
    clean = router_topk(logits[mask], 5)
    got = router_topk(dirty, 5, mask=mask, check_finite=False)
    assert torch.equal(clean[2], got[2])
    torch.testing.assert_close(clean[3], got[3], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(clean[0], got[0][mask], rtol=0, atol=0)


def test_bias_skips_the_row_max():
    # A bias that keeps the largest logits from being picked: the chosen experts lie up to
    # 100 below the row max, and the last row has two banned experts whose probabilities
    # must not be confused (a shift by anything but the row max would overflow there).
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(8, 16, generator=g)
    logits[:, 3] = torch.tensor([0.0, 5.0, 40.0, 70.0, 85.0, 95.0, 100.0, 100.0])
    logits[7, 4] = 95.0
    bias = torch.zeros(16)
    bias[3] = bias[4] = -1000.0
    x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    got = router_topk(x1, 2, expert_bias=bias, renormalize=False, z_loss=True)
    exp = ref.router_topk(x2, 2, expert_bias=bias, renormalize=False, z_loss=True)
    assert not ((got[1] == 3) | (got[1] == 4)).any()
    # Past a gap of ~87 the chosen experts' scores underflow to 0 here (ties), to
    # subnormals in the reference: their picks may differ, their weights are ~0 in both.
    assert torch.equal(got[1][:5], exp[1][:5])
    torch.testing.assert_close(got[0], exp[0], rtol=1e-5, atol=1e-6)
    gw, gp = torch.randn(8, 2, generator=g), torch.randn(16, generator=g)
    torch.autograd.backward([got[0], got[3], got[4]], [gw, gp, torch.tensor(0.3)])
    torch.autograd.backward([exp[0], exp[3], exp[4] / 8], [gw, gp, torch.tensor(0.3)])
    assert torch.isfinite(x1.grad).all()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)


def test_deterministic_and_thread_invariant():
    # Threads take pieces of rows from a shared counter, so which thread runs a piece
    # changes between calls: outputs and gradients must not.
    logits, mask, _ = _inputs(2000, 64, torch.float32, 5, masked=True)
    g = torch.randn(2000, 8, generator=torch.Generator().manual_seed(1))

    def run():
        x = logits.clone().requires_grad_()
        out = router_topk(x, 8, mask=mask, z_loss=True)
        torch.autograd.backward([out[0], out[3], out[4]], [g, torch.linspace(-1, 1, 64), torch.tensor(0.5)])
        return [t.detach() for t in out] + [x.grad]

    a = run()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(threads, 2))
        runs = [run() for _ in range(3)]
        torch.set_num_threads(1)
        runs.append(run())
    finally:
        torch.set_num_threads(threads)
    for b in runs:
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_balanced_statistics():
    # Identical logits in every row: sigmoid prob_sum is the normalized score, sums to T.
    logits = torch.randn(1, 10).repeat(30, 1)
    _, _, counts, p = router_topk(logits, 2, score="sigmoid")
    torch.testing.assert_close(p.sum(), torch.tensor(30.0))
    assert counts.sum() == 60


def test_opcheck():
    logits, mask, bias = _inputs(33, 12, torch.float32, 7, masked=True, biased=True)
    cases = [
        (logits.requires_grad_(), 3, "softmax", True, None, None, True),
        (logits, 4, "sigmoid", False, bias, mask, True),
        (logits.bfloat16(), 2, "softmax", True, bias, mask, False),
    ]
    for args in cases:
        torch.library.opcheck(torch.ops.trainops.router_topk.default, args)
    x = logits.detach()
    idx = router_topk(x, 3)[1]
    torch.library.opcheck(torch.ops.trainops.router_topk_backward.default,
                          (torch.randn(33, 3), torch.randn(12), torch.randn(()), x, idx, mask, "softmax", True, True))


@pytest.mark.parametrize("bad,exc,match", [
    (dict(k=20), ValueError, "k must"),
    (dict(k=0), ValueError, "k must"),
    (dict(logits=torch.randn(12)), ValueError, "2-D"),
    (dict(logits=torch.randn(3, 2, 12)), ValueError, "2-D"),
    (dict(mask=torch.ones(9, dtype=torch.bool)), ValueError, "mask"),
    (dict(mask=torch.ones(10)), TypeError, "mask"),
    (dict(logits=torch.randint(0, 3, (10, 12))), TypeError, "logits"),
    (dict(logits=torch.randn(0, 12)), ValueError, "empty"),
    (dict(expert_bias=torch.zeros(11)), ValueError, "expert_bias"),
    (dict(score="relu"), ValueError, "score"),
    (dict(k=2.0), TypeError, "k must"),
])
def test_bad_inputs(bad, exc, match):
    args = dict(logits=torch.randn(10, 12), k=2, mask=None, expert_bias=None, score="softmax")
    args.update(bad)
    with pytest.raises(exc, match=match):
        router_topk(args.pop("logits"), args.pop("k"), **args)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_logits(value):
    logits = torch.randn(10, 12)
    logits[4, 3] = value
    with pytest.raises(ValueError, match="NaN or Inf"):
        router_topk(logits, 2)
    # Out-of-range indices never appear, even when the check is off.
    idx = router_topk(logits, 2, check_finite=False)[1]
    assert int(idx.max()) < 12 and int(idx.min()) >= 0
    # A padding row reaches only the weights (softmax: the whole row turns NaN); they are
    # checked too.
    mask = torch.ones(10, dtype=torch.bool)
    mask[4] = False
    with pytest.raises(ValueError, match="NaN or Inf"):
        router_topk(logits, 2, mask=mask)


def test_non_finite_check_under_torch_compile():
    # The check compiles into the graph on CPU (fullgraph: no host read, no graph break)
    # and still rejects non-finite logits, with or without a mask.
    def route(logits, mask):
        w, idx, counts, psum = router_topk(logits, 2, mask=mask)
        return w.sum() + psum.sum()

    compiled = torch.compile(route, fullgraph=True, backend="aot_eager")
    logits, mask = torch.randn(10, 12), torch.ones(10, dtype=torch.bool)
    mask[4] = False
    torch.testing.assert_close(compiled(logits, mask), route(logits, mask))
    logits[4, 3] = float("nan")
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        compiled(logits, mask)
    torch._dynamo.reset()


@pytest.mark.parametrize("E,k", [(16, 8), (64, 8), (64, 4), (256, 8), (17, 8), (40, 12)])
def test_topk_paths_with_many_ties(E, k):
    # Integer-valued logits tie often: the candidate-rank path, its many-ties fallback and
    # the insertion path (k > 8) must all keep the lower index first.
    g = torch.Generator().manual_seed(E + k)
    for logits in (torch.randint(-2, 3, (500, E), generator=g).float(), torch.randn(500, E, generator=g)):
        for score in ("softmax", "sigmoid"):
            got = router_topk(logits, k, score=score)
            exp = ref.router_topk(logits, k, score=score)
            assert torch.equal(got[1], exp[1]) and torch.equal(got[2], exp[2])


@pytest.mark.parametrize("E,k", [(64, 8), (70, 4), (16, 2)])
def test_saturated_and_masked_experts(E, k):
    # Large logits underflow most softmax scores (the kernels flush scores below the
    # smallest normal float, ~1.2e-38, to 0, so those experts tie at 0 and the lower index
    # wins), and -inf logits (experts switched off) must never be picked while enough
    # finite experts remain.
    g = torch.Generator().manual_seed(E)
    big = torch.randn(200, E, generator=g) * 60
    off = torch.randn(200, E, generator=g)
    off[:, ::3] = float("-inf")
    for logits in (big, off):
        got = router_topk(logits, k)
        exp = ref.router_topk(logits, k)
        s = torch.softmax(logits, -1)
        torch.testing.assert_close(s.gather(1, got[1]), s.gather(1, exp[1]), rtol=0, atol=1.2e-38)
        torch.testing.assert_close(got[0], exp[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[3], exp[3], rtol=1e-5, atol=1e-4)
    got = router_topk(off, k)
    assert torch.equal(got[1], ref.router_topk(off, k)[1])
    assert not bool((got[1] % 3 == 0).any())


@pytest.mark.parametrize("bad", [12, -1, 2**40])
def test_backward_rejects_out_of_range_indices(bad):
    # The raw backward op used to read and write the row at any index (an index >= E read out
    # of bounds: ASan SEGV). Now an IndexError naming the argument.
    x = torch.randn(5, 12)
    idx = router_topk(x, 2)[1].clone()
    idx[3, 1] = bad
    with pytest.raises(IndexError, match="'indices'"):
        torch.ops.trainops.router_topk_backward(torch.randn(5, 2), torch.randn(12), torch.randn(()), x, idx, None,
                                                "softmax", True, True)
    with pytest.raises(TypeError, match="indices"):
        torch.ops.trainops.router_topk_backward(torch.randn(5, 2), torch.randn(12), torch.randn(()), x, idx.float(),
                                                None, "softmax", True, True)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_expert_bias_raises(value):
    bias = torch.zeros(12)
    bias[5] = value
    for check_finite in (True, False):
        with pytest.raises(ValueError, match="expert_bias"):
            router_topk(torch.randn(10, 12), 2, expert_bias=bias, check_finite=check_finite)


def test_triton_backward_flags_out_of_range_indices_with_nan():
    # The Triton backward (CUDA; here the interpreter) does no host read of the indices: a row
    # naming an expert outside [0, E) gets a NaN gradient row; the other rows are unaffected.
    pytest.importorskip("triton")
    from trainops.kernels import router as triton_router

    x = torch.randn(6, 10)
    idx = router_topk(x, 2)[1].clone()
    args = (torch.randn(6, 2), torch.randn(10), torch.randn(()), x)
    good = triton_router.router_topk_backward(*args, idx, None, "softmax", True, True)
    idx[2, 1] = 10
    idx[4, 0] = -3
    bad = triton_router.router_topk_backward(*args, idx, None, "softmax", True, True)
    assert bool(bad[2].isnan().all()) and bool(bad[4].isnan().all())
    keep = [0, 1, 3, 5]
    assert torch.equal(bad[keep], good[keep])
