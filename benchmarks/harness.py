"""Shared benchmark harness: timing, side-by-side tables with speedup ratios, CSV output.

Timing: ``torch.utils.benchmark`` on CPU; ``triton.testing.do_bench`` (CUDA events,
cache flushed) on GPU; ``measure_interleaved`` times the rows of one case round-robin on
CPU, so that the ratios do not depend on when each row ran on a shared machine. Every
case reports the median and the 20th/80th percentiles.
Each row names its baseline and prints ``speedup = baseline median / row median``,
measured in the same process. CSV files go to benchmarks/results/ with the device,
torch version and date on every row.
"""
from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics
from dataclasses import dataclass, field

import torch

try:
    import resource
except ImportError:  # pragma: no cover (Windows: no page-fault counts)
    resource = None

# Larger than the last-level cache of the CPUs we run on (32 MiB L3 on the CI machines).
_CACHE_FLUSH_BYTES = 128 * 1024 * 1024
_COLD_CALLS_PER_BLOCK = 8
# TRAINOPS_RESULTS_DIR redirects the tables (the smoke tests write theirs to a temporary
# folder instead of over the committed results).
RESULTS_DIR = os.environ.get("TRAINOPS_RESULTS_DIR") or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                      "results")


@dataclass
class Timing:
    median_s: float
    p20_s: float
    p80_s: float
    faults_per_call: float | None = None  # minor page faults per timed call (CPU, where known)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def timing_of(times) -> Timing:
    """Median and 20th/80th percentiles of a list of per-call times (seconds)."""
    times = sorted(times)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
    return Timing(statistics.median(times), q[1], q[7])


def measure(fn, device: str = "cpu", min_run_time: float = 0.5) -> Timing:
    """Time ``fn()``: median and 20/80 percentiles in seconds."""
    if device.startswith("cuda"):
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], rep=max(50, int(min_run_time * 1000)))
        return Timing(med / 1e3, p20 / 1e3, p80 / 1e3)
    from torch.utils.benchmark import Timer

    fn()  # warm-up (allocations, first-call dispatch)
    # Timer runs with one thread unless told otherwise; measure with the threads torch uses.
    m = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time)
    return timing_of(m.times)  # seconds per call, one entry per measured block


