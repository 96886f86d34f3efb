"""MoELayer forward + backward: expert weights taken with one ``unbind`` (what the layer does)
against indexing ``gate_up[e]`` / ``down[e]`` per expert (its earlier formulation), in one process.

Both rows run the same routing and the same per-expert matmuls and give bit-identical
outputs and gradients (checked before timing). They differ only in autograd's bookkeeping
of the expert weights: the backward of ``gate_up[e]`` (a select) materializes a zero
gradient of the whole [E, 2F, H] tensor and adds into it, for each of the E experts, so its
cost grows as E^2 · F · H; ``unbind``'s backward stacks the E slices once (E · F · H).

Rows per case (tokens T = batch x seq, hidden H, ffn F, E experts, top-k 2, CPU, fp32):
``per_expert_index`` (baseline) and ``unbind``; ``speedup`` = baseline median / unbind median.

Usage: python benchmarks/bench_moe_layer.py [--quick] [--threads N]   (writes results/moe_layer_cpu.csv)
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.harness import Table, measure_interleaved, quick_cpu_args  # noqa: E402
from trainops.nn import MoELayer  # noqa: E402

# (tokens, hidden, ffn, experts): the runtime's MoE at its WAN-benchmark widths (16 x 12 tokens)
CASES = [(192, 128, 256, 8), (192, 128, 256, 32), (192, 128, 256, 64), (2048, 128, 256, 32)]
QUICK_CASES = [(64, 32, 64, 4), (64, 32, 64, 16)]


def workloads(T: int, H: int, F: int, E: int):
    torch.manual_seed(0)
    layer = MoELayer(H, F, E, 2, lbl_coeff=0.01)
    x = torch.randn(T, H)

    def run(weights):
        def step():
            layer.zero_grad(set_to_none=True)
            y, aux = layer._mix(x, None, *weights())
            (y.square().mean() + aux).backward()
            return y.detach(), [p.grad.clone() for p in layer.parameters()]
        return step

    rows = {"per_expert_index": run(lambda: ([layer.gate_up[e] for e in range(E)], [layer.down[e] for e in range(E)])),
            "unbind": run(lambda: (layer.gate_up.unbind(0), layer.down.unbind(0)))}
    (y0, g0), (y1, g1) = rows["per_expert_index"](), rows["unbind"]()
    assert torch.equal(y0, y1) and all(torch.equal(a, b) for a, b in zip(g0, g1)), "rows disagree"
    return rows


def main(argv=None) -> None:
    args = quick_cpu_args(__doc__.splitlines()[0], argv)
    table = Table("MoELayer forward + backward: unbind vs per-expert indexing of the expert weights", "cpu")
    for T, H, F, E in QUICK_CASES if args.quick else CASES:
        times = measure_interleaved(workloads(T, H, F, E), min_run_time=0.2 if args.quick else 1.0)
        case = {"tokens": T, "hidden": H, "ffn": F, "experts": E, "threads": torch.get_num_threads()}
        table.add(case, "per_expert_index", times["per_expert_index"])
        table.add(case, "unbind", times["unbind"], baseline="per_expert_index")
    table.report("moe_layer_cpu.csv")


if __name__ == "__main__":
    main()
