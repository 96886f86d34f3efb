"""TorchRL's stock PrioritizedSampler vs trainops' FusedPrioritizedSampler, in one process, in
the same stock ``torchrl.data.ReplayBuffer`` (LazyTensorStorage of TensorDict rows).

Per case (capacity, batch), timed round-robin (``measure_interleaved``):
  sampler.sample      indices + importance weights only (``sampler.sample(storage, B)``)
  rb.sample           end to end: the same plus TorchRL's gather of the rows
  rb.update_priority  priorities of one batch of random slots
The speedup column is stock median / fused median.

TorchRL's PrioritizedSampler needs TorchRL's compiled segment trees (built for torch 2.14), so
this runs where they load (scripts/check_torchrl_stock.sh builds such an environment); anywhere
else it prints why it cannot and exits 0.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import Table, measure_interleaved, results_suffix  # noqa: E402

ALPHA, BETA = 0.6, 0.4


def stock_unavailable() -> str | None:
    try:
        from torchrl.data.replay_buffers.samplers import prioritized
    except ImportError as e:
        return f"torchrl is not installed ({e})"
    if prioritized.SumSegmentTreeFp32 is None:
        return f"TorchRL's compiled segment trees do not load with torch {torch.__version__} (they need torch 2.14)"
    import trainops

    if not trainops.has_extension():
        return "trainops._C is not built for this torch"
    return None


def build(sampler, cap: int, row: int):
    from tensordict import TensorDict
    from torchrl.data import LazyTensorStorage, ReplayBuffer

    rb = ReplayBuffer(storage=LazyTensorStorage(cap), sampler=sampler)
    gen = torch.Generator().manual_seed(0)
    chunk = 1 << 16
    for i in range(0, cap, chunk):
        n = min(chunk, cap - i)
        rb.extend(TensorDict({"obs": torch.randn(n, row, generator=gen)}, [n]))
        rb.update_priority(torch.arange(i, i + n), torch.rand(n, generator=gen) + 0.1)
    return rb


def run_case(table: Table, cap: int, batch: int, row: int, min_run_time: float) -> None:
    from torchrl.data.replay_buffers.samplers import PrioritizedSampler

    from trainops.replay.torchrl import FusedPrioritizedSampler

    stock = build(PrioritizedSampler(cap, ALPHA, BETA), cap, row)
    fused = build(FusedPrioritizedSampler(cap, ALPHA, BETA, seed=0), cap, row)
    idx = torch.randint(0, cap, (batch,), generator=torch.Generator().manual_seed(1))
    prio = torch.rand(batch, generator=torch.Generator().manual_seed(2)) + 0.1
    case = {"capacity": cap, "batch": batch, "row": f"{row}xfp32"}
    work = {
        "sampler.sample": lambda rb: rb._sampler.sample(rb._storage, batch),
        "rb.sample": lambda rb: rb.sample(batch),
        "rb.update_priority": lambda rb: rb.update_priority(idx, prio),
    }
    for op, fn in work.items():
        t = measure_interleaved({"stock": lambda: fn(stock), "fused": lambda: fn(fused)}, "cpu", min_run_time)
        c = {**case, "op": op}
        table.add(c, "torchrl PrioritizedSampler", t["stock"])
        table.add(c, "trainops FusedPrioritizedSampler", t["fused"], baseline="torchrl PrioritizedSampler",
                  samples_per_s=round(batch / t["fused"].median_s))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--capacity", type=int, default=1 << 20)
    ap.add_argument("--batch", type=int, nargs="+", default=[256, 4096])
    ap.add_argument("--row", type=int, default=16, help="fp32 elements per stored row")
    ap.add_argument("--min-run-time", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's); TorchRL's segment trees use one thread, the fused op "
                         "parallelizes with OpenMP, whose barriers suffer on an oversubscribed shared machine")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    why = stock_unavailable()
    if why is not None:
        print(f"TorchRL comparison not run: {why}")
        return None
    import torchrl

    table = Table(f"TorchRL {torchrl.__version__} PrioritizedSampler vs FusedPrioritizedSampler "
                  f"(stock torchrl ReplayBuffer + LazyTensorStorage; {torch.get_num_threads()} torch threads)", "cpu")
    for batch in args.batch:
        run_case(table, args.capacity, batch, args.row, args.min_run_time)
    return table.report(f"replay_torchrl_{results_suffix('cpu')}.csv")


if __name__ == "__main__":
    main()
