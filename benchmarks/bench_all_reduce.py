"""quantized_all_reduce vs dist.all_reduce (fp32) on N local gloo ranks: wall time and bytes sent.

    python benchmarks/bench_all_reduce.py                 # 64M fp32 elements, 2 ranks
    python benchmarks/bench_all_reduce.py --numel 16777216

Every rank runs the same fixed number of timed repetitions (a collective cannot use
torch.utils.benchmark's adaptive loop: ranks would run different counts), each after a
barrier; rank 0's times give the median and 20/80 percentiles. Bytes are the logical
payload one rank sends (trainops.distributed.stats). Each rank uses one intra-op thread.
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


def _rank(rank, world, numel, formats, reps, threads):
    from trainops.distributed import CommStats, quantized_all_reduce

    torch.set_num_threads(threads)
    x = torch.randn(numel, generator=torch.Generator().manual_seed(rank))
    out = {}

    def timed(fn):
        fn()  # warm-up
        times = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return times

    work = x.clone()
    base_stats = CommStats()
    out["fp32"] = (timed(lambda: quantized_all_reduce(work, "sum", fmt=None, stats=base_stats)),
                   base_stats.bytes_sent // (reps + 1))
    for fmt in formats:
        stats = CommStats()
        out[fmt] = (timed(lambda: quantized_all_reduce(work, "avg", fmt=fmt, stats=stats)),
                    stats.bytes_sent // (reps + 1))
        # accuracy of one call on fresh data, relative to the exact average
        y = x.clone()
        quantized_all_reduce(y, "avg", fmt=fmt)
        exact = x.clone()
        dist.all_reduce(exact)
        exact.div_(world)
        out[fmt + "_relerr"] = float((y - exact).norm() / exact.norm())
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--numel", type=int, default=64 * 2**20, help="fp32 elements per rank (default 64M)")
    p.add_argument("--world", type=int, default=2, help="gloo ranks (default 2)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (default 5)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per rank (default 1)")
    p.add_argument("--formats", default="fp4_e3m0,int8", help="comma-separated formats")
    args = p.parse_args(argv)
    formats = [f for f in args.formats.split(",") if f]

    from trainops.distributed import spawn

    res = spawn(_rank, args.world, args.numel, formats, args.reps, args.threads, backend="gloo", timeout_s=600.0)[0]
    table = Table(f"all-reduce of {args.numel:,} fp32 on {args.world} gloo ranks (CPU, localhost)", "cpu")
    case = {"numel": args.numel, "world": args.world}
    base_bytes = res["fp32"][1]
    table.add(case, "dist.all_reduce fp32", timing_of(res["fp32"][0]), bytes_sent=base_bytes, bytes_ratio=1.0,
              rel_error=0.0)
    for fmt in formats:
        times, nbytes = res[fmt]
        table.add(case, f"quantized_all_reduce {fmt}", timing_of(times), baseline="dist.all_reduce fp32",
                  bytes_sent=nbytes, bytes_ratio=round(base_bytes / nbytes, 2), rel_error=res[fmt + "_relerr"])
    table.report(f"all_reduce_{results_suffix('cpu')}.csv")
    for fmt in formats:
        row = next(r for r in table.rows if r.name.endswith(fmt))
        print(f"{fmt}: {table.speedup(row):.2f}x wall-time speedup, {base_bytes / res[fmt][1]:.2f}x fewer bytes sent")


if __name__ == "__main__":
    main()
