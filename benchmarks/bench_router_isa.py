"""What the CPU router's hand-written AVX2 + FMA row kernels buy over its portable rows.

The C++ router has two row implementations (csrc/cpu/router_rows.h: portable loops, also
compiled as an AVX2 clone by ``target_clones``; csrc/cpu/router_rows_avx2.h: intrinsics),
chosen per call: the AVX2 rows on CPUs with AVX2 + FMA unless ``TRAINOPS_ROUTER_PORTABLE=1``.
The variable is read at every call, so both are timed in one process, round-robin
(harness.measure_interleaved), forward + backward of trainops::router_topk.

Rows per case: ``portable`` (the baseline) and ``avx2``; ``speedup`` = portable / avx2.

Usage: python benchmarks/bench_router_isa.py [--quick] [--threads N]
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.harness import Table, measure_interleaved, quick_cpu_args  # noqa: E402
import trainops  # noqa: E402, F401  (registers the ops)

CASES = [(256, 64, 8), (4096, 64, 8), (16384, 64, 8), (16384, 256, 8), (16384, 128, 4)]
QUICK_CASES = [(256, 64, 8), (4096, 64, 8)]


def _with_rows(portable: bool, fn):
    def run():
        os.environ["TRAINOPS_ROUTER_PORTABLE"] = "1" if portable else "0"
        return fn()
    return run


def workloads(T: int, E: int, k: int, score: str):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(T, E, generator=gen)
    grad_w = torch.randn(T, k, generator=gen)
    grad_p = torch.randn(E, generator=gen)
    grad_z = torch.zeros(())
    op, op_bwd = torch.ops.trainops.router_topk, torch.ops.trainops.router_topk_backward

    def step():
        weights, indices, counts, prob_sum, z_sum = op(logits, k, score, True, None, None, False)
        return indices, op_bwd(grad_w, grad_p, grad_z, logits, indices, None, score, True, False)

    portable, avx2 = _with_rows(True, step), _with_rows(False, step)
    # Same routing from both (scores may differ in the last bits: FMA in exp / dot products).
    assert torch.equal(portable()[0], avx2()[0])
    return {"portable": portable, "avx2": avx2}


def main(argv=None) -> None:
    args = quick_cpu_args(__doc__.splitlines()[0], argv)
    table = Table("router_topk fwd+bwd on CPU: hand-written AVX2 + FMA rows vs portable rows", "cpu")
    try:
        for score in ("softmax", "sigmoid"):
            for T, E, k in QUICK_CASES if args.quick else CASES:
                case = {"T": T, "E": E, "k": k, "score": score}
                times = measure_interleaved(workloads(T, E, k, score), min_run_time=0.2 if args.quick else 1.0)
                table.add(case, "portable", times["portable"])
                table.add(case, "avx2", times["avx2"], baseline="portable")
    finally:
        os.environ.pop("TRAINOPS_ROUTER_PORTABLE", None)
    table.report()


if __name__ == "__main__":
    main()
