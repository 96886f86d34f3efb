"""Blockwise quantize / dequantize-accumulate bandwidth against memcpy, in one process.

Bandwidth of a call = the bytes it reads plus the bytes it writes, divided by its median
time. For N fp32 elements, block size B and a format of b bits per code (packed bytes
P = N·b/8, scales S = 4·ceil(N/B)):

    copy (torch.Tensor.copy_ of an fp32 tensor of N elements): reads 4N, writes 4N
    quantize:                                      reads 4N, writes P + S
    quantize_error_feedback (fp32 residual e):     reads 8N, writes P + S + 4N
    dequantize_accumulate of C chunks into fp32 out: reads C·(P + S) + 4N, writes 4N

``pct_of_copy_bw`` = 100 · bandwidth / copy bandwidth, both timed in the same process,
round-robin (harness.measure_interleaved: one block of calls of each row in turn, so a
slow phase of a shared machine falls on all rows), at each thread count of
``--threads`` (the composed-PyTorch reference, trainops.reference, is timed alone after
them). On CPUs with AVX2 + FMA the ops run their AVX2 kernels; the "portable"
rows run the same ops with TRAINOPS_QUANTIZE_PORTABLE=1 (the x86-64-v2 kernels), and
``speedup`` is portable median / AVX2 median.

    python benchmarks/bench_quantize.py [--numel 16777216] [--block-size 128] [--chunks 1 2 4]
        [--threads 1 2] [--formats ...] [--skip-reference]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.harness import Table, default_device, measure, measure_interleaved, results_suffix  # noqa: E402
from trainops import ops, reference  # noqa: E402
from trainops.formats import FORMATS, num_blocks, packed_bytes  # noqa: E402

_PORTABLE = "TRAINOPS_QUANTIZE_PORTABLE"


def portable(fn):
    """fn run with the portable CPU kernels (the switch is read at each call)."""
    def run():
        old = os.environ.get(_PORTABLE)
        os.environ[_PORTABLE] = "1"
        try:
            return fn()
        finally:
            if old is None:
                del os.environ[_PORTABLE]
            else:
                os.environ[_PORTABLE] = old
    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--numel", type=int, default=1 << 24)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--chunks", type=int, nargs="+", default=[2], help="chunks summed by dequantize_accumulate")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch.set_num_threads values (CPU)")
    p.add_argument("--formats", nargs="+", default=list(FORMATS))
    p.add_argument("--device", default=default_device())
    p.add_argument("--min-run-time", type=float, default=0.5, help="seconds per row and case")
    p.add_argument("--skip-reference", action="store_true", help="skip the slow composed reference")
    p.add_argument("--out", default=None, help="CSV name under benchmarks/results/")
    args = p.parse_args(argv)

    n, B, dev = args.numel, args.block_size, args.device
    on_cpu = not dev.startswith("cuda")
    x = torch.randn(n, device=dev)
    dst = torch.empty_like(x)
    acc = torch.zeros(n, device=dev)
    residual = torch.zeros(n, device=dev)  # stays small: each call leaves x's rounding error
    table = Table(f"quantize / dequantize-accumulate vs copy, N={n} fp32, block={B}", dev)

    def copy():
        dst.copy_(x)

    for threads in args.threads if on_cpu else [None]:
        if threads is not None:
            torch.set_num_threads(threads)
        for fmt in args.formats:
            f = FORMATS[fmt]
            q_bytes = packed_bytes(f, n) + 4 * num_blocks(n, B)
            q = ops.quantize(x, fmt, B)
            moved = {"quantize": 4 * n + q_bytes, "quantize_error_feedback": 12 * n + q_bytes}
            rows = {"copy fp32 (memcpy)": copy, "quantize": lambda: ops.quantize(x, fmt, B, nan_policy="propagate"),
                    "quantize_error_feedback": lambda: ops.quantize_error_feedback(x, residual, fmt, B,
                                                                                   nan_policy="propagate")}
            stacked = {}
            for c in args.chunks:
                stacked[c] = (torch.stack([q.data] * c), torch.stack([q.scales] * c))
                rows[f"dequant_accumulate x{c}"] = (
                    lambda d=stacked[c]: ops.dequantize_accumulate(acc, d[0], d[1], fmt, B))
                moved[f"dequant_accumulate x{c}"] = c * q_bytes + 8 * n
            if on_cpu:
                rows.update({f"{name} portable": portable(fn) for name, fn in list(rows.items()) if name in moved})
            t = measure_interleaved(rows, dev, args.min_run_time)
            copy_gbs = 8 * n / t["copy fp32 (memcpy)"].median_s / 1e9
            for op, nbytes in moved.items():
                case = {"threads": threads or "", "op": op, "fmt": fmt}
                table.add(case, "copy fp32 (memcpy)", t["copy fp32 (memcpy)"], GBps=round(copy_gbs, 2))
                for impl in ("portable", "trainops") if on_cpu else ("trainops",):
                    timing = t[op if impl == "trainops" else f"{op} portable"]
                    gbs = nbytes / timing.median_s / 1e9
                    table.add(case, impl, timing, baseline="portable" if impl == "trainops" and on_cpu else None,
                              GBps=round(gbs, 2), pct_of_copy_bw=round(100 * gbs / copy_gbs, 1))
                if not args.skip_reference:
                    if op == "quantize":
                        ref = measure(lambda: reference.quantize(x, fmt, B), dev, min_run_time=0.2)
                    elif op == "quantize_error_feedback":
                        e = residual.clone()
                        ref = measure(lambda: reference.quantize(x, fmt, B, error=e), dev, min_run_time=0.2)
                    else:
                        d = stacked[int(op.rsplit("x", 1)[1])]
                        ref = measure(lambda: reference.dequantize_accumulate(acc, d[0], d[1], fmt, B), dev,
                                      min_run_time=0.2)
                    table.add(case, "reference", ref)
    table.report(args.out or f"quantize_{results_suffix(dev)}.csv")


if __name__ == "__main__":
    main()
