"""The all-reduce of one large fp32 message between emulated hosts, against the transfer bound.

Each host is a network namespace with its own rate-limited link (benchmarks/wan/hosts.py:
tc tbf on both ends of its veth, so a worker's upload and download each get ``--rate``);
one process per host, gloo over the namespaces' ``eth0``. Rows, timed round-robin (one
call of each row per round, each after a barrier):

    fp32 all_reduce           torch.distributed.all_reduce of the fp32 tensor (the baseline)
    <fmt>                     trainops quantized_all_reduce, one piece
    <fmt> pipeline_numel=P    the same exchange cut into pieces of P elements

(both stages of error feedback on, as in DiLoCo and the DDP hook). For every call each
worker counts the bytes its ``eth0`` really sent (``/proc/net/dev`` tx bytes: payload,
TCP/IP and Ethernet headers, ACKs of what it received) and ``bound_s`` = those bytes · 8 /
rate is what the link alone needs: ``time / bound`` = 1 means the exchange costs the
transfer and nothing else. ``payload_MB`` is what the collectives were handed to send
(CommStats for the quantized rows; 2 (W - 1) / W · 4N for gloo's fp32 all-reduce).

    python benchmarks/bench_exchange_link_rates.py --hosts 2 --rate 10gbit,1gbit,100mbit \\
        --reps 3,3,1 [--numel 67108864] [--formats int8 fp4_e3m0] [--pipeline-numel 4194304]

Needs root (network namespaces). TRAINOPS_NETNS_PREFIX names the namespaces (see hosts.py).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_PORT = 29517


def rate_bits(rate: str) -> float:
    """tc rate ('10gbit', '100mbit', '500kbit', '1000bit') in bits per second."""
    units = {"gbit": 1e9, "mbit": 1e6, "kbit": 1e3, "bit": 1.0}
    for unit, scale in units.items():
        if rate.endswith(unit):
            return float(rate[: -len(unit)]) * scale
    raise ValueError(f"rate {rate!r}: expected a number followed by gbit, mbit, kbit or bit")


def tx_bytes(iface: str = "eth0") -> int:
    """Bytes sent so far by ``iface`` of this process's network namespace."""
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, fields = line.partition(":")
            if name.strip() == iface:
                return int(fields.split()[8])
    raise RuntimeError(f"no interface {iface} in /proc/net/dev")


