"""Drift of the running sum of quantized all-reduce results: one-stage vs two-stage error feedback.

    python benchmarks/bench_error_feedback_drift.py                  # 200 exchanges, 2 and 3 ranks
    python benchmarks/bench_error_feedback_drift.py --worlds 2 --rounds 500

Each rank's input at exchange t is a fixed per-rank direction plus unit noise (a gradient
or DiLoCo pseudo-gradient, in miniature); the drift is
||sum_t result_t - sum_t mean_r x_{r,t}|| / ||sum_t mean_r x_{r,t}||. One stage: the worker
residual only (the owner's requantization error of the reduced chunk is dropped at every
exchange); two stages: the owner residual too (``owner_error_feedback``). Printed as a
table with the ratio one-stage / two-stage drift. An accuracy measurement, not a timing.
"""
from __future__ import annotations

import argparse

import torch

FORMATS = ("int8", "int4", "fp4_e2m1", "fp4_e3m0")


def _rank(rank, world, numel, rounds, formats, block_size):
    from trainops.distributed import quantized_all_reduce
    from trainops.distributed.all_reduce import owner_chunk_numel

    torch.set_num_threads(1)
    out = {}
    for fmt in formats:
        for stages in (1, 2):
            g = torch.Generator().manual_seed(7)  # the same inputs on every rank, for both runs
            base = [torch.randn(numel, generator=g) for _ in range(world)]
            err = torch.zeros(numel)
            owner = torch.zeros(owner_chunk_numel(numel, world, block_size)) if stages == 2 else None
            running = torch.zeros(numel, dtype=torch.float64)
            exact = torch.zeros(numel, dtype=torch.float64)
            for _ in range(rounds):
                xs = [b + torch.randn(numel, generator=g) for b in base]
                y = xs[rank].clone()
                quantized_all_reduce(y, "avg", fmt=fmt, block_size=block_size, error_feedback=err,
                                     owner_error_feedback=owner, min_numel=0, verify=False)
                running += y.double()
                exact += sum(x.double() for x in xs) / world
            out[fmt, stages] = float((running - exact).norm() / exact.norm())
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", default="2,3", help="comma-separated numbers of gloo ranks")
    p.add_argument("--numel", type=int, default=3001)
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--formats", default=",".join(FORMATS))
    args = p.parse_args(argv)
    formats = [f for f in args.formats.split(",") if f]

    from trainops.distributed import spawn

    print(f"running-sum drift after {args.rounds} exchanges of {args.numel} fp32, block {args.block_size}")
    print("| ranks | format | one stage | two stages | one / two |")
    print("|---|---|---|---|---|")
    for world in (int(w) for w in args.worlds.split(",")):
        res = spawn(_rank, world, args.numel, args.rounds, formats, args.block_size, backend="gloo",
                    timeout_s=600.0)[0]
        for fmt in formats:
            one, two = res[fmt, 1], res[fmt, 2]
            print(f"| {world} | {fmt} | {100 * one:.3f}% | {100 * two:.3f}% | {one / two:.1f}x |")


if __name__ == "__main__":
    main()
