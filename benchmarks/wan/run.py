"""``python -m benchmarks.wan.run``: ``trainops train`` on N emulated hosts over rate-limited links.

    python -m benchmarks.wan.run --hosts 2 --rate 100mbit -- --exchange fp4_e3m0 --out-dir /tmp/wan/fp4
    python -m benchmarks.wan.run --cleanup        # remove trainops-* namespaces and links left behind

Everything after ``--`` goes to ``trainops train``. Each host's torchrun output is written
to ``<out-dir>.host<i>.log``; the namespaces are removed on exit, Ctrl-C and SIGTERM.
Needs root (network namespaces, tc).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from benchmarks.wan.hosts import Hosts, cleanup


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(prog="python -m benchmarks.wan.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=2, help="number of emulated hosts (2-4)")
    ap.add_argument("--rate", default="100mbit", help="tc tbf rate of each host's link, both directions; 'none': unlimited")
    ap.add_argument("--burst", default="64kb")
    ap.add_argument("--latency", default="50ms", help="tbf queue bound (not added delay)")
    ap.add_argument("--port", type=int, default=29400, help="c10d rendezvous port on host 0")
    ap.add_argument("--max-restarts", type=int, default=0)
    ap.add_argument("--cleanup", action="store_true", help="only remove leftovers of an earlier harness")
    args = ap.parse_args(own)
    if args.cleanup:
        gone = cleanup()
        print(f"removed: {', '.join(gone) if gone else 'nothing'}")
        return 0
    if not 2 <= args.hosts <= 4:
        ap.error("--hosts must be 2..4")
    if "--out-dir" not in train_args and not any(a.startswith("--out-dir=") for a in train_args):
        ap.error("give trainops train an --out-dir after --")
    out = next(a.split("=", 1)[1] if "=" in a else train_args[i + 1]
               for i, a in enumerate(train_args) if a.startswith("--out-dir"))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    rate = None if args.rate.lower() == "none" else args.rate
    with Hosts(args.hosts, rate=rate, burst=args.burst, latency=args.latency) as hosts:
        logs = [open(f"{out}.host{i}.log", "w") for i in range(args.hosts)]
        start = time.perf_counter()
        procs = hosts.launch_torchrun(train_args, port=args.port, max_restarts=args.max_restarts,
                                      stdout_per_host=logs, stderr=subprocess.STDOUT)
        codes = [p.wait() for p in procs]
        took = time.perf_counter() - start
    print(f"hosts {args.hosts} rate {args.rate}: exit codes {codes}, wall clock {took:.1f}s; logs {out}.host*.log")
    return 0 if all(c == 0 for c in codes) else 1


if __name__ == "__main__":
    sys.exit(main())
