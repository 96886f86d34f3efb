"""Triton quantization kernels (interpreter on CPU, or CUDA) against the reference bytes."""
import pytest
import torch

from trainops import ops
from trainops import reference as ref
from trainops.formats import FORMATS
from trainops.kernels import quantize as tq

CASES = [(1, 16), (301, 64), (1000, 256), (96, 32)]


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("stochastic", [False, True])
def test_triton_quantize_dequantize_match_reference(fmt, stochastic, triton_device):
    for numel, block in CASES:
        x = torch.randn(numel) * 5
        x[: min(numel, block) // 2] = 0.0  # a partly zero first block
        d_ref, s_ref = ref.quantize(x, fmt, block, stochastic=stochastic, seed=11)
        data, scales = tq.quantize(x.to(triton_device), fmt, block, stochastic, 11)
        assert torch.equal(data.cpu(), d_ref), (numel, block)
        assert torch.equal(scales.cpu(), s_ref), (numel, block)
        out = tq.dequantize(data, scales, fmt, block, numel, dtype=torch.bfloat16)
        assert torch.equal(out.cpu(), ref.dequantize(d_ref, s_ref, fmt, block, numel, torch.bfloat16))


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_triton_error_feedback_and_accumulate_match_reference(fmt, triton_device):
    numel, block = 301, 32
    g = torch.randn(numel).to(torch.float16)
    e = torch.randn(numel) * 0.1
    e_ref = e.clone()
    d_ref, s_ref = ref.quantize(g, fmt, block, error=e_ref)
    e_dev = e.to(triton_device)
    data, scales = tq.quantize(g.to(triton_device), fmt, block, False, 0, error=e_dev)
    assert torch.equal(data.cpu(), d_ref) and torch.equal(scales.cpu(), s_ref)
    assert torch.equal(e_dev.cpu(), e_ref)
    stacked_d = torch.stack([d_ref, d_ref.flip(0)])
    stacked_s = torch.stack([s_ref, s_ref * 2])
    acc = torch.randn(numel)
    expected = ref.dequantize_accumulate(acc.clone(), stacked_d, stacked_s, fmt, block)
    got = tq.dequantize(stacked_d.to(triton_device), stacked_s.to(triton_device), fmt, block, numel,
                        out=acc.to(triton_device))
    assert torch.equal(got.cpu(), expected)


def test_triton_non_finite_block(triton_device):
    x = torch.randn(64)
    x[40] = float("inf")
    data, scales = tq.quantize(x.to(triton_device), "fp4_e3m0", 32, False, 0)
    d_ref, s_ref = ref.quantize(x, "fp4_e3m0", 32)
    assert torch.equal(data.cpu(), d_ref)
    assert torch.isnan(scales[1]) and scales[0] == s_ref[0]


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_cuda_ops_match_cpu_bytes(fmt):
    x = torch.randn(100_003) * 3
    cpu = ops.quantize(x, fmt, 128, stochastic=True, seed=5)
    gpu = ops.quantize(x.cuda(), fmt, 128, stochastic=True, seed=5)
    assert torch.equal(gpu.data.cpu(), cpu.data) and torch.equal(gpu.scales.cpu(), cpu.scales)
    assert torch.equal(ops.dequantize(gpu).cpu(), ops.dequantize(cpu))
    e_cpu, e_gpu = torch.zeros(100_003), torch.zeros(100_003, device="cuda")
    ops.quantize_error_feedback(x, e_cpu, fmt, 128)
    ops.quantize_error_feedback(x.cuda(), e_gpu, fmt, 128)
    assert torch.equal(e_gpu.cpu(), e_cpu)
    torch.library.opcheck(torch.ops.trainops.quantize.default, (x.cuda(), fmt, 128, False, 0))
