"""``python -m benchmarks.wan.summarize NAME=OUT_DIR ...``: one markdown table row per run.

Reads what ``python -m benchmarks.wan.run`` left: ``OUT_DIR/metrics.jsonl`` (loss, bytes
sent by rank 0, which every worker matches), ``OUT_DIR/summary.json`` (accuracy) and the
wall clock line the runner printed into ``OUT_DIR.out`` when present.
"""
from __future__ import annotations

import json
import os
import re
import sys


def row(name: str, out: str) -> str:
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        rows = [json.loads(ln) for ln in fh]
    steps = [r for r in rows if "event" not in r]
    last = steps[-5:]
    loss = sum(r["loss"] for r in last) / len(last)
    sent = steps[-1]["bytes_sent"]
    wall = "n/a"
    if os.path.exists(out + ".out"):
        m = re.search(r"wall clock ([0-9.]+)s", open(out + ".out").read())
        wall = m.group(1) if m else wall
    acc = "n/a"
    if os.path.exists(os.path.join(out, "summary.json")):
        acc = f"{json.load(open(os.path.join(out, 'summary.json')))['final_avg_accuracy']:.3f}"
    return f"| {name} | {len(steps)} | {wall} | {loss:.4f} | {sent / 1e6:.3f} | {acc} |"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    print("| run | steps | wall clock s (whole job, 2 hosts) | loss (mean of last 5 steps, rank 0) "
          "| MB sent per worker | final avg exact-match |")
    print("|---|---|---|---|---|---|")
    for arg in argv:
        name, out = arg.split("=", 1)
        print(row(name, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
