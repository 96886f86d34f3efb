"""``python -m benchmarks.wan.sweep``: the slow-link sweep, methods x link rates on 2 emulated hosts.

    python -m benchmarks.wan.sweep --out /tmp/wan_sweep                  # 5 methods x 3 rates
    python -m benchmarks.wan.sweep --out /tmp/wan_sweep --rates 100mbit --methods ddp_fp32,sdiloco_fp4
    python -m benchmarks.wan.summarize --sweep /tmp/wan_sweep --plot benchmarks/results/wan_cpu.png

Each run is ``python -m benchmarks.wan.run --hosts 2 --rate R -- <model> <method> --out-dir
OUT/R/METHOD`` (one ``torchrun`` per emulated host, c10d rendezvous on host 0, gloo over the
rate-limited links); its stdout goes to ``OUT/R/METHOD.out``. A run whose ``summary.json``
exists is skipped, so an interrupted sweep continues where it stopped. Rates are run slowest
first: the 100 Mbit/s runs are the point of the sweep. Needs root (network namespaces, tc).

The model (``MODEL``): the runtime's MoE transformer at d_model 128, 8 experts of ffn 256,
2 layers: 1.74 M parameters, 7.0 MB in fp32. A ring all-reduce of its gradients sends about
7 MB per worker and step (2 (W - 1) / W x 7 MB, W = 2), 0.56 s at 100 Mbit/s, against about
0.2 s of computation per step measured on one shared core: DDP fp32 is communication-bound
at 100 Mbit/s (and compute-bound at 1 and 10 Gbit/s), and the 15 runs fit in about 35 minutes.
The computation grows with the parameters about as fast as the bytes on this CPU (expert
weights and optimizer state are touched every step), so a larger model raises both and
only lengthens the sweep. One phase (no pre-training, no adapter, no replay): all parameters
train on ``arith`` with AdamW at ``task_lr``.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

MODEL = ["--tasks", "arith", "--pretrain-steps", "0", "--adapter", "none", "--replay", "off",
         "--d-model", "128", "--n-heads", "4", "--ffn-size", "256", "--top-k", "2",
         "--n-layers", "2", "--batch-size", "16", "--eval-size", "64", "--threads", "1",
         "--checkpoint-every", "0", "--no-progress", "--log-every", "50", "--timeout-s", "900"]

METHODS = {
    "ddp_fp32": ["--sync", "ddp", "--ddp-hook", "fp32"],
    "ddp_int8": ["--sync", "ddp", "--ddp-hook", "int8"],
    "ddp_fp4": ["--sync", "ddp", "--ddp-hook", "fp4_e3m0"],
    "diloco_fp32": ["--sync", "diloco", "--exchange", "fp32", "--sync-every", "10", "--fragments", "1"],
    "sdiloco_fp4": ["--sync", "diloco", "--exchange", "fp4_e3m0", "--sync-every", "10", "--fragments", "2",
                    "--overlap-steps", "2"],
    # tuned for this short job: H = 10 keeps the two workers apart too long to leave the loss
    # plateau; syncing every 2 steps with a plain average of the workers (outer lr 1, no
    # momentum) learns faster per step than DDP, and the FP4 exchange of half the model per
    # step still hides behind one step of computation at 100 Mbit/s
    "diloco_fp32_h2": ["--sync", "diloco", "--exchange", "fp32", "--sync-every", "2", "--fragments", "1",
                       "--outer-momentum", "0"],
    "sdiloco_fp4_h2": ["--sync", "diloco", "--exchange", "fp4_e3m0", "--sync-every", "2", "--fragments", "2",
                       "--overlap-steps", "1", "--outer-momentum", "0"],
    # a third / a quarter of the model per step with two steps to hide it in: less exchange
    # work per step than sdiloco_fp4_h2, each parameter averaged less often
    "sdiloco_fp4_h3": ["--sync", "diloco", "--exchange", "fp4_e3m0", "--sync-every", "3", "--fragments", "3",
                       "--overlap-steps", "2", "--outer-momentum", "0"],
    "sdiloco_fp4_h4": ["--sync", "diloco", "--exchange", "fp4_e3m0", "--sync-every", "4", "--fragments", "4",
                       "--overlap-steps", "2", "--outer-momentum", "0"],
}
RATES = ("100mbit", "1gbit", "10gbit")
# tbf needs a bucket of at least rate x timer tick to reach its rate: 1 ms worth, at least 64 KB.
BURST = {"100mbit": "64kb", "1gbit": "128kb", "10gbit": "1280kb"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.wan.sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory of the runs (OUT/RATE/METHOD)")
    ap.add_argument("--rates", default=",".join(RATES))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps of every run (a multiple of 10)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port", type=int, default=29431)
    ap.add_argument("--num-experts", type=int, default=8,
                    help="experts per MoE layer of MODEL (parameters and bytes grow with it, FLOPs per token do not)")
    args = ap.parse_args(argv)
    rates, methods = args.rates.split(","), args.methods.split(",")
    for m in methods:
        if m not in METHODS:
            ap.error(f"--methods: unknown {m!r}; known: {', '.join(METHODS)}")
    for r in rates:
        if r not in BURST:
            ap.error(f"--rates: unknown {r!r}; known: {', '.join(BURST)}")
    started = time.perf_counter()
    for rate in rates:
        for method in methods:
            out = os.path.join(args.out, rate, method)
            if os.path.exists(os.path.join(out, "summary.json")):
                print(f"{rate} {method}: done before, skipped", flush=True)
                continue
            os.makedirs(os.path.dirname(out), exist_ok=True)
            cmd = [sys.executable, "-m", "benchmarks.wan.run", "--hosts", "2", "--rate", rate, "--burst",
                   BURST[rate], "--port", str(args.port), "--", *MODEL, "--num-experts", str(args.num_experts),
                   *METHODS[method],
                   "--task-steps", str(args.steps), "--seed", str(args.seed), "--overwrite", "--out-dir", out]
            t = time.perf_counter()
            with open(out + ".out", "w") as fh:
                fh.write(" ".join(cmd) + "\n")
                fh.flush()
                code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode
            print(f"{rate} {method}: exit {code}, {time.perf_counter() - t:.0f}s "
                  f"(sweep {time.perf_counter() - started:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
