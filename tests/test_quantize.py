"""Blockwise quantization ops: C++ CPU kernel vs the reference, grids, rounding, policies."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainops import ops
from trainops import reference as ref
from trainops.formats import FORMATS, num_blocks, packed_bytes

ALL_FORMATS = list(FORMATS)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def grid_magnitudes(fmt):
    """Every non-negative magnitude the format can represent (before scaling)."""
    values = ref.signed_values(fmt)
    return torch.unique(values[values >= 0])


@settings(max_examples=60, deadline=None)
@given(
    fmt=st.sampled_from(ALL_FORMATS),
    numel=st.integers(1, 700),
    block_log2=st.integers(4, 8),
    dtype=st.sampled_from(DTYPES),
    stochastic=st.booleans(),
    seed=st.integers(0, 2**40),
)
def test_cpu_kernel_matches_reference_bytes(fmt, numel, block_log2, dtype, stochastic, seed):
    block = 2**block_log2
    x = (torch.randn(numel) * torch.rand(1) * 10).to(dtype)
    q = ops.quantize(x, fmt, block, stochastic=stochastic, seed=seed)
    data, scales = ref.quantize(x, fmt, block, stochastic=stochastic, seed=seed)
    assert q.data.shape == (packed_bytes(fmt, numel),)
    assert q.scales.shape == (num_blocks(numel, block),)
    assert torch.equal(q.data, data)
    assert torch.equal(q.scales, scales)
    out = ops.dequantize(q)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, ref.dequantize(data, scales, fmt, block, numel, dtype))


@settings(max_examples=40, deadline=None)
@given(fmt=st.sampled_from(ALL_FORMATS), numel=st.integers(1, 300), block_log2=st.integers(4, 6))
def test_round_to_nearest_picks_the_nearest_grid_point(fmt, numel, block_log2):
    block = 2**block_log2
    x = torch.randn(numel) * 3
    q = ops.quantize(x, fmt, block)
    scale = q.scales.repeat_interleave(block)[:numel]
    y = x.abs() / scale
    got = ops.dequantize(q).abs() / scale
    grid = grid_magnitudes(fmt)
    best = (y[:, None] - grid[None, :]).abs().min(dim=1).values
    assert torch.all((y - got).abs() <= best + 1e-5 * (1 + y))
    assert torch.all(torch.sign(ops.dequantize(q)) * torch.sign(x) >= 0)  # never flips the sign


@pytest.mark.parametrize("fmt", ["fp4_e3m0", "fp4_e2m1", "int4"])
def test_nibble_ties_and_signs_match_reference(fmt):
    # Values exactly on the grid and on every mid-point (ties go to the even code), both
    # signs and -0.0, over whole 16-value steps of the vector encoder and an odd tail.
    grid = grid_magnitudes(fmt)
    mids = (grid[1:] + grid[:-1]) / 2
    top = grid.max()
    pattern = torch.cat([grid, mids, -grid, -mids, torch.tensor([-0.0, 0.0])])
    x = pattern.repeat(6)[:64 * 3 + 5]
    x[::64] = top  # absmax = the largest code: scale 1, so y = |x| exactly
    q = ops.quantize(x, fmt, 64)
    data, scales = ref.quantize(x, fmt, 64)
    assert torch.equal(q.scales, scales) and bool((scales == 1).all())
    assert torch.equal(q.data, data)


def test_shapes_non_contiguous_and_partial_blocks():
    base = torch.randn(37, 23)
    x = base.t()  # non-contiguous
    assert not x.is_contiguous()
    q = ops.quantize(x, "fp4_e2m1", 32)
    assert q.shape == x.shape
    data, scales = ref.quantize(x.contiguous(), "fp4_e2m1", 32)
    assert torch.equal(q.data, data) and torch.equal(q.scales, scales)
    assert ops.dequantize(q).shape == (23, 37)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_absmax_is_exact_and_extremes_round_trip(fmt):
    x = torch.tensor([0.5, -3.0, 1.0, 0.0] * 8)
    q = ops.quantize(x, fmt, 16)
    out = ops.dequantize(q)
    assert torch.allclose(q.scales, torch.full((2,), 3.0 / FORMATS[fmt].max_code))
    assert out[1] == -3.0 and out[3] == 0.0


def test_fp8_matches_torch_float8_conversion():
    x = torch.randn(4096) * torch.logspace(-3, 3, 4096)
    q = ops.quantize(x, "fp8_e4m3", 128)
    scale = q.scales.repeat_interleave(128)
    expected = (x / scale).to(torch.float8_e4m3fn).float() * scale
    assert torch.equal(ops.dequantize(q), expected)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_all_zero_block_gives_zeros_never_nan(fmt):
    x = torch.zeros(300)
    x[200:] = torch.randn(100)
    q = ops.quantize(x, fmt, 128, stochastic=True, seed=1)
    assert q.scales[0] == 0 and torch.isfinite(q.scales).all()
    out = ops.dequantize(q)
    assert torch.equal(out[:128], torch.zeros(128))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_stochastic_rounding_is_unbiased_and_reproducible(fmt):
    torch.manual_seed(0)
    x = torch.randn(512)
    draws = torch.stack([ops.dequantize(ops.quantize(x, fmt, 64, stochastic=True, seed=s)) for s in range(400)])
    nearest = ops.dequantize(ops.quantize(x, fmt, 64))
    # Each draw is one of the two neighbours of x, so the mean of n draws converges to x
    # at ~gap/sqrt(n), far below round-to-nearest's ~gap/4; a biased rounding would not.
    assert (draws.mean(0) - x).abs().mean() < 0.25 * (nearest - x).abs().mean()
    signed_error = (draws.mean(0) - x).sum() / (nearest - x).abs().sum()
    assert signed_error.abs() < 0.02
    a = ops.quantize(x, fmt, 64, stochastic=True, seed=7)
    b = ops.quantize(x, fmt, 64, stochastic=True, seed=7)
    c = ops.quantize(x, fmt, 64, stochastic=True, seed=8)
    assert torch.equal(a.data, b.data) and not torch.equal(a.data, c.data)


def test_stochastic_seed_none_follows_torch_manual_seed():
    x = torch.randn(1000)
    torch.manual_seed(3)
    a = ops.quantize(x, "int4", 128, stochastic=True)
    torch.manual_seed(3)
    b = ops.quantize(x, "int4", 128, stochastic=True)
    assert torch.equal(a.data, b.data)


def test_nan_policy_raise_and_propagate():
    x = torch.randn(256)
    x[130] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf.*block 1"):
        ops.quantize(x, "int8", 128)
    q = ops.quantize(x, "int8", 128, nan_policy="propagate")
    out = ops.dequantize(q)
    assert torch.isfinite(out[:128]).all() and torch.isnan(out[128:]).all()
    x[130] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.quantize(x, "fp4_e3m0", 128)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_error_feedback_matches_reference(fmt, dtype):
    g = torch.randn(333).to(dtype)
    e = torch.randn(333) * 0.1
    e_ref = e.clone()
    q = ops.quantize_error_feedback(g, e, fmt, 64)
    data, scales = ref.quantize(g, fmt, 64, error=e_ref)
    assert torch.equal(q.data, data) and torch.equal(q.scales, scales)
    assert torch.equal(e, e_ref)


def test_error_feedback_residual_closes_the_loop():
    g = torch.randn(1000)
    e = torch.zeros(1000)
    q = ops.quantize_error_feedback(g, e, "fp4_e3m0", 128)
    # What was sent plus what is kept equals what came in.
    assert torch.allclose(ops.dequantize(q) + e, g, atol=1e-6)
    total_sent = ops.dequantize(q).clone()
    for _ in range(20):
        total_sent += ops.dequantize(ops.quantize_error_feedback(g, e, "fp4_e3m0", 128))
    assert torch.allclose(total_sent + e, 21 * g, atol=1e-4)


def test_error_feedback_nan_leaves_residual_untouched():
    g = torch.randn(256)
    g[3] = float("nan")
    e = torch.randn(256)
    before = e.clone()
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.quantize_error_feedback(g, e, "int8", 128)
    assert torch.equal(e, before)
    q = ops.quantize_error_feedback(g, e, "int8", 128, nan_policy="propagate")
    assert torch.isnan(q.scales[0]) and torch.isfinite(q.scales[1])
    assert torch.equal(e[:128], before[:128]) and not torch.equal(e[128:], before[128:])


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_dequantize_accumulate_matches_reference(fmt):
    n, chunks = 301, 3
    qs = [ops.quantize(torch.randn(n), fmt, 32) for _ in range(chunks)]
    data = torch.stack([q.data for q in qs])
    scales = torch.stack([q.scales for q in qs])
    out = torch.randn(n)
    expected = out.clone()
    ops.dequantize_accumulate(out, data, scales, fmt, 32)
    ref.dequantize_accumulate(expected, data, scales, fmt, 32)
    assert torch.equal(out, expected)
    manual = expected.clone() * 0
    for q in qs:
        manual += ops.dequantize(q)
    assert torch.allclose(out - expected, torch.zeros(n))


@pytest.mark.parametrize("fmt", ["int8", "fp4_e3m0"])
def test_opcheck(fmt):
    x = torch.randn(200)
    q = torch.ops.trainops.quantize(x, fmt, 64, False, 0)
    torch.library.opcheck(torch.ops.trainops.quantize.default, (x, fmt, 64, True, 5))
    torch.library.opcheck(torch.ops.trainops.quantize_error_feedback.default, (x, torch.zeros(200), fmt, 64, False, 0))
    torch.library.opcheck(torch.ops.trainops.dequantize.default, (q[0], q[1], fmt, 64, 200, torch.bfloat16))
    torch.library.opcheck(
        torch.ops.trainops.dequantize_accumulate.default,
        (torch.zeros(200), torch.stack([q[0], q[0]]), torch.stack([q[1], q[1]]), fmt, 64),
    )


def test_compiles_with_torch_compile():
    def round_trip(x):
        q = ops.quantize(x, "int8", 64, nan_policy="propagate")
        return ops.dequantize(q) * 2

    x = torch.randn(300)
    compiled = torch.compile(round_trip, fullgraph=False)
    assert torch.equal(compiled(x), round_trip(x))


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(100)
    with pytest.raises(TypeError, match="x must be float32"):
        ops.quantize(torch.arange(100), "int8")
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ops.quantize([1.0, 2.0], "int8")
    with pytest.raises(ValueError, match="unknown fmt 'fp3'"):
        ops.quantize(x, "fp3")
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        ops.quantize(x, "int8", 100)
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        ops.quantize(x, "int8", 8)
    with pytest.raises(TypeError, match="block_size must be an int"):
        ops.quantize(x, "int8", 64.0)
    with pytest.raises(ValueError, match="x is empty"):
        ops.quantize(torch.empty(0), "int8")
    with pytest.raises(ValueError, match="seed must fit in a signed 64-bit"):
        ops.quantize(x, "int8", stochastic=True, seed=2**64)
    with pytest.raises(ValueError, match="nan_policy"):
        ops.quantize(x, "int8", nan_policy="ignore")
    with pytest.raises(TypeError, match="error must be float32"):
        ops.quantize_error_feedback(x, torch.zeros(100, dtype=torch.float16))
    with pytest.raises(ValueError, match="error must be contiguous with 100 elements"):
        ops.quantize_error_feedback(x, torch.zeros(99))
    q = ops.quantize(x, "int8", 64)
    with pytest.raises(ValueError, match="data must have shape"):
        ops.dequantize_accumulate(torch.zeros(100), q.data[None, :50], q.scales[None], "int8", 64)
    with pytest.raises(ValueError, match="scales must have shape"):
        ops.dequantize_accumulate(torch.zeros(100), q.data[None], q.scales, "int8", 64)
    with pytest.raises(TypeError, match="out must be a float32"):
        ops.dequantize_accumulate(torch.zeros(100, dtype=torch.float64), q.data[None], q.scales[None], "int8", 64)
    # The raw op checks too (a caller bypassing the wrapper gets an error, not garbage).
    with pytest.raises(ValueError, match="block_size"):
        torch.ops.trainops.quantize(x, "int8", 48, False, 0)
    with pytest.raises(ValueError, match="unknown fmt"):
        torch.ops.trainops.quantize(x, "int9", 64, False, 0)


def test_missing_extension_names_the_op(monkeypatch):
    from trainops import _extension

    monkeypatch.setattr(_extension, "HAS_C", False)
    monkeypatch.setitem(_extension._errors, "trainops._C", ImportError("libfoo.so missing"))
    with pytest.raises(RuntimeError, match="trainops op 'quantize' needs the compiled extension.*libfoo"):
        ops.quantize(torch.randn(10), "int8", 16)


def test_bits_per_element():
    q = ops.quantize(torch.randn(1024), "fp4_e3m0", 128)
    assert q.bits_per_element == 4.25
    assert q.nbytes == 512 + 8 * 4


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_block_at_flt_max_decodes_finite(fmt):
    # absmax / max_code * max_code rounded to +Inf for int8 (and other formats): such a block
    # decoded to +-Inf. The scale is one ulp smaller in that case, in C++, Triton and reference.
    flt_max = torch.finfo(torch.float32).max
    x = torch.randn(48, generator=torch.Generator().manual_seed(0)) * 1e37
    x[3], x[20], x[40] = flt_max, -flt_max, flt_max
    q = ops.quantize(x, fmt, 16)
    data, scales = ref.quantize(x, fmt, 16)
    assert torch.equal(q.data, data) and torch.equal(q.scales, scales)
    out = ops.dequantize(q)
    assert bool(torch.isfinite(out).all())
    assert float(out[3]) <= flt_max and float(out[20]) < 0
    e = torch.zeros(48)
    q2 = ops.quantize_error_feedback(x, e, fmt, 16)
    assert torch.equal(q2.data, data) and bool(torch.isfinite(e).all())
    pytest.importorskip("triton")
    from trainops.kernels import quantize as tq

    t_data, t_scales = tq.quantize(x, fmt, 16, False, 0)
    assert torch.equal(t_data, data) and torch.equal(t_scales, scales)
    assert bool(torch.isfinite(tq.dequantize(t_data, t_scales, fmt, 16, 48)).all())


def test_dequantize_rejects_mixed_devices():
    # data on the CPU and scales elsewhere dispatched to the fake, which returned an
    # uninitialized CPU tensor.
    q = ops.quantize(torch.randn(100), "int8", 64)
    with pytest.raises(ValueError, match="scales is on meta but data is on cpu"):
        torch.ops.trainops.dequantize(q.data, q.scales.to("meta"), "int8", 64, 100, torch.float32)
    with pytest.raises(ValueError, match="scales is on meta"):
        ops.dequantize(ops.QuantizedTensor(q.data, q.scales.to("meta"), "int8", 64, q.shape, q.dtype))
    with pytest.raises(ValueError, match="data is on meta but out is on cpu"):
        torch.ops.trainops.dequantize_accumulate(torch.zeros(100), q.data[None].to("meta"), q.scales[None], "int8", 64)


@pytest.mark.parametrize("raw", [False, True])
def test_dequantize_accumulate_zero_chunks_leaves_out(raw):
    out = torch.randn(100)
    before = out.clone()
    fn = torch.ops.trainops.dequantize_accumulate if raw else ops.dequantize_accumulate
    fn(out, torch.empty(0, 100, dtype=torch.uint8), torch.empty(0, 2), "int8", 64)
    assert torch.equal(out, before)


def test_error_feedback_raise_checks_residual_and_overflow():
    x = torch.randn(64)
    for where, value, match in (("error", float("nan"), "error"), ("error", float("inf"), "error"),
                                ("both", 3e38, "overflows")):
        error = torch.zeros(64)
        error[5] = value
        xx = x.clone()
        if where == "both":
            xx[5] = value
        before = error.clone()
        with pytest.raises(ValueError, match=match):
            ops.quantize_error_feedback(xx, error, "int8", 16)
        assert torch.equal(error.nan_to_num(), before.nan_to_num())  # untouched
    # Large but not overflowing: accepted (the exact sum is formed only when it could overflow).
    error = torch.zeros(64)
    error[5] = 3e38
    xx = x.clone()
    xx[6] = 3e38
    ops.quantize_error_feedback(xx, error, "int8", 16)
    # propagate: the overflowing block decodes to NaN and keeps its residual.
    error = torch.zeros(64)
    error[5] = 3e38
    xx = x.clone()
    xx[5] = 3e38
    q = ops.quantize_error_feedback(xx, error, "int8", 16, nan_policy="propagate")
    assert bool(q.scales[0].isnan()) and float(error[5]) == float(torch.tensor(3e38))
