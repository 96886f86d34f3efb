"""The default ``trainops train`` run and its two ablations over several seeds.

Runs (one after another, each a full ``python -m trainops.train`` with 2 workers):

  default       global-batch LBL, power-law replay
  micro_batch   --lbl-scope micro_batch
  replay_off    --replay off

for every seed in ``--seeds`` (the config's ``--seed``: model init, data, replay), reads
each run's metrics.jsonl and writes a markdown table of mean ± sample standard deviation
over the seeds (and every seed's value) of the final average accuracy (greedy exact match,
the report's headline), the average forgetting, the final average teacher-forced per-byte
accuracy and the specialization score after pre-training and at the end, to
benchmarks/results/runtime_ablations_<device>.md.

    python benchmarks/runtime_ablations.py                     # 3 seeds x 3 runs (~25 min on 2 CPU cores)
    python benchmarks/runtime_ablations.py --seeds 0 --runs default,replay_off

Runs whose report.md already exists under --out-root are read, not run again (so an
interrupted sweep continues); --fresh runs everything again. Extra options after ``--``
go to every run (e.g. ``-- --task-steps 100`` for a quicker, different sweep: the table
lists them).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

RUNS = {
    "default": ([], "default (global LBL, power-law replay)"),
    "micro_batch": (["--lbl-scope", "micro_batch"], "`--lbl-scope micro_batch`"),
    "replay_off": (["--replay", "off"], "`--replay off`"),
}
METRICS = [
    ("final_avg_accuracy", "final avg accuracy (greedy exact match)"),
    ("forgetting", "avg forgetting"),
    ("final_avg_byte_accuracy", "final avg per-byte accuracy (teacher-forced)"),
    ("specialization_pretrain", "specialization after pre-training"),
    ("specialization_final", "specialization at the end"),
]


def numbers(out_dir: str) -> dict:
    """The summary numbers of a finished run: its summary.json, where the runtime's report
    computed them (trainops.runtime.report.summary_numbers)."""
    with open(os.path.join(out_dir, "summary.json")) as fh:
        s = json.load(fh)
    nan = float("nan")
    return {key: nan if s.get(key) is None else s[key] for key, _ in METRICS} | {
        "final_accuracy": dict(zip(s["domains"], s["accuracy"][-1]))}


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return platform.processor() or "cpu"


def _pm(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(results: dict, seeds: list[int], extra: list[str], seconds: dict) -> str:
    import torch

    lines = [
        "# trainops train: default run and ablations over seeds", "",
        f"Device: {_cpu()}; torch {torch.__version__}; {datetime.date.today().isoformat()}. "
        f"Each run: `python -m trainops.train --seed S [switch]{' ' + ' '.join(extra) if extra else ''}` "
        f"(2 gloo workers, default config otherwise); seeds {', '.join(map(str, seeds))}. "
        "Cells: mean ± sample standard deviation over the seeds. Accuracy is the greedy-decoding "
        "exact match (the report's headline); forgetting is computed on it. Specialization: normalized "
        "mutual information between domain and routed expert (mean over MoE layers). Wall time: the whole "
        "command, start-up included (one run at a time; the machine may be shared with other jobs).", "",
        "| run | " + " | ".join(label for _, label in METRICS) + " | mean wall time (s) |",
        "|---|" + "---|" * (len(METRICS) + 1),
    ]
    for name, per_seed in results.items():
        cells = [_pm([r[key] for r in per_seed.values()]) for key, _ in METRICS]
        secs = [seconds[(name, s)] for s in per_seed if (name, s) in seconds]
        lines.append(f"| {RUNS[name][1]} | " + " | ".join(cells) + f" | {statistics.fmean(secs):.0f} |" if secs
                     else f"| {RUNS[name][1]} | " + " | ".join(cells) + " | (read) |")
    lines += ["", "Every seed (final avg accuracy / forgetting / specialization after pre-training; "
              "final accuracy per task):", "",
              "| run | seed | accuracy | forgetting | specialization | per task |", "|---|---|---|---|---|---|"]
    for name, per_seed in results.items():
        for s, r in per_seed.items():
            tasks = ", ".join(f"{k} {v:.3f}" for k, v in r["final_accuracy"].items())
            lines.append(f"| {name} | {s} | {r['final_avg_accuracy']:.3f} | {r['forgetting']:.3f} | "
                         f"{r['specialization_pretrain']:.3f} | {tasks} |")
    return "\n".join(lines) + "\n"


def sweep_parser(doc: str, out_root: str, results: str, results_help: str) -> argparse.ArgumentParser:
    """The options of a seed sweep: --seeds, --out-root, --results, --fresh."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    ap.add_argument("--out-root", default=out_root, help="where the runs' output directories go")
    ap.add_argument("--results", default=os.path.join(HERE, "results", results), help=results_help)
    ap.add_argument("--fresh", action="store_true", help="run again even where a finished run exists")
    return ap


def split_extra(argv) -> tuple[list[str], list[str]]:
    """(the sweep's own arguments, the options after ``--`` that go to every run)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        return argv, []
    return argv[:argv.index("--")], argv[argv.index("--") + 1:]


def main(argv=None) -> int:
    argv, extra = split_extra(argv)
    ap = sweep_parser(__doc__, "runs/ablations", "runtime_ablations_cpu.md", "markdown table to write")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = [n for n in args.runs.split(",") if n]
    for n in names:
        if n not in RUNS:
            ap.error(f"unknown run {n!r}; choose from {', '.join(RUNS)}")
    results: dict = {n: {} for n in names}
    seconds: dict = {}
    for seed in seeds:  # seed-major: a partial sweep still covers every run
        for name in names:
            out = os.path.join(args.out_root, f"{name}-seed{seed}")
            if args.fresh or not os.path.exists(os.path.join(out, "report.md")):
                cmd = [sys.executable, "-m", "trainops.train", "--seed", str(seed), "--out-dir", out,
                       "--no-progress", *RUNS[name][0], *extra]
                print("$ " + " ".join(cmd[1:]), flush=True)
                start = time.perf_counter()
                subprocess.run(cmd, check=True)
                seconds[(name, seed)] = time.perf_counter() - start
                with open(os.path.join(out, "wall_seconds.json"), "w") as fh:
                    json.dump(seconds[(name, seed)], fh)
            elif os.path.exists(os.path.join(out, "wall_seconds.json")):
                with open(os.path.join(out, "wall_seconds.json")) as fh:
                    seconds[(name, seed)] = json.load(fh)
            results[name][seed] = numbers(out)
            r = results[name][seed]
            print(f"{name} seed {seed}: accuracy {r['final_avg_accuracy']:.3f} forgetting {r['forgetting']:.3f} "
                  f"specialization {r['specialization_pretrain']:.3f}", flush=True)
    text = table(results, seeds, extra, seconds)
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "w") as fh:
        fh.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
