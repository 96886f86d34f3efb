"""RLEP against plain GRPO: ``trainops rl --rlep on`` and ``--rlep off`` over several seeds.

Each run is a full ``python -m trainops.rl`` (2 gloo workers; the same supervised warm-up
for both arms of a seed, since the warm-up does not depend on --rlep), one after another.
From each run's summary.json (the held-out greedy exact-match accuracy of the first task
against GRPO step) and metrics.jsonl (the fresh rollouts' mean reward), this writes

* a markdown table (mean ± sample standard deviation over the seeds, and every seed) of the
  accuracy after the warm-up, the best and the final accuracy, and the GRPO steps RLEP needs
  to reach the best accuracy of the same seed's plain-GRPO run (RLEP's claim in Zhang et al.
  2025, arXiv 2507.07451: the baseline's peak in fewer steps, then a higher final accuracy);
* a plot of accuracy against step, mean over the seeds with the min-max band.

    python benchmarks/rl_rlep_ablation.py                 # 3 seeds x 2 arms
    python benchmarks/rl_rlep_ablation.py --seeds 0 -- --task-steps 50

Finished runs under --out-root are read, not run again (--fresh runs them again). Options
after ``--`` go to every run and are listed in the table.
"""
from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from benchmarks.runtime_ablations import _cpu, _pm, split_extra, sweep_parser  # noqa: E402

ARMS = {"on": "RLEP (`--rlep on`)", "off": "plain GRPO (`--rlep off`)"}


def read_run(out_dir: str) -> dict:
    """Curve of the first task (GRPO step -> accuracy, step 0 = after the warm-up) and rewards."""
    with open(os.path.join(out_dir, "summary.json")) as fh:
        summary = json.load(fh)
    curve, pool = {}, {}
    for p in summary["curve"]:
        step = 0 if p["phase"] == "pretrain" else p["step"] if p["phase"].startswith("task0:") else None
        if step is not None:
            curve[step], pool[step] = p["accuracy"][0], p["pool_accuracy"][0]
    with open(os.path.join(out_dir, "metrics.jsonl")) as fh:
        rewards = [r["reward"] for r in map(json.loads, fh) if "reward" in r and r["phase"].startswith("task0:")]
    return {"curve": curve, "pool": pool, "rewards": rewards, "replay_s": summary.get("replay_s", 0.0),
            "wall_s": summary.get("wall_s", 0.0)}


def first_step_reaching(curve: dict, target: float) -> int | None:
    for step in sorted(curve):
        if step > 0 and curve[step] >= target - 1e-12:
            return step
    return None


def _plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for i, (arm, per_seed) in enumerate(results.items()):
        steps = sorted(set.intersection(*(set(r["curve"]) for r in per_seed.values())))
        vals = [[r["curve"][s] for r in per_seed.values()] for s in steps]
        ax.plot(steps, [statistics.fmean(v) for v in vals], color=f"C{i}", marker=".", label=ARMS[arm])
        ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals], color=f"C{i}", alpha=0.2)
    ax.set(xlabel="GRPO step", ylabel="held-out exact match (greedy)",
           title=f"RLEP vs plain GRPO, {len(next(iter(results.values())))} seeds (mean, min-max)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: dict, seeds: list[int], extra: list[str]) -> str:
    import torch

    off = results.get("off", {})
    lines = [
        "# trainops rl: RLEP against plain GRPO over seeds", "",
        f"Device: {_cpu()}; torch {torch.__version__}; {datetime.date.today().isoformat()}. Each run: "
        f"`python -m trainops.rl --seed S --rlep on|off{' ' + ' '.join(extra) if extra else ''}` (2 gloo workers, "
        f"default config otherwise); seeds {', '.join(map(str, seeds))}. Accuracy: greedy exact match on the "
        "held-out set of the task, rank 0's weights. Cells: mean ± sample standard deviation over the seeds. "
        "'Mean over the evaluated steps': the area under the accuracy curve (GRPO steps > 0). 'Steps to "
        "(90% of) plain's best': the first evaluated GRPO step at which the run reaches (90% of) the best accuracy "
        "of the plain-GRPO run of the same seed (mean over the seeds that reach it). 'Training prompts': greedy "
        "exact match on the task's pool of GRPO prompts (the reward's prompts; the held-out set measures what "
        "carries over to prompts never trained on).", "",
        "| run | after warm-up | mean over the evaluated steps | final | steps to 90% of plain's best | "
        "steps to plain's best | training prompts: final | mean reward of the rollouts | replay path share of wall "
        "time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, per_seed in results.items():
        final = [r["curve"][max(r["curve"])] for r in per_seed.values()]
        start = [r["curve"].get(0, float("nan")) for r in per_seed.values()]
        mean_acc = [statistics.fmean(v for k, v in r["curve"].items() if k > 0) for r in per_seed.values()]
        cells = []
        for share_of_best in (0.9, 1.0):
            reach = [first_step_reaching(r["curve"], share_of_best * max(off[s]["curve"].values()))
                     for s, r in per_seed.items() if s in off]
            got = [x for x in reach if x is not None]
            cells.append(f"{statistics.fmean(got):.0f} ({len(got)}/{len(reach)} reached)" if got
                         else f"never (0/{len(reach)})")
        reward = [statistics.fmean(r["rewards"]) for r in per_seed.values()]
        pool_final = [r["pool"][max(r["pool"])] for r in per_seed.values()]
        share = [r["replay_s"] / r["wall_s"] for r in per_seed.values() if r["wall_s"]]
        lines.append(f"| {ARMS[arm]} | {_pm(start)} | {_pm(mean_acc)} | {_pm(final)} | {cells[0]} | {cells[1]} | "
                     f"{_pm(pool_final)} | "
                     f"{_pm(reward)} | "
                     f"{100 * statistics.fmean(share):.2f}% |")
    lines += ["", "Every seed (accuracy at each evaluated GRPO step):", ""]
    steps = sorted(next(iter(next(iter(results.values())).values()))["curve"])
    lines += ["| run | seed | " + " | ".join(map(str, steps)) + " |", "|---|---|" + "---|" * len(steps)]
    for arm, per_seed in results.items():
        for s, r in per_seed.items():
            lines.append(f"| {arm} | {s} | " + " | ".join(f"{r['curve'].get(k, float('nan')):.3f}" for k in steps)
                         + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv, extra = split_extra(argv)
    args = sweep_parser(__doc__, "runs/rlep", "rlep_ablation_cpu.md",
                        "markdown table to write (the plot goes beside it, .png)").parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict = {arm: {} for arm in ARMS}
    for seed in seeds:
        for arm in ARMS:
            out = os.path.join(args.out_root, f"rlep_{arm}-seed{seed}")
            if args.fresh or not os.path.exists(os.path.join(out, "summary.json")):
                cmd = [sys.executable, "-m", "trainops.rl", "--seed", str(seed), "--rlep", arm, "--out-dir", out,
                       "--no-progress", "--log-every", "0", "--overwrite", *extra]
                print("$ " + " ".join(cmd[1:]), flush=True)
                start = time.perf_counter()
                subprocess.run(cmd, check=True)
                print(f"  {time.perf_counter() - start:.0f} s", flush=True)
            results[arm][seed] = read_run(out)
            curve = results[arm][seed]["curve"]
            print(f"rlep {arm} seed {seed}: " + " ".join(f"{k}:{v:.3f}" for k, v in sorted(curve.items())), flush=True)
    text = table(results, seeds, extra)
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "w") as fh:
        fh.write(text)
    _plot(results, os.path.splitext(args.results)[0] + ".png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