def _worker(args) -> None:
    import torch
    import torch.distributed as dist

    from trainops.distributed import quantized_all_reduce
    from trainops.distributed.all_reduce import owner_chunk_numel
    from trainops.distributed.stats import CommStats

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=args.rank, world_size=args.world)
    world, n = args.world, args.numel
    x = torch.randn(n, generator=torch.Generator().manual_seed(args.rank))
    work = torch.empty_like(x)
    err = torch.zeros(n)  # one pair of residuals for every row: their values do not change the timing
    owner = torch.zeros(owner_chunk_numel(n, world, 128))
    stats = CommStats()

    rows = [("fp32 all_reduce", None, None)]
    for fmt in args.formats:
        rows.append((fmt, fmt, None))
        rows += [(f"{fmt} pipeline_numel={p}", fmt, p) for p in args.pipeline_numel]

    def call(fmt, pieces, t):
        if fmt is None:
            dist.all_reduce(t)
            return 2 * (world - 1) * 4 * t.numel() // world
        stats.reset()
        quantized_all_reduce(t, "avg", fmt=fmt, error_feedback=err[: t.numel()],
                             owner_error_feedback=owner[: owner_chunk_numel(t.numel(), world, 128)],
                             pipeline_numel=pieces, stats=stats)
        return stats.bytes_sent

    small = torch.randn(1 << 20)
    for _, fmt, pieces in rows:  # warm-up: connections, first-call dispatch (a small message)
        call(fmt, pieces, small.clone())
    results = {name: {"time_s": [], "tx_bytes": [], "payload_bytes": 0} for name, _, _ in rows}
    for _ in range(args.reps):
        for name, fmt, pieces in rows:
            work.copy_(x)
            dist.barrier()
            b0 = tx_bytes()
            t0 = time.perf_counter()
            payload = call(fmt, pieces, work)
            results[name]["time_s"].append(time.perf_counter() - t0)
            results[name]["tx_bytes"].append(tx_bytes() - b0)
            results[name]["payload_bytes"] = payload
    dist.barrier()
    with open(os.path.join(args.out_dir, f"rank{args.rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def _run_rate(args, rate: str, reps: int) -> dict:
    from benchmarks.wan.hosts import Hosts

    with tempfile.TemporaryDirectory() as out_dir, Hosts(args.hosts, rate=rate) as hosts:
        env = {**os.environ, "GLOO_SOCKET_IFNAME": "eth0", "MASTER_ADDR": hosts.address(0),
               "MASTER_PORT": str(_PORT), "OMP_NUM_THREADS": str(args.threads)}
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--world", str(args.hosts),
               "--numel", str(args.numel), "--reps", str(reps), "--threads", str(args.threads),
               "--out-dir", out_dir, "--formats", *args.formats,
               "--pipeline-numel", ",".join(str(p) for p in args.pipeline_numel)]
        procs = [hosts.popen(i, cmd + ["--rank", str(i)], env=env) for i in range(args.hosts)]
        deadline = time.monotonic() + args.timeout_s
        for p in procs:
            try:
                rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"rate {rate}: the workers ran past --timeout-s {args.timeout_s}") from None
            if rc != 0:
                raise RuntimeError(f"rate {rate}: a worker exited with {rc}")
        return [json.load(open(os.path.join(out_dir, f"rank{i}.json"))) for i in range(args.hosts)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hosts", type=int, default=2, help="emulated hosts, one worker each (default 2)")
    p.add_argument("--rate", default="10gbit,1gbit,100mbit", help="comma-separated tc tbf link rates")
    p.add_argument("--reps", default="3", help="timed rounds, one value or one per rate (comma-separated)")
    p.add_argument("--numel", type=int, default=64 * 2**20, help="fp32 elements per worker (default 64M)")
    p.add_argument("--formats", nargs="+", default=["int8", "fp4_e3m0"])
    p.add_argument("--pipeline-numel", default="4194304", help="comma-separated piece sizes (elements)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per worker (default 1)")
    p.add_argument("--timeout-s", type=float, default=1800.0, help="per rate")
    p.add_argument("--out", default=None, help="also write the markdown table to this file")
    # worker mode (started by the parent inside a namespace)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--out-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.pipeline_numel = [int(v) for v in str(args.pipeline_numel).split(",") if v]
    if args.worker:
        args.reps = int(args.reps)
        return _worker(args)

    rates = [r for r in args.rate.split(",") if r]
    reps = [int(v) for v in args.reps.split(",")]
    reps = reps * len(rates) if len(reps) == 1 else reps
    if len(reps) != len(rates):
        raise SystemExit(f"--reps: one value or one per rate ({len(rates)}), got {args.reps}")
    lines = [f"## all-reduce of {args.numel:,} fp32 between {args.hosts} emulated hosts (gloo, tc tbf per link, "
             f"{args.threads} thread(s) per worker)", "",
             "| rate | row | reps | median_s | min_s | max_s | payload_MB | tx_MB (worker max) | bound_s | "
             "time / bound |", "|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for rate, r in zip(rates, reps):
        per_rank = _run_rate(args, rate, r)
        for name in per_rank[0]:
            # A call ends when the slowest worker is done: per round, the max over workers.
            times = [max(res[name]["time_s"][k] for res in per_rank) for k in range(r)]
            tx = [max(res[name]["tx_bytes"][k] for res in per_rank) for k in range(r)]
            med_t, med_tx = statistics.median(times), statistics.median(tx)
            bound = med_tx * 8 / rate_bits(rate)
            line = (f"| {rate} | {name} | {r} | {med_t:.3f} | {min(times):.3f} | {max(times):.3f} | "
                    f"{per_rank[0][name]['payload_bytes'] / 1e6:.1f} | {med_tx / 1e6:.1f} | {bound:.3f} | "
                    f"{med_t / bound:.2f} |")
            lines.append(line)
            print(line, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
