"""Per-call cost of trainops.replay.ReplayBuffer.sample / update_priorities at small batches.

Per case (capacity, batch), timed round-robin in one process (``measure_interleaved``):
  raw op          the registered op alone on the buffer's own tensors (the floor)
  ReplayBuffer    the buffer's method: argument checks, host reads, then the same op
  baseline        (with ``--baseline-tree``) the buffer class of another source tree, e.g. an
                  earlier commit's ``python/``, run on this tree's ops: it isolates the Python
                  side of a change, since two builds of the kernels cannot share one process
The speedup column is raw op (or baseline) median / ReplayBuffer median; ``overhead_us`` is the
ReplayBuffer median minus the raw op median.

    python benchmarks/bench_replay_overhead.py --baseline-tree /path/to/old/python
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import Table, measure_interleaved, results_suffix  # noqa: E402
from trainops._replay_spec import WEIGHT_MODE_NUMBERS  # noqa: E402
from trainops.replay import ReplayBuffer  # noqa: E402

ALPHA, BETA, EPS = 0.6, 0.4, 1e-6


def baseline_class(tree: str):
    """``ReplayBuffer`` of ``tree``/trainops/replay/buffer.py, importing this tree's trainops."""
    path = os.path.join(tree, "trainops", "replay", "buffer.py")
    spec = importlib.util.spec_from_file_location("baseline_replay_buffer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ReplayBuffer


def build(cls, cap: int, row: int):
    buf = cls(cap, {"x": ((row,), torch.float32)}, sampler="prioritized", alpha=ALPHA, beta=BETA, seed=0,
              priority_eps=EPS)
    gen = torch.Generator().manual_seed(0)
    chunk = 1 << 16
    for i in range(0, cap, chunk):
        n = min(chunk, cap - i)
        buf.add({"x": torch.randn(n, row, generator=gen)}, priority=torch.rand(n, generator=gen) + 0.1)
    return buf


def run_case(table: Table, bufs: dict, cap: int, batch: int, row: int, min_run_time: float) -> None:
    new = bufs["ReplayBuffer"]
    s = new.sample(batch)
    prio = torch.rand(batch, generator=torch.Generator().manual_seed(1)) + 0.1
    storage = [new.storage["x"], new.generations.view(cap, 1)]
    weights_mode = WEIGHT_MODE_NUMBERS["weights"]  # the raw schema takes the number

    def raw_sample():
        out = [torch.empty((batch, *st.shape[1:]), dtype=st.dtype) for st in storage]
        return torch.ops.trainops.replay_sample(storage, out, None, [False, False], new.weights, new.block_stats, None,
                                                None, weights_mode, new.size, 0, batch, 0, BETA, False, True, 0, 0)

    def raw_update():
        return torch.ops.trainops.replay_update_priorities(new.priorities, new.weights, new.block_stats, new._winner,
                                                           new.generations, s.indices, prio, s.generations, ALPHA,
                                                           EPS, new.size)

    work = {
        "sample": (raw_sample, lambda b: b.sample(batch)),
        "update_priorities": (raw_update, lambda b: b.update_priorities(s.indices, prio, generation=s.generations)),
    }
    case = {"capacity": cap, "batch": batch, "row": f"{row}xfp32"}
    for op, (raw, method) in work.items():
        fns = {"raw op": raw, **{name: (lambda b=b: method(b)) for name, b in bufs.items()}}
        t = measure_interleaved(fns, "cpu", min_run_time)
        c = {**case, "op": op}
        table.add(c, "raw op", t["raw op"])
        if "baseline" in t:
            table.add(c, "baseline", t["baseline"], overhead_us=round((t["baseline"].median_s - t["raw op"].median_s)
                                                                      * 1e6, 1))
        table.add(c, "ReplayBuffer", t["ReplayBuffer"], baseline="baseline" if "baseline" in t else "raw op",
                  overhead_us=round((t["ReplayBuffer"].median_s - t["raw op"].median_s) * 1e6, 1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--capacity", type=int, default=1 << 20)
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--row", type=int, default=16, help="fp32 elements per stored row")
    ap.add_argument("--min-run-time", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--baseline-tree", default=None, help="python/ folder whose ReplayBuffer is the baseline")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bufs = {"ReplayBuffer": build(ReplayBuffer, args.capacity, args.row)}
    if args.baseline_tree:
        bufs["baseline"] = build(baseline_class(args.baseline_tree), args.capacity, args.row)
    table = Table(f"ReplayBuffer per-call cost at small batches ({torch.get_num_threads()} torch threads"
                  f"{'; baseline: ReplayBuffer of ' + args.baseline_tree if args.baseline_tree else ''})", "cpu")
    for batch in args.batch:
        run_case(table, bufs, args.capacity, batch, args.row, args.min_run_time)
    return table.report(f"replay_overhead_{results_suffix('cpu')}.csv")


if __name__ == "__main__":
    main()
