"""Fuzz: quantize / dequantize / dequantize_accumulate / quantize_error_feedback, every format,
through the wrappers and the raw torch.ops.trainops.* ops (C++ CPU kernels), against
trainops.reference.quantize. See tests/test_fuzz_common.py for the rules."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import trainops
from trainops import ops
from trainops import reference as ref
from trainops.formats import FORMATS, num_blocks, packed_bytes
from test_fuzz_common import (
    all_finite,
    case_counter,
    expect_clear_error,
    fuzz_settings,
    hostile_tensor,
    maybe_non_contiguous,
)

pytestmark = pytest.mark.skipif(not trainops.has_extension(), reason="C++ extension not built")

CASES, _fuzz_summary = case_counter("quantize")
FMTS = list(FORMATS)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Valid block sizes and hostile ones (not a power of two, out of range, negative, huge).
BLOCKS = st.one_of(st.sampled_from([16, 32, 64, 128, 8192]), st.sampled_from([0, -16, 8, 48, 100, 16384, 2**40]))
SHAPES = st.one_of(st.just(()), st.lists(st.integers(0, 9), min_size=1, max_size=3).map(tuple),
                   st.integers(1, 600).map(lambda n: (n,)))



def _valid_block(b) -> bool:
    return 16 <= b <= 8192 and b & (b - 1) == 0


@st.composite
def quant_case(draw):
    shape = draw(SHAPES)
    dtype = draw(st.sampled_from(DTYPES))
    x = maybe_non_contiguous(draw, draw(hostile_tensor(shape, dtype)))
    return x, draw(st.sampled_from(FMTS)), draw(BLOCKS), draw(st.booleans()), draw(st.integers(-(2**63), 2**63 - 1))


@fuzz_settings(300)
@given(case=quant_case(), nan_policy=st.sampled_from(["raise", "propagate"]))
def test_fuzz_quantize_dequantize(case, nan_policy):
    CASES["quantize+dequantize"] += 1
    x, fmt, block, stochastic, seed = case
    call = lambda: ops.quantize(x, fmt, block, stochastic=stochastic, seed=seed, nan_policy=nan_policy)  # noqa: E731
    if not _valid_block(block) or x.numel() == 0 or (nan_policy == "raise" and not all_finite(x)):
        expect_clear_error(call)
        return
    q = call()
    data, scales = ref.quantize(x, fmt, block, stochastic=stochastic, seed=seed)
    assert torch.equal(q.data, data)
    assert torch.equal(q.scales, scales, ) or torch.equal(q.scales.isnan(), scales.isnan()) and torch.equal(
        q.scales.nan_to_num(), scales.nan_to_num())
    out = ops.dequantize(q)
    want = ref.dequantize(data, scales, fmt, block, x.numel(), x.dtype).view(x.shape)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out.nan_to_num(), want.nan_to_num())
    if all_finite(x) and x.dtype == torch.float32:
        assert all_finite(out), "finite input decoded to a non-finite value"


@st.composite
def raw_quantize_case(draw):
    n = draw(st.integers(0, 300))
    x = draw(hostile_tensor((n,)))
    layout = draw(st.sampled_from(["flat", "2d", "strided", "0d"]))
    if layout == "2d" and n:
        x = x.view(1, n)
    elif layout == "strided" and n > 1:
        x = x[::2]
    elif layout == "0d":
        x = x.sum() if n else torch.tensor(1.0)
    return x, draw(st.sampled_from(FMTS + ["fp3", ""])), draw(BLOCKS), draw(st.booleans())


@fuzz_settings(150)
@given(case=raw_quantize_case())
def test_fuzz_raw_quantize_op(case):
    """torch.ops.trainops.quantize directly: flat contiguous input only, any length (0 too)."""
    CASES["raw quantize op"] += 1
    x, fmt, block, stochastic = case
    call = lambda: torch.ops.trainops.quantize(x, fmt, block, stochastic, 7)  # noqa: E731
    if fmt not in FORMATS or not _valid_block(block) or x.dim() != 1 or not x.is_contiguous():
        expect_clear_error(call)
        return
    data, scales = call()
    want_data, want_scales = ref.quantize(x, fmt, block, stochastic=stochastic, seed=7)
    assert torch.equal(data, want_data)
    assert torch.equal(scales.nan_to_num(), want_scales.nan_to_num()) and torch.equal(scales.isnan(),
                                                                                      want_scales.isnan())


@st.composite
def ef_case(draw):
    n = draw(st.integers(1, 400))
    dtype = draw(st.sampled_from(DTYPES))
    x = draw(hostile_tensor((n,), dtype, hostile_p=0.2))
    error = draw(hostile_tensor((n,), torch.float32, hostile_p=0.2))
    if draw(st.integers(0, 4)) == 0:  # x + error overflows while both are finite
        i = draw(st.integers(0, n - 1))
        sign = draw(st.sampled_from([1.0, -1.0]))
        x = x.float()
        x[i], error[i] = sign * 3e38, sign * 3e38
        x = x.to(dtype) if dtype == torch.float32 else x
    return x, error, draw(st.sampled_from(FMTS)), draw(st.sampled_from([16, 64, 256])), draw(st.booleans())


@fuzz_settings(200)
@given(case=ef_case(), nan_policy=st.sampled_from(["raise", "propagate"]))
def test_fuzz_quantize_error_feedback(case, nan_policy):
    CASES["quantize_error_feedback"] += 1
    x, error, fmt, block, stochastic = case
    before = error.clone()
    finite = all_finite(x, error) and all_finite(x.float() + error)
    call = lambda: ops.quantize_error_feedback(x, error, fmt, block, stochastic=stochastic, seed=3,  # noqa: E731
                                               nan_policy=nan_policy)
    if nan_policy == "raise" and not finite:
        expect_clear_error(call, types=ValueError)
        assert torch.equal(error.nan_to_num(), before.nan_to_num()), "a rejected step changed the residual"
        return
    q = call()
    want_error = before.clone()
    data, scales = ref.quantize(x, fmt, block, stochastic=stochastic, seed=3, error=want_error)
    assert torch.equal(q.data, data)
    assert torch.equal(q.scales.nan_to_num(), scales.nan_to_num())
    assert torch.equal(error.isnan(), want_error.isnan()) and torch.equal(error.nan_to_num(), want_error.nan_to_num())


@st.composite
def packed_case(draw):
    fmt = draw(st.sampled_from(FMTS))
    block = draw(st.sampled_from([16, 32, 128]))
    n = draw(st.integers(0, 300))
    x = draw(hostile_tensor((max(n, 1),), hostile_p=0.2))[:n]
    data, scales = ref.quantize(x, fmt, block, seed=0) if n else (torch.empty(0, dtype=torch.uint8),
                                                                   torch.empty(0))
    numel = n
    damage = draw(st.sampled_from(["none", "none", "numel+", "numel-", "negative", "huge", "short_data",
                                   "short_scales", "dtype", "meta_scales", "data_2d_wrong", "scales_f64"]))
    if damage == "numel+":
        numel = n + draw(st.integers(1, 40))
    elif damage == "numel-" and n:
        numel = n - 1 - (n > 1 and packed_bytes(fmt, n - 1) == packed_bytes(fmt, n) and num_blocks(n - 1, block) ==
                         num_blocks(n, block))
    elif damage == "negative":
        numel = -draw(st.integers(1, 2**62))
    elif damage == "huge":
        numel = draw(st.integers(2**40, 2**63 - 1))
    elif damage == "short_data" and data.numel():
        data = data[:-1]
    elif damage == "short_scales" and scales.numel():
        scales = scales[:-1]
    elif damage == "dtype":
        data = data.to(torch.int8)
    elif damage == "meta_scales":
        scales = scales.to("meta")
    elif damage == "scales_f64":
        scales = scales.double()
    return data, scales, fmt, block, numel, n, damage


@fuzz_settings(200)
@given(case=packed_case(), dtype=st.sampled_from(DTYPES))
def test_fuzz_raw_dequantize_op(case, dtype):
    """torch.ops.trainops.dequantize with consistent and with mismatched sizes/devices/dtypes."""
    CASES["raw dequantize op"] += 1
    data, scales, fmt, block, numel, n, damage = case
    call = lambda: torch.ops.trainops.dequantize(data, scales, fmt, block, numel, dtype)  # noqa: E731
    consistent = (data.dtype == torch.uint8 and scales.dtype == torch.float32 and scales.device == data.device
                  and 0 <= numel and data.numel() == packed_bytes(fmt, numel)
                  and scales.numel() == num_blocks(numel, block))
    if not consistent:
        expect_clear_error(call)
        return
    out = call()
    want = ref.dequantize(data, scales, fmt, block, numel, dtype)
    assert out.dtype == dtype and out.shape == (numel,)
    assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out.nan_to_num(), want.nan_to_num())


@st.composite
def accumulate_case(draw):
    fmt = draw(st.sampled_from(FMTS))
    block = draw(st.sampled_from([16, 64]))
    n = draw(st.integers(0, 200))
    chunks = draw(st.integers(0, 3))
    xs = [draw(hostile_tensor((max(n, 1),), hostile_p=0.1))[:n] for _ in range(chunks)]
    packed = [ref.quantize(x, fmt, block) for x in xs]
    data = torch.stack([d for d, _ in packed]) if chunks else torch.empty(0, packed_bytes(fmt, n), dtype=torch.uint8)
    scales = torch.stack([s for _, s in packed]) if chunks else torch.empty(0, num_blocks(n, block))
    out = draw(hostile_tensor((max(n, 1),), hostile_p=0.1))[:n].clone()
    damage = draw(st.sampled_from(["none", "none", "none", "flat_data", "wrong_width", "chunks_mismatch",
                                   "meta_data", "out_f16", "out_strided"]))
    if damage == "flat_data":
        data = data.reshape(-1)
    elif damage == "wrong_width":
        data = torch.zeros(chunks, packed_bytes(fmt, n) + 1, dtype=torch.uint8)
    elif damage == "chunks_mismatch":
        scales = torch.zeros(chunks + 1, num_blocks(n, block))
    elif damage == "meta_data":
        data = data.to("meta")
    elif damage == "out_f16":
        out = out.half()
    elif damage == "out_strided" and n > 1:
        out = torch.stack([out, out], 1)[:, 0]
    return out, data, scales, fmt, block, damage


@fuzz_settings(200)
@given(case=accumulate_case(), raw=st.booleans())
def test_fuzz_dequantize_accumulate(case, raw):
    """Wrapper and raw op; 0 chunks leaves out unchanged; bad layouts raise."""
    CASES["dequantize_accumulate"] += 1
    out, data, scales, fmt, block, damage = case
    before = out.clone()
    fn = torch.ops.trainops.dequantize_accumulate if raw else ops.dequantize_accumulate
    call = lambda: fn(out, data, scales, fmt, block)  # noqa: E731
    if damage not in ("none",) and not (damage == "out_strided" and out.is_contiguous()):
        expect_clear_error(call)
        assert torch.equal(out.nan_to_num(), before.nan_to_num())
        return
    want = ref.dequantize_accumulate(before.clone(), data, scales, fmt, block)
    call()
    assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out.nan_to_num(), want.nan_to_num())
    if data.shape[0] == 0:
        assert torch.equal(out.nan_to_num(), before.nan_to_num())


@fuzz_settings(12)
@given(fmt=st.sampled_from(FMTS), n=st.integers(1, 70), near_max=st.booleans(), stochastic=st.booleans())
def test_fuzz_triton_quantize_interpreter(fmt, n, near_max, stochastic):
    """A small Triton subset (interpreter on CPU): same bytes as the reference, near FLT_MAX too."""
    CASES["triton quantize (interpreter)"] += 1
    pytest.importorskip("triton")
    from trainops.kernels import quantize as tq

    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * (3e38 if near_max else 1.0)
    x = x.clamp(-3.4028234663852886e38, 3.4028234663852886e38)
    if near_max:
        x[0] = 3.4028234663852886e38
    data, scales = tq.quantize(x, fmt, 16, stochastic, 5)
    want_data, want_scales = ref.quantize(x, fmt, 16, stochastic=stochastic, seed=5)
    assert torch.equal(data, want_data) and torch.equal(scales, want_scales)
    out = tq.dequantize(data, scales, fmt, 16, n)
    assert torch.equal(out, ref.dequantize(want_data, want_scales, fmt, 16, n))
    assert bool(torch.isfinite(out).all())
