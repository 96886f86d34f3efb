"""Pipelined quantized_all_reduce (pipeline_numel) vs the one-piece exchange, on N gloo ranks.

    python benchmarks/bench_pipelined_all_reduce.py                      # 64M fp32, 2 ranks
    python benchmarks/bench_pipelined_all_reduce.py --pipeline-numel 1048576,4194304,16777216

Both stages of error feedback are on (as in DiLoCo and the DDP hook). The rows of one run
are timed round-robin (one call of each row per round, each after a barrier), so the
ratios do not depend on when a row ran on a shared machine; rank 0's times give the
median and 20/80 percentiles, and every row's speedup is against the one-piece row.
``--pipeline-numel`` is the sweep parameter (elements of the message per piece).

``--hosts N --rate 10gbit,1gbit,100mbit`` runs the exchange between N emulated hosts
instead (network namespaces with rate-limited links, one worker each; needs root), with
the fp32 all_reduce baseline and each time against the bytes each worker really sent
divided by the link rate: benchmarks/bench_exchange_link_rates.py, which this delegates to.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.harness import Table, results_suffix, timing_of  # noqa: E402


def _rank(rank, world, numel, fmt, pieces, reps, threads):
    from trainops.distributed import quantized_all_reduce
    from trainops.distributed.all_reduce import owner_chunk_numel

    torch.set_num_threads(threads)
    x = torch.randn(numel, generator=torch.Generator().manual_seed(rank))
    rows = [None] + pieces
    state = {p: (torch.zeros(numel), torch.zeros(owner_chunk_numel(numel, world, 128))) for p in rows}
    work = x.clone()

    def call(p):
        err, owner = state[p]
        work.copy_(x)
        quantized_all_reduce(work, "avg", fmt=fmt, error_feedback=err, owner_error_feedback=owner,
                             pipeline_numel=p)

    results = {p: [] for p in rows}
    same = True
    for p in rows:  # warm-up, and every row gives the same bytes as the one-piece row
        call(p)
        if p is None:
            first = work.clone()
        else:
            same = same and torch.equal(first, work)
    for _ in range(reps):
        for p in rows:
            dist.barrier()
            t0 = time.perf_counter()
            call(p)
            results[p].append(time.perf_counter() - t0)
    return results, same


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--numel", type=int, default=64 * 2**20, help="fp32 elements per rank (default 64M)")
    p.add_argument("--world", type=int, default=2, help="gloo ranks (default 2)")
    p.add_argument("--fmt", default="fp4_e3m0", help="exchange format (default fp4_e3m0)")
    p.add_argument("--pipeline-numel", default="4194304,16777216",
                   help="comma-separated piece sizes in elements of the message (the sweep)")
    p.add_argument("--reps", type=int, default=5, help="timed rounds (default 5)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per rank (default 1)")
    p.add_argument("--hosts", type=int, default=0, help="emulated hosts (0: local ranks; see the docstring)")
    p.add_argument("--rate", default="10gbit,1gbit,100mbit", help="with --hosts: comma-separated link rates")
    args = p.parse_args(argv)
    pieces = [int(v) for v in args.pipeline_numel.split(",") if v]
    if args.hosts:
        from benchmarks import bench_exchange_link_rates

        return bench_exchange_link_rates.main([
            "--hosts", str(args.hosts), "--rate", args.rate, "--reps", str(args.reps), "--numel", str(args.numel),
            "--formats", args.fmt, "--pipeline-numel", args.pipeline_numel, "--threads", str(args.threads)])

    from trainops.distributed import spawn

    res, same = spawn(_rank, args.world, args.numel, args.fmt, pieces, args.reps, args.threads, backend="gloo",
                      timeout_s=600.0)[0]
    table = Table(f"pipelined quantized all-reduce of {args.numel:,} fp32, {args.fmt}, two-stage error feedback, "
                  f"{args.world} gloo ranks (CPU, localhost)", "cpu")
    case = {"numel": args.numel, "world": args.world, "fmt": args.fmt}
    table.add(case, "one piece", timing_of(res[None]), pipeline_numel="")
    for piece in pieces:
        table.add(case, f"pipeline_numel={piece}", timing_of(res[piece]), baseline="one piece", pipeline_numel=piece)
    table.report(f"pipelined_all_reduce_{results_suffix('cpu')}.csv")
    print(f"results bit-identical to one piece: {same}")
    for row in table.rows[1:]:
        print(f"{row.name}: {table.speedup(row):.2f}x vs one piece")


if __name__ == "__main__":
    main()
