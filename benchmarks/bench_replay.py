"""Fused replay sampling (trainops.replay.ReplayBuffer) against plain-PyTorch baselines.

Per case (capacity, batch, row type), in one process:
  sample/prioritized  trainops fused op vs ``torch.multinomial`` on the stored p^alpha +
                      ``index_select`` + PER weights (baseline), and a plain ``index_select``
                      of as many random rows, a new row set each call (the memory floor of the
                      gather; a fixed set would be timed from cache)
  sample/uniform      trainops fused op vs ``torch.randint`` + ``index_select``
  update              trainops generation-checked priority update (with block-sum refresh)
                      vs ``index_put_`` of p^alpha (no staleness check, no sums)
TorchRL 0.14.1 (TensorDictReplayBuffer + LazyTensorStorage + PrioritizedSampler / RandomSampler)
is measured in a subprocess (its own timing loop: median of 30 calls) when a separate environment with it exists (its compiled segment
trees do not load against torch 2.13): set TRAINOPS_TORCHRL_PYTHON to that environment's
python (default /work/venvs/torchrl/bin/python); otherwise the reason for the skip is printed.

CPU default sizes: capacity 2^20 for rows of 256 fp32 (1 GiB), 2^18 for rows of 1024 int32
tokens (1 GiB; 2^20 would take 4 GiB: pass --full to use it). Batch 4096.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import RESULTS_DIR, Table, Timing, default_device, measure, results_suffix  # noqa: E402
from trainops.replay import ReplayBuffer  # noqa: E402

ALPHA, BETA = 0.6, 0.4

TORCHRL_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import torch
    from tensordict import TensorDict
    from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer
    from torchrl.data.replay_buffers.samplers import PrioritizedSampler, RandomSampler
    cap, batch, row, dtype, sampler, device = json.loads(sys.argv[1])
    dt = getattr(torch, dtype)
    data = TensorDict({"x": torch.zeros(cap, row, dtype=dt)}, batch_size=[cap])
    s = PrioritizedSampler(cap, alpha=0.6, beta=0.4) if sampler == "prioritized" else RandomSampler()
    rb = TensorDictReplayBuffer(storage=LazyTensorStorage(cap, device=device), sampler=s, batch_size=batch)
    for i in range(0, cap, 65536):
        rb.extend(data[i:i + 65536])
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    def run(fn, reps):
        fn(); sync()
        times = []
        for _ in range(reps):
            t = time.perf_counter(); fn(); sync(); times.append(time.perf_counter() - t)
        times.sort()
        return times[len(times) // 2]
    out = {"sample": run(lambda: rb.sample(), 30)}
    if sampler == "prioritized":
        idx = torch.randint(0, cap, (batch,))
        pr = torch.rand(batch) + 0.1
        out["update"] = run(lambda: rb.update_priority(idx, pr), 30)
    print(json.dumps(out))
""")


def torchrl_python() -> str | None:
    path = os.environ.get("TRAINOPS_TORCHRL_PYTHON", "/work/venvs/torchrl/bin/python")
    return path if os.path.exists(path) else None


