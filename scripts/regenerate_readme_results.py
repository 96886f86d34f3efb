#!/usr/bin/env python3
"""Regenerate README.md's results of the default ``trainops train`` run, and its plots.

Runs the README's runtime configuration (every option at its default; seed 0, 2 workers)
as ``python -m trainops.train``, then

* copies the run's ``summary.json`` to ``docs/images/default_run_summary.json`` and its
  ``plots/*.png`` to ``docs/images/``,
* rewrites README.md between ``<!-- runtime-results:begin -->`` and
  ``<!-- runtime-results:end -->`` from that summary (accuracy table, final average,
  forgetting, specialization, bytes exchanged).

    python scripts/regenerate_readme_results.py                       # a fresh run (~15 min on 2 busy CPU cores)
    python scripts/regenerate_readme_results.py --from-run runs/x     # a finished run of that configuration
    python scripts/regenerate_readme_results.py --render-only         # README block from the committed summary
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
IMAGES = os.path.join(ROOT, "docs", "images")
SUMMARY = os.path.join(IMAGES, "default_run_summary.json")
BEGIN, END = "<!-- runtime-results:begin -->", "<!-- runtime-results:end -->"
PLOTS = ("accuracy_matrix.png", "expert_by_domain.png", "loss.png", "bytes_exchanged.png")
SEED = 0


def _row_name(phase: str) -> str:
    if phase == "pretrain":
        return "pre-training"
    index, _, domain = phase.removeprefix("task").partition(":")
    return f"task {index}: {domain}"


def render(s: dict) -> str:
    """The README block (between the markers) for a run's summary."""
    doms = s["domains"]
    lines = []
    took = f"; the run took {s['wall_s']:.0f} s on a machine shared with other jobs" if s.get("wall_s") else ""
    code = f"code at {s['commit']}, " if s.get("commit") else ""
    lines.append(f"Seed {s['seed']}, {s['workers']} workers, {s['device']} ({code}torch {s['torch']}, "
                 f"{s['date']}{took}): exact match after each phase")
    lines += ["", "| after | " + " | ".join(doms) + " |", "|---|" + "---|" * len(doms)]
    for phase, row in zip(s["rows"], s["accuracy"]):
        lines.append(f"| {_row_name(phase)} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    lines.append("| *chance (uniform guess)* | " + " | ".join(f"*{c:.3f}*" for c in s["chance"]) + " |")
    spec = s["specialization"]
    mb = 1e6
    lines += ["", f"Final average accuracy **{s['final_avg_accuracy']:.3f}**, average forgetting "
              f"**{s['forgetting']:.3f}** (per earlier task: {', '.join(f'{v:.3f}' for v in s['forgetting_per_task'])}); "
              f"specialization after pre-training {spec['pretrain']:.3f}, at the end {spec[s['rows'][-1]]:.3f}. "
              f"{s['exchange'].upper().replace('_', ' ')} sends {s['bytes_sent'] / mb:.2f} MB per worker against "
              f"{s['bytes_fp32_equiv'] / mb:.2f} MB for the same syncs in FP32 "
              f"({s['bytes_fp32_equiv'] / s['bytes_sent']:.1f}x)."]
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    """``text`` with what lies between the markers replaced by ``block``; each marker exactly once."""
    for marker in (BEGIN, END):
        if text.count(marker) != 1:
            raise SystemExit(f"README.md must hold {marker} exactly once (found {text.count(marker)})")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{block}\n{END}{tail}"


def _check_config(run_dir: str) -> None:
    """Refuse a run whose configuration is not the README's (defaults, seed 0)."""
    import yaml

    from trainops.runtime.config import RESUME_KEYS, TrainConfig
    with open(os.path.join(run_dir, "config.yaml")) as fh:
        saved = yaml.safe_load(fh)
    want = TrainConfig(seed=SEED).to_dict()
    diff = sorted(k for k in set(saved) | set(want) if k not in RESUME_KEYS and saved.get(k) != want.get(k))
    if diff:
        raise SystemExit(f"{run_dir} was not run with the README's configuration: "
                         + ", ".join(f"{k}={saved.get(k)!r} (README: {want.get(k)!r})" for k in diff))


def _run(out_dir: str) -> float:
    cmd = [sys.executable, "-m", "trainops.train", "--seed", str(SEED), "--out-dir", out_dir, "--overwrite",
           "--no-progress"]
    print("running:", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def _commit() -> str | None:
    """The checkout's commit, with ``+changes`` when the code (not the docs) differs from it."""
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "python", "csrc",
                                "setup.py"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--from-run", metavar="DIR", help="use this finished run instead of training")
    src.add_argument("--render-only", action="store_true", help=f"rewrite README.md from {SUMMARY} only")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "runs", "readme_seed0"), help="where a fresh run goes")
    args = ap.parse_args(argv)

    if not args.render_only:
        import torch
        run_dir, wall = (args.from_run, None) if args.from_run else (args.out_dir, _run(args.out_dir))
        _check_config(run_dir)
        with open(os.path.join(run_dir, "summary.json")) as fh:
            summary = json.load(fh)
        if wall is None and os.path.exists(SUMMARY):  # the run this script timed before: keep its time
            with open(SUMMARY) as fh:
                previous = json.load(fh)
            if previous.get("phase_seconds") == summary.get("phase_seconds"):
                wall = previous.get("wall_s")
        summary.update(wall_s=wall, torch=torch.__version__, date=datetime.date.today().isoformat(),
                       device="CUDA" if torch.cuda.is_available() else f"{os.cpu_count()}-core CPU",
                       commit=_commit())
        os.makedirs(IMAGES, exist_ok=True)
        for name in PLOTS:
            shutil.copyfile(os.path.join(run_dir, "plots", name), os.path.join(IMAGES, name))
        with open(SUMMARY, "w") as fh:
            json.dump(summary, fh, indent=1)
            fh.write("\n")
    with open(SUMMARY) as fh:
        summary = json.load(fh)
    with open(README) as fh:
        text = fh.read()
    with open(README, "w") as fh:
        fh.write(replace_block(text, render(summary)))
    print(f"README.md results and {IMAGES} updated from {SUMMARY}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
