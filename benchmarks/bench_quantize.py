"""Blockwise quantize / dequantize-accumulate throughput vs memcpy and the composed reference.

Rows per format: the trainops op, the composed-PyTorch reference (trainops.reference)
and a plain copy of the same fp32 tensor (the memory-bandwidth yardstick). Bandwidth
counts the bytes each one moves: quantize reads 4N and writes N·bits/8 + 4N/B;
copy reads and writes 4N each; dequantize-accumulate of C chunks reads C·(N·bits/8 +
4N/B) + 4N and writes 4N.

    python benchmarks/bench_quantize.py [--numel 16777216] [--block-size 128] [--formats ...]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.harness import Table, default_device, measure, results_suffix  # noqa: E402
from trainops import ops, reference  # noqa: E402
from trainops.formats import FORMATS, num_blocks, packed_bytes  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--numel", type=int, default=1 << 24)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--chunks", type=int, default=2, help="chunks summed by dequantize_accumulate")
    p.add_argument("--formats", nargs="+", default=list(FORMATS))
    p.add_argument("--device", default=default_device())
    p.add_argument("--skip-reference", action="store_true", help="skip the slow composed reference")
    p.add_argument("--out", default=None, help="CSV name under benchmarks/results/")
    args = p.parse_args(argv)

    n, B, dev = args.numel, args.block_size, args.device
    x = torch.randn(n, device=dev)
    dst = torch.empty_like(x)
    table = Table(f"quantize / dequantize-accumulate, N={n}, block={B}", dev)

    copy_t = measure(lambda: dst.copy_(x), dev)
    copy_gbs = 8 * n / copy_t.median_s / 1e9
    for fmt in args.formats:
        f = FORMATS[fmt]
        q_bytes = packed_bytes(f, n) + 4 * num_blocks(n, B)
        case = {"op": "quantize", "fmt": fmt}
        table.add(case, "copy fp32 (memcpy)", copy_t, GBps=round(copy_gbs, 2))
        t = measure(lambda: ops.quantize(x, fmt, B, nan_policy="propagate"), dev)
        gbs = (4 * n + q_bytes) / t.median_s / 1e9
        table.add(case, "trainops", t, baseline="reference", GBps=round(gbs, 2),
                  pct_of_copy_bw=round(100 * gbs / copy_gbs, 1))
        if not args.skip_reference:
            table.add(case, "reference", measure(lambda: reference.quantize(x, fmt, B), dev, min_run_time=0.2))

        q = ops.quantize(x, fmt, B)
        data = torch.stack([q.data] * args.chunks)
        scales = torch.stack([q.scales] * args.chunks)
        acc = torch.zeros(n, device=dev)
        case = {"op": f"dequant_accumulate x{args.chunks}", "fmt": fmt}
        t = measure(lambda: ops.dequantize_accumulate(acc, data, scales, fmt, B), dev)
        gbs = (args.chunks * q_bytes + 8 * n) / t.median_s / 1e9
        table.add(case, "copy fp32 (memcpy)", copy_t, GBps=round(copy_gbs, 2))
        table.add(case, "trainops", t, baseline="reference", GBps=round(gbs, 2),
                  pct_of_copy_bw=round(100 * gbs / copy_gbs, 1))
        if not args.skip_reference:
            table.add(case, "reference", measure(
                lambda: reference.dequantize_accumulate(acc, data, scales, fmt, B), dev, min_run_time=0.2))
    table.report(args.out or f"quantize_{results_suffix(dev)}.csv")


if __name__ == "__main__":
    main()
