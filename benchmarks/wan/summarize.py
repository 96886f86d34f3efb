"""Tables (and a plot) of what ``python -m benchmarks.wan.run`` / ``benchmarks.wan.sweep`` left.

    python -m benchmarks.wan.summarize NAME=OUT_DIR ...           # one row per run
    python -m benchmarks.wan.summarize --sweep DIR [--plot PNG]   # the sweep: a table per link rate

Reads ``OUT_DIR/metrics.jsonl`` (rank 0's rows: loss, ``bytes_sent``, which every worker
matches, and the time stamps ``wall_s``, ``comm_s``, ``flag_s``), ``OUT_DIR/summary.json``
(accuracy) and the wall clock line the runner printed into ``OUT_DIR.out`` when present.

Definitions (sweep):

* loss: the training loss smoothed by a running mean over the last ``--window`` steps
  (per-step losses are of one small batch); final loss: its last value.
* target: DDP fp32's final loss x ``--target-factor`` (1.02) at the same link rate;
  time to target: ``wall_s`` of the first step whose smoothed loss is <= target.
* compute utilization: 1 - (comm_s + flag_s) / wall_s at the last step: the fraction of
  the training wall clock in which rank 0 was not blocked in a collective (the gradient /
  pseudo-gradient exchange, and the per-step agreement on stopping).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

METHOD_ORDER = ("ddp_fp32", "ddp_int8", "ddp_fp4", "diloco_fp32", "sdiloco_fp4", "diloco_fp32_h2", "sdiloco_fp4_h2",
                "sdiloco_fp4_h3", "sdiloco_fp4_h4")
LABELS = {"ddp_fp32": "DDP fp32", "ddp_int8": "DDP + quantized hook int8", "ddp_fp4": "DDP + quantized hook fp4_e3m0",
          "diloco_fp32": "DiLoCo fp32 (H 10)", "sdiloco_fp4": "Streaming DiLoCo fp4_e3m0 (H 10, P 2, tau 2)",
          "diloco_fp32_h2": "DiLoCo fp32 (H 2, outer momentum 0)",
          "sdiloco_fp4_h2": "Streaming DiLoCo fp4_e3m0 (H 2, P 2, tau 1, outer momentum 0)",
          "sdiloco_fp4_h3": "Streaming DiLoCo fp4_e3m0 (H 3, P 3, tau 2, outer momentum 0)",
          "sdiloco_fp4_h4": "Streaming DiLoCo fp4_e3m0 (H 4, P 4, tau 2, outer momentum 0)"}


def _steps(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [r for r in (json.loads(ln) for ln in fh) if "event" not in r]


def _job_wall(out: str) -> str:
    if os.path.exists(out + ".out"):
        m = re.search(r"wall clock ([0-9.]+)s", open(out + ".out").read())
        if m:
            return m.group(1)
    return "n/a"


def row(name: str, out: str) -> str:
    steps = _steps(out)
    last = steps[-5:]
    loss = sum(r["loss"] for r in last) / len(last)
    sent = steps[-1]["bytes_sent"]
    acc = "n/a"
    if os.path.exists(os.path.join(out, "summary.json")):
        acc = f"{json.load(open(os.path.join(out, 'summary.json')))['final_avg_accuracy']:.3f}"
    return f"| {name} | {len(steps)} | {_job_wall(out)} | {loss:.4f} | {sent / 1e6:.3f} | {acc} |"


def smoothed(steps: list[dict], window: int) -> list[float]:
    out, acc = [], []
    for r in steps:
        acc.append(r["loss"])
        tail = acc[-window:]
        out.append(sum(tail) / len(tail))
    return out


def time_to(steps: list[dict], loss: list[float], target: float):
    """(wall_s, step) of the first step whose smoothed loss is at or below ``target``, or (None, None)."""
    for r, v in zip(steps, loss):
        if v <= target:
            return r["wall_s"], r["step"]
    return None, None


def sweep_tables(root: str, window: int, factor: float, plot: str | None) -> str:
    rates = [r for r in ("100mbit", "1gbit", "10gbit") if os.path.isdir(os.path.join(root, r))]
    lines, curves = [], {}
    for rate in rates:
        runs = {m: os.path.join(root, rate, m) for m in METHOD_ORDER
                if os.path.exists(os.path.join(root, rate, m, "summary.json"))}
        if not runs:
            continue
        data = {m: _steps(out) for m, out in runs.items()}
        loss = {m: smoothed(s, window) for m, s in data.items()}
        target = loss["ddp_fp32"][-1] * factor if "ddp_fp32" in loss else None
        base = time_to(data["ddp_fp32"], loss["ddp_fp32"], target)[0] if target is not None else None
        lines += [f"**{rate}**" + (f" (target loss {target:.4f} = DDP fp32's final x {factor})" if target else ""),
                  "",
                  "| method | steps | job wall s | training wall s | s per step | final loss | time to target s "
                  "| step at target | DDP fp32 time to target / this | MB sent per worker | compute utilization "
                  "| exchange wait s | stop-flag wait s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for m, steps in data.items():
            last = steps[-1]
            t, at = time_to(steps, loss[m], target) if target is not None else (None, None)
            speed = f"{base / t:.2f}x" if t and base else "n/a"
            util = 1 - (last["comm_s"] + last["flag_s"]) / last["wall_s"]
            lines.append(f"| {LABELS[m]} | {len(steps)} | {_job_wall(runs[m])} | {last['wall_s']:.1f} "
                         f"| {last['wall_s'] / len(steps):.3f} | {loss[m][-1]:.4f} "
                         f"| {'not reached' if t is None else f'{t:.1f}'} | {at or 'n/a'} | {speed} "
                         f"| {last['bytes_sent'] / 1e6:.2f} | {util:.1%} | {last['comm_s']:.1f} "
                         f"| {last['flag_s']:.1f} |")
        lines.append("")
        curves[rate] = (data, loss, target)
    if plot and curves:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4.2), squeeze=False)
        for ax, (rate, (data, loss, target)) in zip(axes[0], curves.items()):
            for m in data:
                ax.plot([r["wall_s"] for r in data[m]], loss[m], label=LABELS[m],
                        color=f"C{METHOD_ORDER.index(m) % 10}")  # one colour per method in every panel
            if target is not None:
                ax.axhline(target, color="gray", ls="--", lw=0.8, label="target")
            ax.set_title(f"link {rate}, 2 emulated hosts")
            ax.set_xlabel("wall clock since training start, s (rank 0)")
            ax.set_ylabel(f"training loss (mean of last {window} steps)")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(plot, dpi=110)
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("--"):
        ap = argparse.ArgumentParser(prog="python -m benchmarks.wan.summarize")
        ap.add_argument("--sweep", required=True, help="the --out directory of benchmarks.wan.sweep")
        ap.add_argument("--plot", help="write loss against wall clock per link rate to this PNG")
        ap.add_argument("--window", type=int, default=10)
        ap.add_argument("--target-factor", type=float, default=1.02)
        args = ap.parse_args(argv)
        print(sweep_tables(args.sweep, args.window, args.target_factor, args.plot))
        return 0
    print("| run | steps | wall clock s (whole job, 2 hosts) | loss (mean of last 5 steps, rank 0) "
          "| MB sent per worker | final avg exact-match |")
    print("|---|---|---|---|---|---|")
    for arg in argv:
        name, out = arg.split("=", 1)
        print(row(name, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