def torchrl_times(case, sampler, device):
    py = torchrl_python()
    if py is None:
        return None, ("TorchRL baseline skipped: no environment with torch==2.14.1 + torchrl==0.14.1 "
                      "(set TRAINOPS_TORCHRL_PYTHON to its python)")
    arg = json.dumps([case["capacity"], case["batch"], case["row"], case["dtype"], sampler, device])
    try:
        res = subprocess.run([py, "-c", TORCHRL_SCRIPT, arg], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return None, "TorchRL baseline skipped: timed out"
    if res.returncode != 0:
        return None, "TorchRL baseline failed: " + res.stderr.strip().splitlines()[-1][:200]
    return json.loads(res.stdout.strip().splitlines()[-1]), None


def build_buffer(case, device, sampler):
    dtype = getattr(torch, case["dtype"])
    spec = {"x": ((case["row"],), dtype)}
    buf = ReplayBuffer(case["capacity"], spec, device=device, sampler=sampler, alpha=ALPHA, beta=BETA, seed=0)
    chunk = 1 << 16
    for i in range(0, case["capacity"], chunk):
        n = min(chunk, case["capacity"] - i)
        x = torch.randint(0, 1000, (n, case["row"]), device=device).to(dtype)
        buf.add({"x": x}, priority=torch.rand(n, device=device) + 0.1)
    return buf


def run_case(table: Table, case, device, min_run_time, notes):
    cap, batch = case["capacity"], case["batch"]
    gbytes = batch * case["row"] * 4 / 1e9
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    pbuf = build_buffer(case, device, "prioritized")
    storage = pbuf.storage["x"]
    weights = pbuf.weights  # p^alpha, what a multinomial baseline samples from

    def baseline_prioritized():
        idx = torch.multinomial(weights, batch, replacement=True)
        rows = storage.index_select(0, idx)
        p = weights.index_select(0, idx).double() / weights.double().sum()
        w = (cap * p) ** -BETA
        return rows, idx, (w / w.max()).float()

    # The floor gathers a different random row set each call, like the sampler does: a fixed
    # index set would be served from cache after the first call (4096 x 1 KiB fits in L3).
    idx_sets = [torch.randint(0, cap, (batch,), device=device) for _ in range(64)]
    turn = [0]

    def floor_gather():
        turn[0] = (turn[0] + 1) % len(idx_sets)
        return storage.index_select(0, idx_sets[turn[0]])

    floor = measure(floor_gather, device, min_run_time)
    c = {**case, "op": "sample/prioritized"}
    table.add(c, "index_select (bandwidth floor)", floor, gather_GBps=round(gbytes / floor.median_s, 2))
    table.add(c, "multinomial+index_select", measure(baseline_prioritized, device, min_run_time))
    t = measure(lambda: pbuf.sample(batch), device, min_run_time)
    row = table.add(c, "trainops", t, baseline="multinomial+index_select",
                    samples_per_s=round(batch / t.median_s), floor_ratio=round(t.median_s / floor.median_s, 2))
    trl, why = torchrl_times(case, "prioritized", device)
    if trl is None:
        notes.append(f"{case['row']}x{case['dtype']}: {why}")
    else:
        table.add(c, "torchrl 0.14.1 PrioritizedSampler", Timing(trl["sample"], trl["sample"], trl["sample"]))
        row.extra["vs_torchrl"] = round(trl["sample"] / t.median_s, 2)

    # uniform: the same storage, sampled uniformly
    pbuf.sampler = "uniform"
    c = {**case, "op": "sample/uniform"}
    table.add(c, "randint+index_select",
              measure(lambda: storage.index_select(0, torch.randint(0, cap, (batch,), device=device)), device,
                      min_run_time))
    t = measure(lambda: pbuf.sample(batch), device, min_run_time)
    urow = table.add(c, "trainops", t, baseline="randint+index_select", samples_per_s=round(batch / t.median_s))
    trl_u, _ = torchrl_times(case, "uniform", device) if trl is not None else (None, None)
    if trl_u is not None:
        table.add(c, "torchrl 0.14.1 RandomSampler", Timing(trl_u["sample"], trl_u["sample"], trl_u["sample"]))
        urow.extra["vs_torchrl"] = round(trl_u["sample"] / t.median_s, 2)
    pbuf.sampler = "prioritized"

    # priority update of one sampled batch
    s = pbuf.sample(batch)
    new_p = torch.rand(batch, device=device) + 0.1
    c = {**case, "op": "update"}

    def baseline_update():
        weights.index_put_((s.indices,), new_p.double().pow(ALPHA).float())

    table.add(c, "index_put_", measure(baseline_update, device, min_run_time))
    t = measure(lambda: pbuf.update_priorities(s.indices, new_p, generation=s.generations), device, min_run_time)
    urow = table.add(c, "trainops", t, baseline="index_put_")
    if trl is not None and "update" in trl:
        table.add(c, "torchrl 0.14.1 update_priority", Timing(trl["update"], trl["update"], trl["update"]))
        urow.extra["vs_torchrl"] = round(trl["update"] / t.median_s, 2)
    sync()
    del pbuf, storage, weights


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=default_device())
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--capacity", type=int, default=1 << 20, help="capacity for the 256 x fp32 rows")
    ap.add_argument("--token-capacity", type=int, default=None,
                    help="capacity for the 1024 x int32 rows (default: 2^18 on CPU, 2^20 on CUDA or with --full)")
    ap.add_argument("--full", action="store_true", help="2^20 for the token rows on CPU too (4 GiB)")
    ap.add_argument("--min-run-time", type=float, default=1.0)
    args = ap.parse_args()
    device = args.device
    tok_cap = args.token_capacity or (1 << 20 if (args.full or device.startswith("cuda")) else 1 << 18)
    cases = [{"capacity": args.capacity, "batch": args.batch, "row": 256, "dtype": "float32"},
             {"capacity": tok_cap, "batch": args.batch, "row": 1024, "dtype": "int32"}]
    table = Table("fused replay sampling (trainops.replay.ReplayBuffer)", device)
    notes = []
    for case in cases:
        run_case(table, case, device, args.min_run_time, notes)
    if tok_cap != 1 << 20:
        notes.append(f"token rows measured at capacity {tok_cap} (not 2^20) to bound host memory; --full restores it")
    text = table.report(f"replay_{results_suffix(device)}.csv")
    for n in notes:
        print("note:", n)
    if notes:
        with open(os.path.join(RESULTS_DIR, f"replay_{results_suffix(device)}.md"), "a") as f:
            f.write("\n" + "\n".join(f"note: {n}" for n in notes) + "\n")
    return text


if __name__ == "__main__":
    main()