def measure_interleaved(fns: dict, device: str = "cpu", min_run_time: float = 0.5,
                        block_time: float = 0.02, cold: bool = False) -> dict:
    """Time several workloads that are compared with each other, round-robin: each round
    times one block of calls of every workload in turn, so a slow phase of a shared
    machine falls on all of them instead of on whichever ran then. Returns name -> Timing
    (median and 20/80 percentiles over the blocks, seconds per call). On CUDA each
    workload is timed by ``measure`` (events on an otherwise idle device).

    Every block starts with one untimed call, so that no workload is timed in the state
    that the previous workload left (its caches, its freed memory): without it, the
    first call of a block pays for its neighbour's footprint, which is large for some
    rows and small for others. ``cold=True`` instead reads a buffer larger than the
    last-level cache before every timed call (``triton.testing.do_bench`` does the like on
    GPU), so every workload starts from cold caches."""
    if device.startswith("cuda"):
        return {name: measure(fn, device, min_run_time) for name, fn in fns.items()}
    import time

    # Filled, so that its pages exist (an untouched page reads as the shared zero page).
    flush_buffer = torch.ones(_CACHE_FLUSH_BYTES // 4) if cold else None
    calls = {}
    for name, fn in fns.items():
        fn()  # warm-up (allocations, first-call dispatch, compilation)
        t0 = time.perf_counter()
        fn()
        calls[name] = max(1, int(block_time / max(time.perf_counter() - t0, 1e-9)))
        if cold:  # each call also costs a flush, which takes longer than the short calls
            calls[name] = min(calls[name], _COLD_CALLS_PER_BLOCK)
    times = {name: [] for name in fns}
    spent = dict.fromkeys(fns, 0.0)
    faults = dict.fromkeys(fns, 0)
    while min(spent.values()) < min_run_time or min(len(t) for t in times.values()) < 7:
        for name, fn in fns.items():
            n = calls[name]
            fn()  # untimed: see the docstring
            dt = 0.0
            for _ in range(n):
                if flush_buffer is not None:
                    # A read: it evicts the caches' contents without leaving dirty lines whose
                    # write-back the timed call would pay for.
                    flush_buffer.sum()
                f0 = _minor_faults()
                t0 = time.perf_counter()
                fn()
                dt += time.perf_counter() - t0
                faults[name] += _minor_faults() - f0
            times[name].append(dt / n)
            spent[name] += dt
    out = {}
    for name, t in times.items():
        out[name] = timing_of(t)
        if resource is not None:
            out[name].faults_per_call = faults[name] / (len(t) * calls[name])
    return out


def _minor_faults() -> int:
    """Minor page faults of this process so far (0 where getrusage is unavailable): a call
    that takes fresh memory from the OS pays one per 4 KiB page it touches."""
    return 0 if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@dataclass
class Row:
    case: dict
    name: str
    timing: Timing
    baseline: str | None = None
    extra: dict = field(default_factory=dict)


class Table:
    """Rows of one benchmark; ``report()`` prints them with ratios and writes a CSV."""

    def __init__(self, title: str, device: str):
        self.title = title
        self.device = device
        self.rows: list[Row] = []

    def add(self, case: dict, name: str, timing: Timing, baseline: str | None = None, **extra) -> Row:
        row = Row(dict(case), name, timing, baseline, extra)
        self.rows.append(row)
        return row

    def _baseline_of(self, row: Row) -> Row | None:
        for other in self.rows:
            if other.case == row.case and other.name == row.baseline:
                return other
        return None

    def speedup(self, row: Row) -> float | None:
        base = self._baseline_of(row)
        return None if base is None else base.timing.median_s / row.timing.median_s

    def records(self) -> list[dict]:
        stamp = {"device": device_name(self.device), "torch": torch.__version__,
                 "date": datetime.date.today().isoformat()}
        out = []
        for row in self.rows:
            ratio = self.speedup(row)
            rec = {**row.case, "impl": row.name, "median_ms": row.timing.median_s * 1e3,
                   "p20_ms": row.timing.p20_s * 1e3, "p80_ms": row.timing.p80_s * 1e3,
                   "baseline": row.baseline or "", "speedup": "" if ratio is None else round(ratio, 3)}
            rec.update(row.extra)
            rec.update(stamp)
            out.append(rec)
        return out

    def report(self, csv_name: str | None = None) -> str:
        recs = self.records()
        keys = []
        for rec in recs:
            keys += [k for k in rec if k not in keys and k not in ("device", "torch", "date")]
        lines = [f"## {self.title}", f"device: {device_name(self.device)}; torch {torch.__version__}", "",
                 "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for rec in recs:
            lines.append("| " + " | ".join(_fmt(rec.get(k, "")) for k in keys) + " |")
        text = "\n".join(lines)
        print(text, flush=True)
        if csv_name:
            os.makedirs(RESULTS_DIR, exist_ok=True)
            path = os.path.join(RESULTS_DIR, csv_name)
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=keys + ["device", "torch", "date"])
                writer.writeheader()
                writer.writerows(recs)
            with open(os.path.splitext(path)[0] + ".md", "w") as f:
                f.write(text + "\n")
        return text


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def results_suffix(device: str) -> str:
    """File-name tag of the device: 'cpu' or e.g. 'h100'."""
    if not device.startswith("cuda"):
        return "cpu"
    name = torch.cuda.get_device_name(torch.device(device)).lower()
    for tag in ("h200", "h100", "a100", "l40", "4090"):
        if tag in name:
            return tag
    return "cuda"


def quick_cpu_args(description: str, argv=None):
    """The options of a small CPU comparison script: ``--quick`` (two small cases, short
    timing) and ``--threads N`` (applied here). Returns the parsed arguments."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="two small cases, short timing")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args
