"""Fused MoE router + load-balancing loss, forward + backward, vs Hugging Face and the
composed-PyTorch reference (eager and torch.compile).

Rows per case (T tokens, E experts, top-k):
  hf_lbl        transformers' load_balancing_loss_func on one layer's logits (loss only)
  hf_router_lbl HF router (softmax fp32, topk, renormalize) + load_balancing_loss_func
  reference     trainops.reference.router_topk + lbl_from_stats (router + loss)
  ref_compiled  the same under torch.compile
  fused         trainops.ops.router_topk + trainops.nn.LoadBalancingLoss (micro_batch scope),
                one kernel each way
Every workload except hf_lbl runs the backward from the LBL and from a fixed upstream
gradient g of the gate weights (torch.autograd.backward([weights, lbl], [g, 1]), what a
MoE layer hands the router), so the backward covers the gate weights and the LBL term.
``speedup`` is hf_lbl / row (the issue's baseline); the vs_* columns compare fused with the
other rows. The rows of a case are timed round-robin (harness.measure_interleaved), each
in its own steady state, or with ``--cold`` each call after a flush of the caches.
``faults_per_call`` counts minor page faults per call (CPU): memory the workload's
allocations take fresh from the OS. HF's time on CPU depends on it (the same call with
~3000 faults per call, ~12 MB of new pages, is ~5 ms slower at T=16384, E=64, k=8), and
whether its large blocks are reused or returned to the OS depends on the allocator's state
in the process, so the column says which of the two HF timings a run got.

Bandwidth (fused row): the bytes the fused forward and backward must move, counted as
forward reads T·E·b (logits) and writes T·k·12 (fp32 weights, int64 indices); backward
reads T·E·b + T·k·12 (logits, gate-weight gradient, indices) and writes T·E·b (the logits'
gradient); b = bytes per logit. ``GBps`` is that over the median time, and
``pct_of_copy_bw`` compares it with a copy of the logits (reads and writes T·E·b each),
timed in the same process: the memory-bandwidth yardstick.

Usage: python benchmarks/bench_router.py [--tokens 16384] [--no-compile] [--quick] [--threads N] [--cold]
Sizes are the issue's (T=16384, E in {64,128,256}, k in {4,8}); nothing is reduced.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.harness import Table, default_device, measure_interleaved, results_suffix  # noqa: E402
from trainops import reference as ref  # noqa: E402
from trainops.nn import LoadBalancingLoss  # noqa: E402
from trainops.ops import router_topk  # noqa: E402


def _hf_lbl_fn():
    try:
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
        return load_balancing_loss_func
    except ImportError as exc:  # pragma: no cover
        print(f"transformers not installed: skipping the HF rows ({exc})")
        return None


# Each workload returns (outputs, their upstream gradients) for torch.autograd.backward.
def hf_lbl_only(hf, logits, k):
    loss = hf((logits,), logits.shape[1], k, None)
    return [loss], [torch.ones_like(loss)]


def hf_router_lbl(hf, logits, k, gw):
    probs = torch.softmax(logits.float(), dim=-1)
    top, idx = torch.topk(probs, k, dim=-1)
    top = top / top.sum(-1, keepdim=True)
    loss = hf((logits,), logits.shape[1], k, None)
    return [top, loss], [gw, torch.ones_like(loss)]


def reference_router_lbl(logits, k, gw):
    w, _, counts, psum = ref.router_topk(logits, k)
    T = logits.shape[0]
    loss = ref.lbl_from_stats(counts, psum, T, T, k)
    return [w, loss], [gw, torch.ones_like(loss)]


def fused_router_lbl(lbl, logits, k, gw):
    w, _, counts, psum = router_topk(logits, k)
    loss = lbl(counts, psum, logits.shape[0])
    return [w, loss], [gw, torch.ones_like(loss)]


def fused_bytes(T: int, E: int, k: int, logit_bytes: int) -> int:
    """Bytes a fused router forward + backward must move (see the module docstring)."""
    return 3 * T * E * logit_bytes + 2 * T * k * (4 + 8)


def fwd_bwd(fn, logits, *args):
    def run():
        logits.grad = None
        torch.autograd.backward(*fn(logits, *args))
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384, help="tokens T (the issue's size: 16384)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    ap.add_argument("--quick", action="store_true", help="one case (E=64, k=8) only")
    ap.add_argument("--min-run-time", type=float, default=0.5)
    ap.add_argument("--cold", action="store_true",
                    help="flush the CPU caches before every timed call; results go to router_cpu_cold.csv")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's); results go to router_cpu_<n>thread.csv")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = default_device()
    hf = _hf_lbl_fn()
    caches = "cold caches (each call after a 128 MiB read)" if args.cold else "each row in its steady state"
    table = Table(f"router + load-balancing loss, fwd+bwd, T={args.tokens}, {caches}", device)
    cases = [(64, 8)] if args.quick else [(E, k) for E in (64, 128, 256) for k in (4, 8)]
    compiled = None if args.no_compile else torch.compile(reference_router_lbl, dynamic=False)
    for E, k in cases:
        torch.manual_seed(0)
        logits = torch.randn(args.tokens, E, device=device, requires_grad=True)
        gw = torch.randn(args.tokens, k, device=device)
        case = {"T": args.tokens, "E": E, "k": k}
        workloads = {}
        if hf is not None:
            workloads["hf_lbl"] = fwd_bwd(lambda x: hf_lbl_only(hf, x, k), logits)
            workloads["hf_router_lbl"] = fwd_bwd(lambda x: hf_router_lbl(hf, x, k, gw), logits)
        workloads["reference"] = fwd_bwd(reference_router_lbl, logits, k, gw)
        if compiled is not None:
            workloads["ref_compiled"] = fwd_bwd(compiled, logits, k, gw)
        lbl = LoadBalancingLoss(E, k, 1.0, scope="micro_batch")
        workloads["fused"] = fwd_bwd(lambda x: fused_router_lbl(lbl, x, k, gw), logits)
        rows = measure_interleaved(workloads, device, args.min_run_time, cold=args.cold)
        copy_dst = torch.empty_like(logits, requires_grad=False)
        copy_t = measure_interleaved({"copy": lambda: copy_dst.copy_(logits.detach())}, device, args.min_run_time,
                                     cold=args.cold)["copy"]
        copy_gbs = 2 * logits.numel() * logits.element_size() / copy_t.median_s / 1e9
        base = "hf_lbl" if "hf_lbl" in rows else "reference"
        f = rows["fused"].median_s
        for name, t in rows.items():
            extra = {}
            if t.faults_per_call is not None:
                extra["faults_per_call"] = round(t.faults_per_call)
            if name == "fused":
                gbs = fused_bytes(args.tokens, E, k, logits.element_size()) / t.median_s / 1e9
                extra.update({"GBps": round(gbs, 2), "copy_GBps": round(copy_gbs, 2),
                              "pct_of_copy_bw": round(100 * gbs / copy_gbs, 1)})
                extra.update({f"vs_{n}": round(rows[n].median_s / f, 2) for n in rows if n != "fused"})
            table.add(case, name, t, baseline=None if name == base else base, **extra)
    tag = (f"_{args.threads}thread" if args.threads else "") + ("_cold" if args.cold else "")
    table.report(f"router_{results_suffix(device)}{tag}.csv")


if __name__ == "__main__":
    main()
