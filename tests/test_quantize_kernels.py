"""The CPU quantize / decode kernels, AVX2 and portable, byte for byte against trainops.reference.

On an x86-64 CPU with AVX2 + FMA the ops run the AVX2 kernels (FP4 encoder, decoder of
dequantize / dequantize_accumulate); TRAINOPS_QUANTIZE_PORTABLE=1 (read at each call)
selects the portable ones that other CPUs run. Every test here runs with both.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import trainops
from trainops import ops
from trainops import reference as ref
from trainops.formats import FORMATS, num_blocks, packed_bytes

pytestmark = pytest.mark.skipif(not trainops.has_extension(), reason="C++ extension not built")

ALL_FORMATS = list(FORMATS)


@pytest.fixture(autouse=True, params=["native", "portable"])
def kernels(request, monkeypatch):
    monkeypatch.setenv("TRAINOPS_QUANTIZE_PORTABLE", "1" if request.param == "portable" else "0")
    return request.param


def assert_same_bits(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal bit patterns (so -0.0 != 0.0); NaN only where the reference has NaN."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    nan = expected.isnan()
    assert torch.equal(got.isnan(), nan)
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[got.dtype]
    assert torch.equal(got[~nan].view(bits), expected[~nan].view(bits))


def random_packed(fmt, numel, block, chunks, gen):
    """Uniform random bytes (every code, both signs, -0 codes) and scales spanning many binades."""
    data = torch.randint(0, 256, (chunks, packed_bytes(fmt, numel)), dtype=torch.uint8, generator=gen)
    exps = torch.randint(-60, 60, (chunks, num_blocks(numel, block)), generator=gen).float()
    scales = torch.rand(chunks, num_blocks(numel, block), generator=gen) * torch.exp2(exps)
    return data, scales


@pytest.mark.parametrize("fmt", ALL_FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_code_decodes_like_the_reference(fmt, dtype):
    # Each byte value at every position of a 16-element step (the vector decoder's width),
    # with scale 1 (the raw code values, -0.0 included) and with other scales.
    codes = torch.arange(256, dtype=torch.uint8)
    data = torch.cat([codes.roll(k) for k in range(17)])
    numel = data.numel() * (2 if FORMATS[fmt].bits == 4 else 1)
    for scales in (torch.ones(num_blocks(numel, 16)), torch.rand(num_blocks(numel, 16)) * 1e3):
        q = ops.QuantizedTensor(data, scales, fmt, 16, torch.Size([numel]), dtype)
        assert_same_bits(ops.dequantize(q), ref.dequantize(data, scales, fmt, 16, numel, dtype))


@settings(max_examples=50, deadline=None)
@given(fmt=st.sampled_from(ALL_FORMATS), numel=st.integers(1, 1100), block_log2=st.integers(4, 9),
       chunks=st.integers(0, 4), seed=st.integers(0, 2**31 - 1), special=st.booleans())
def test_dequantize_accumulate_matches_reference_bits(fmt, numel, block_log2, chunks, seed, special):
    gen = torch.Generator().manual_seed(seed)
    block = 2**block_log2
    data, scales = random_packed(fmt, numel, block, chunks, gen)
    out = torch.randn(numel, generator=gen)
    if special:  # -0.0 accumulators, Inf, NaN scales (a non-finite block)
        out[::3] = -0.0
        out[1::7] = float("inf")
        if chunks:
            scales[0, ::5] = float("nan")
    expected = ref.dequantize_accumulate(out.clone(), data, scales, fmt, block)
    assert ops.dequantize_accumulate(out, data, scales, fmt, block) is out
    assert_same_bits(out, expected)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
@pytest.mark.parametrize("block", [16, 128, 8192])
def test_large_tensors_split_over_tasks(fmt, block):
    # Several parallel_for tasks (2 threads), a tail that is not a whole 16-element step,
    # through the quantize -> dequantize_accumulate path of the exchange.
    numel, chunks = 200_003, 3
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(block)
        xs = [torch.randn(numel, generator=gen) * 4 for _ in range(chunks)]
        qs = [ops.quantize(x, fmt, block) for x in xs]
        ref_data, ref_scales = ref.quantize(xs[0], fmt, block)
        assert torch.equal(qs[0].data, ref_data) and torch.equal(qs[0].scales, ref_scales)
        data = torch.stack([q.data for q in qs])
        scales = torch.stack([q.scales for q in qs])
        out = torch.randn(numel, generator=gen)
        expected = ref.dequantize_accumulate(out.clone(), data, scales, fmt, block)
        assert_same_bits(ops.dequantize_accumulate(out, data, scales, fmt, block), expected)
        assert_same_bits(ops.dequantize(qs[0]), ref.dequantize(qs[0].data, qs[0].scales, fmt, block, numel))
    finally:
        torch.set_num_threads(before)


@settings(max_examples=40, deadline=None)
@given(fmt=st.sampled_from(["fp4_e3m0", "fp4_e2m1"]), numel=st.integers(1, 700), block_log2=st.integers(4, 8),
       seed=st.integers(0, 2**31 - 1))
def test_fp4_encoder_matches_reference_bytes(fmt, numel, block_log2, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=gen) * torch.rand(1, generator=gen) * 10
    x[::11] = 0.0
    x[1::13] = -0.0
    q = ops.quantize(x, fmt, 2**block_log2)
    data, scales = ref.quantize(x, fmt, 2**block_log2)
    assert torch.equal(q.data, data) and torch.equal(q.scales, scales)


@settings(max_examples=40, deadline=None)
@given(fmt=st.sampled_from(["fp4_e3m0", "fp4_e2m1"]), numel=st.integers(1, 700), block_log2=st.integers(4, 8),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**31 - 1))
def test_fp4_error_feedback_residual_matches_reference_bits(fmt, numel, block_log2, dtype, seed):
    # The AVX2 encoder writes the residual x + e - decode(code) * scale of whole 16-element
    # steps itself; the scalar loop does the tail: both must equal the reference bit for bit,
    # signed zeros included (a value exactly on the grid leaves a zero residual).
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(numel, generator=gen) * torch.rand(1, generator=gen) * 10).to(dtype)
    x[::11] = 0.0
    x[1::13] = -0.0
    error = torch.randn(numel, generator=gen) * 0.05
    error[2::17] = -0.0
    error_ref = error.clone()
    q = ops.quantize_error_feedback(x, error, fmt, 2**block_log2)
    data, scales = ref.quantize(x, fmt, 2**block_log2, error=error_ref)
    assert torch.equal(q.data, data) and torch.equal(q.scales, scales)
    assert_same_bits(error, error_ref)
