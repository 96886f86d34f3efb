"""Global-scope load-balancing loss: one all-reduce per layer vs one per forward
(``GlobalCountSync``), on N local gloo ranks.

    python benchmarks/bench_lbl_sync.py [--layers 48] [--experts 64] [--top-k 8] [--tokens 4096]

Each timed step is what the global scope adds to a forward of a model with L MoE layers:
every layer's ``LoadBalancingLoss`` (global scope) on its router statistics, plus the
all-reduce of the counts, without the backward. The router statistics are computed once,
before the timing, so the rows differ only in how the counts are synchronized:
  per_layer   ``lbl(counts, prob_sum)`` per layer: L small all-reduces (async, each waited
              in the same call)
  batched     ``lbl.deferred(..., sync=sync)`` per layer, then ``sync.run()``: one
              all-reduce of L·(E+1) int64, then the L losses
No layer work runs between the calls, so the per-layer all-reduces have nothing to hide
behind: in a model, each layer's async all-reduce overlaps part of that layer's work, and
the saving is smaller than measured here, while across nodes each collective's latency,
and so what batching saves, is larger than on localhost. Every rank runs the same fixed
number of repetitions, each after a barrier; rank 0's times give the median and
percentiles.
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


def _rank(rank, world, layers, experts, top_k, tokens, reps):
    from trainops.nn import GlobalCountSync, LoadBalancingLoss
    from trainops.ops import router_topk

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(rank)
    stats = [router_topk(torch.randn(tokens, experts, generator=g), top_k)[2:] for _ in range(layers)]
    lbls = [LoadBalancingLoss(experts, top_k, 1e-3, "global") for _ in range(layers)]

    def per_layer():
        return [lbl(counts, psum) for lbl, (counts, psum) in zip(lbls, stats)]

    def batched():
        sync = GlobalCountSync()
        terms = [lbl.deferred(counts, psum, sync=sync) for lbl, (counts, psum) in zip(lbls, stats)]
        sync.run()
        return [term() for term in terms]

    out = {}
    for name, fn in (("per_layer", per_layer), ("batched", batched)):
        fn()  # warm-up
        times = []
        for _ in range(reps):
            for lbl in lbls:
                lbl.reset()
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = times
    # The two give the same losses: checked on the last step's accumulators.
    for lbl in lbls:
        lbl.reset()
    a = torch.stack(per_layer())
    for lbl in lbls:
        lbl.reset()
    b = torch.stack(batched())
    out["max_abs_diff"] = float((a - b).abs().max())
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=48, help="MoE layers L (default 48)")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank per micro-batch")
    p.add_argument("--world", type=int, default=2, help="gloo ranks (default 2)")
    p.add_argument("--reps", type=int, default=50)
    args = p.parse_args(argv)

    from trainops.distributed import spawn

    res = spawn(_rank, args.world, args.layers, args.experts, args.top_k, args.tokens, args.reps,
                backend="gloo", timeout_s=600.0)[0]
    table = Table(f"global-scope LBL sync, {args.layers} layers, E={args.experts}, k={args.top_k}, "
                  f"{args.world} gloo ranks (CPU, localhost)", "cpu")
    case = {"layers": args.layers, "E": args.experts, "world": args.world}
    table.add(case, "per_layer", timing_of(res["per_layer"]), collectives=args.layers)
    table.add(case, "batched", timing_of(res["batched"]), baseline="per_layer", collectives=1,
              max_abs_diff=res["max_abs_diff"])
    table.report(f"lbl_sync_{results_suffix('cpu')}.csv")


if __name__ == "__main__":
    main()
