"""MoRALinear forward + backward of two source trees of trainops, side by side.

Two builds of trainops register the same ``torch.ops.trainops`` names, so they cannot live
in one process. Each measurement runs in a fresh interpreter with one tree first on
``sys.path`` (setuptools' editable-install finder is removed there, so an editable install
of a third tree cannot leak in); the trees alternate within every round and each case keeps
the median of its rounds, which spreads a loaded machine's noise over both sides.

    python -m benchmarks.compare_builds --old /path/old/python --new /path/new/python --rounds 5

Prints one row per case: median ms of the old and the new tree and new/old (above 1: the
new tree is slower). CPU sizes: d = 768, T = 512, R in {16, 64, 160}, k in {8, 16} (the
reduced grid of benchmarks/bench_mora.py).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys

CASES = [dict(d=768, R=R, k=k, T=512) for R, k in itertools.product((16, 64, 160), (8, 16))]

_CHILD = r"""
import json, sys
sys.meta_path[:] = [f for f in sys.meta_path if "Editable" not in type(f).__name__]
sys.path.insert(0, sys.argv[1])
import torch
import torch.utils.benchmark as tb
import trainops
from trainops.nn import MoRALinear
assert trainops.__file__.startswith(sys.argv[1]), trainops.__file__
torch.manual_seed(0)
torch.set_num_threads(int(sys.argv[3]))
out = []
for case in json.loads(sys.argv[2]):
    d, R, k, T = case["d"], case["R"], case["k"], case["T"]
    layer = MoRALinear(torch.nn.Linear(d, d), rank=R, top_k=k)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    x = torch.randn(T, d, requires_grad=True)
    def step():
        layer(x).sum().backward()
    step()
    t = tb.Timer("step()", globals={"step": step}).blocked_autorange(min_run_time=float(sys.argv[4]))
    out.append(t.median * 1e3)
print(json.dumps(out))
"""


def measure(tree: str, threads: int, min_run_time: float) -> list[float]:
    """Median ms per case of one fresh interpreter importing trainops from ``tree``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", _CHILD, tree, json.dumps(CASES), str(threads), str(min_run_time)],
                          env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"measuring {tree} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="the python/ folder of the baseline tree")
    ap.add_argument("--new", required=True, help="the python/ folder of the tree under test")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-run-time", type=float, default=0.5)
    args = ap.parse_args(argv)
    times = {"old": [], "new": []}
    for r in range(args.rounds):
        order = ("old", "new") if r % 2 == 0 else ("new", "old")  # neither side always goes first
        for side in order:
            times[side].append(measure(os.path.abspath(getattr(args, side)), args.threads, args.min_run_time))
    print(f"MoRALinear fwd+bwd, fp32, {args.threads} threads, median of {args.rounds} interleaved rounds")
    print("| d | R | k | T | old ms | new ms | new/old |\n|---|---|---|---|---|---|---|")
    for i, case in enumerate(CASES):
        old = statistics.median(t[i] for t in times["old"])
        new = statistics.median(t[i] for t in times["new"])
        print(f"| {case['d']} | {case['R']} | {case['k']} | {case['T']} | {old:.2f} | {new:.2f} | {new / old:.3f} |")


if __name__ == "__main__":
    main()
