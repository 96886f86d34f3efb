"""MoRA on CUDA (compiled Triton kernels, bf16 tensor-core path): run on the GPU machine."""
import pytest
import torch
from torch import nn

import trainops  # noqa: F401
from trainops.nn import MoRALinear
from trainops.ops import mora
from trainops.reference.mora import mora as ref_mora
from tolerances import random_sum_tolerance, rounding_tolerance

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("F,Rt,top_k,training", [(0, 16, 8, True), (48, 16, 8, False), (96, 64, 16, True),
                                                  (0, 5, 8, True)])
def test_cuda_op_matches_reference(dtype, F, Rt, top_k, training):
    g = torch.Generator(device="cuda").manual_seed(0)
    T, D, N = 333, 256, 192
    x = torch.randn(T, D, device="cuda", generator=g).to(dtype).requires_grad_()
    A = (torch.randn(Rt, D, device="cuda", generator=g) / D**0.5).to(dtype).requires_grad_()
    B = (torch.randn(N, Rt, device="cuda", generator=g) * 0.1).to(dtype).requires_grad_()
    Af = (torch.randn(F, D, device="cuda", generator=g) / D**0.5).to(dtype)
    Bf = (torch.randn(N, F, device="cuda", generator=g) * 0.1).to(dtype)
    kw = dict(top_k=top_k, temperature=0.3, threshold=0.0, training=training, scaling=2.0)
    fa, fb = (Af, Bf) if F else (None, None)
    out = mora(x, A, B, frozen_A=fa, frozen_B=fb, **kw)
    dy = torch.randn_like(out)
    out.backward(dy)
    xr, Ar, Br = (t.detach().double().requires_grad_() for t in (x, A, B))
    exp = ref_mora(xr, Ar, Br, frozen_A=fa.double() if F else None, frozen_B=fb.double() if F else None, **kw)
    exp.backward(dy.double())
    # Longest reduction: the weight gradients over T tokens (the forward's over D is shorter);
    # fp32 accumulation, bf16 operands on the bf16 path (tensor-core inputs, gated intermediates).
    tol = random_sum_tolerance(max(T, D), operand_dtype=dtype)
    for got, want in ((out, exp), (x.grad, xr.grad), (A.grad, Ar.grad), (B.grad, Br.grad)):
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * float(want.abs().max()))


def test_cuda_module_compiles():
    m = MoRALinear(nn.Linear(256, 256), rank=16, top_k=8).cuda().to(torch.bfloat16)
    with torch.no_grad():
        m.lora_B.normal_(0, 0.02)
    m.add_task()
    x = torch.randn(4, 100, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    eager = m(x)
    out = torch.compile(m, fullgraph=True)(x)
    # Same kernels: only where bf16 results are rounded may differ (eager rounds base, delta and
    # their sum; the compiled graph may fuse the add): at most 3 roundings apart.
    tol = rounding_tolerance(torch.bfloat16, 3)
    torch.testing.assert_close(out, eager, rtol=tol, atol=tol * float(eager.abs().max()))
    out.float().sum().backward()
    assert m.lora_A.grad is not None and m.frozen_A.grad is None
