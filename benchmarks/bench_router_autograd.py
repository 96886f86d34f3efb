"""Cost of the router's autograd registration: forward + backward through autograd vs the
same two kernels called directly.

Rows per case (T tokens, E experts, top-k; CPU, the C++ kernels):
  direct    torch.ops.trainops.router_topk under no_grad, then router_topk_backward called
            with the upstream gradients: the two kernels and nothing else (the floor)
  autograd  router_topk on logits that require grad, then torch.autograd.backward from the
            gate weights and prob_sum: what training runs, through whatever autograd is
            registered for trainops::router_topk
``speedup`` is direct / autograd (< 1: the autograd's cost); ``overhead_us`` is their
difference per forward + backward. The registered autograd is printed (``autograd_impl``:
``python`` for torch.library.register_autograd, ``c++`` for a C++ autograd kernel), so the
script compares two builds when run with each, back to back; within a run the two rows are
timed round-robin (harness.measure_interleaved).

Usage: python benchmarks/bench_router_autograd.py [--quick] [--threads N]
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.harness import Table, measure_interleaved, quick_cpu_args  # noqa: E402
import trainops  # noqa: E402, F401  (registers the ops)

CASES = [(256, 64, 8), (4096, 64, 8), (16384, 64, 8), (16384, 128, 4)]
QUICK_CASES = [(256, 64, 8), (4096, 64, 8)]


def autograd_impl() -> str:
    """Which autograd kernel trainops::router_topk has: 'python' or 'c++'."""
    dump = torch._C._dispatch_dump("trainops::router_topk")
    line = next((ln for ln in dump.splitlines() if ln.startswith("Autograd")), "")
    return "c++" if ".cpp" in line else "python"


def workloads(T: int, E: int, k: int):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(T, E, generator=gen)
    grad_w = torch.randn(T, k, generator=gen)
    grad_p = torch.randn(E, generator=gen)
    grad_z = torch.zeros(())
    op, op_bwd = torch.ops.trainops.router_topk, torch.ops.trainops.router_topk_backward

    def direct():
        with torch.no_grad():
            weights, indices, counts, prob_sum, z_sum = op(logits, k, "softmax", True, None, None, False)
        return op_bwd(grad_w, grad_p, grad_z, logits, indices, None, "softmax", True, False)

    leaf = logits.clone().requires_grad_(True)

    def autograd():
        leaf.grad = None
        weights, indices, counts, prob_sum, z_sum = op(leaf, k, "softmax", True, None, None, False)
        torch.autograd.backward([weights, prob_sum], [grad_w, grad_p])
        return leaf.grad

    # Both rows compute the same gradient (a check that the comparison is fair).
    torch.testing.assert_close(autograd(), direct(), rtol=0, atol=0)
    return {"direct": direct, "autograd": autograd}


def main(argv=None) -> None:
    args = quick_cpu_args(__doc__.splitlines()[0], argv)
    impl = autograd_impl()
    table = Table(f"router_topk forward + backward: autograd ({impl}) vs direct kernel calls", "cpu")
    for T, E, k in QUICK_CASES if args.quick else CASES:
        case = {"T": T, "E": E, "k": k, "autograd_impl": impl}
        times = measure_interleaved(workloads(T, E, k), min_run_time=0.2 if args.quick else 1.0)
        table.add(case, "direct", times["direct"])
        overhead_us = (times["autograd"].median_s - times["direct"].median_s) * 1e6
        table.add(case, "autograd", times["autograd"], baseline="direct", overhead_us=round(overhead_us, 1))
    table.report()


if __name__ == "__main__":
    main()
