"""Benchmark: MoRALinear fwd+bwd vs the literal reference, plain LoRA and the frozen base Linear.

    python -m benchmarks.bench_mora [--full] [--dtype bf16] [--min-run-time 0.3]

Per case (d = in = out features, R ranks, k = top_k, T tokens), one training step
forward + backward (dX; dA, dB for the adapter) of:
  base       the frozen nn.Linear alone (dgrad only)
  lora       base + PEFT-style x Aᵀ Bᵀ (rank R)
  reference  base + trainops.reference.mora (literal MoRAM: concatenated ranks, −∞ score
             matrix, T×R×d per-expert outputs); the speedup baseline of every row
  mora       trainops.nn.MoRALinear (fused kernels on CUDA, ATen path on CPU)
All R ranks are trainable (the most gradient work). ``x_base`` = time / base time.

Sizes: the issue's grid is d ∈ {768, 4096}, R ∈ {16, 64, 160}, k ∈ {8, 16},
T ∈ {2048, 8192} (``--full``, the default on CUDA). On CPU the default is reduced to
d = 768, T = 512 (the literal reference needs T·R·d floats per step, and a 2-core CPU
needs minutes per case at the full sizes).
"""
from __future__ import annotations

import argparse
import itertools

import torch
from torch import nn

from benchmarks.harness import Table, default_device, measure, results_suffix
from trainops.nn import MoRALinear
from trainops.reference.mora import mora as ref_mora

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TEMPERATURE, THRESHOLD = 0.03, 0.2


def grid(full: bool, dim: int | None = None, tokens: int | None = None):
    if full:
        dims, ts = [768, 4096], [2048, 8192]
    else:
        dims, ts = [768], [512]
    return list(itertools.product([dim] if dim else dims, [16, 64, 160], [8, 16], [tokens] if tokens else ts))


def build(d, R, k, device, dtype):
    torch.manual_seed(0)
    base = nn.Linear(d, d, device=device, dtype=dtype)
    mora = MoRALinear(nn.Linear(d, d, device=device, dtype=dtype), rank=R, top_k=k, temperature=TEMPERATURE,
                      threshold=THRESHOLD)
    with torch.no_grad():
        mora.base.weight.copy_(base.weight)
        mora.base.bias.copy_(base.bias)
        mora.lora_B.normal_(0, 0.02)
    for p in base.parameters():
        p.requires_grad_(False)
    A = mora.lora_A.detach().clone().requires_grad_()
    B = mora.lora_B.detach().clone().requires_grad_()
    return base, mora, A, B


def steps(base, mora, A, B, x, k):
    def base_step():
        base(x).sum().backward()

    def lora_step():
        (base(x) + (x @ A.t()) @ B.t()).sum().backward()

    def ref_step():
        (base(x) + ref_mora(x, A, B, top_k=k, temperature=TEMPERATURE, threshold=THRESHOLD)).sum().backward()

    def mora_step():
        mora(x).sum().backward()

    return {"base": base_step, "lora": lora_step, "reference": ref_step, "mora": mora_step}


def peak_bytes(fn, device):
    if not device.startswith("cuda"):
        return ""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the issue's full grid (default on CUDA)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--min-run-time", type=float, default=0.2)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds (best median kept)")
    ap.add_argument("--skip-reference-above", type=float, default=4.0,
                    help="skip the literal reference when its T·R·d expert tensor exceeds this many GiB")
    ap.add_argument("--dim", type=int, default=None, help="only this d (in = out features)")
    ap.add_argument("--tokens", type=int, default=None, help="only this T")
    a = ap.parse_args(argv)
    device = default_device()
    full = a.full or device.startswith("cuda")
    dtype = DTYPES[a.dtype or ("bf16" if device.startswith("cuda") else "fp32")]
    if not full:
        print("CPU run at reduced sizes: d=768, T=512 (use --full for the issue's grid)", flush=True)
    sizes = "issue grid" if full else "reduced CPU sizes d=768, T=512; see --help"
    if a.dim or a.tokens:
        sizes = f"sizes chosen by --dim/--tokens ({a.dim or 'grid'}, {a.tokens or 'grid'})"
    table = Table(f"MoRALinear fwd+bwd ({str(dtype).replace('torch.', '')}, {sizes})", device)
    for d, R, k, T in grid(full, a.dim, a.tokens):
        base, mora, A, B = build(d, R, k, device, dtype)
        x = torch.randn(T, d, device=device, dtype=dtype, requires_grad=True)
        case = {"d": d, "R": R, "k": k, "T": T}
        fns = steps(base, mora, A, B, x, k)
        expert_gib = T * R * d * 4 / 2**30
        if expert_gib > a.skip_reference_above:
            print(f"skip reference at {case}: its T·R·d tensor is {expert_gib:.1f} GiB", flush=True)
            fns.pop("reference")
        times = {}
        # Round-robin rounds, best median kept: on a shared machine the load drifts over
        # seconds, and interleaving keeps every implementation exposed to the same drift.
        for _ in range(a.rounds):
            for name, fn in fns.items():
                t = measure(fn, device, a.min_run_time)
                if name not in times or t.median_s < times[name].median_s:
                    times[name] = t
        for name, fn in fns.items():
            table.add(case, name, times[name], baseline="reference" if name != "reference" else None,
                      x_base=round(times[name].median_s / times["base"].median_s, 3),
                      peak_mib=peak_bytes(fn, device))
        x.grad = None
        del base, mora, A, B, x
    table.report(f"mora_{results_suffix(device)}.csv")


if __name__ == "__main__":
    main()
