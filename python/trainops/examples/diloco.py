"""DiLoCo demo: N gloo workers on CPU train one small model, exchanging FP32 vs FP4 pseudo-gradients.

    python -m trainops.examples.diloco                  # 2 workers, FP32 then FP4 (E3M0)
    python -m trainops.examples.diloco --workers 4 --fragments 2 --overlap 2

Task: a student MLP learns a fixed random teacher's labels (10 classes, inputs in R^32);
each worker draws its own batches. After training, the cross-entropy of the final
model of each worker (the global model when alpha = 0) on a fixed held-out set is
printed for each exchange format with the bytes each worker sent (logical payload,
see trainops.distributed.stats).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

IN, HIDDEN, CLASSES = 32, 128, 10


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(IN, HIDDEN), torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, CLASSES),
    )


class TeacherTask:
    """Labels from a fixed random 2-layer teacher; ``batch(gen)`` draws (x, y)."""

    def __init__(self, seed: int = 1234):
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.randn(IN, 64, generator=g) / IN**0.5
        self.w2 = torch.randn(64, CLASSES, generator=g) / 8.0
        self.eval_x, self.eval_y = self.batch(torch.Generator().manual_seed(seed + 1), 2048)

    def labels(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(x @ self.w1) @ self.w2).argmax(-1)

    def batch(self, gen: torch.Generator, size: int):
        x = torch.randn(size, IN, generator=gen)
        return x, self.labels(x)

    @torch.no_grad()
    def eval_loss(self, model: torch.nn.Module) -> float:
        return F.cross_entropy(model(self.eval_x), self.eval_y).item()


def train(rank: int, world: int, cfg: dict) -> dict:
    """One worker's DiLoCo run; returns its final eval loss and bytes sent."""
    from trainops.distributed import DiLoCo

    torch.set_num_threads(1)
    task = TeacherTask(cfg["seed"])
    model = make_model(cfg["seed"])
    inner = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    diloco = DiLoCo(model, inner, sync_every=cfg["sync_every"], num_fragments=cfg["fragments"],
                    overlap_steps=cfg["overlap"], fragment_alpha=cfg["alpha"], fmt=cfg["fmt"],
                    block_size=cfg["block_size"], error_feedback=cfg["error_feedback"],
                    min_numel=cfg.get("min_numel", 4096))
    gen = torch.Generator().manual_seed(cfg["seed"] * 1000 + rank)  # each worker its own data
    start = time.perf_counter()
    for _ in range(cfg["steps"]):
        x, y = task.batch(gen, cfg["batch_size"])
        loss = F.cross_entropy(model(x), y)
        inner.zero_grad(set_to_none=True)
        loss.backward()
        inner.step()
        diloco.step()
    diloco.flush()
    return {"loss": task.eval_loss(model), "bytes_sent": diloco.stats.bytes_sent,
            "syncs": diloco.stats.calls, "seconds": time.perf_counter() - start}


def _run_formats(rank: int, world: int, cfg: dict, formats: list) -> list:
    return [train(rank, world, {**cfg, "fmt": fmt}) for fmt in formats]


def run(cfg: dict, formats=(None, "fp4_e3m0")) -> dict:
    """Runs every format in one group of ``cfg['workers']`` processes; {fmt: [per-worker result]}."""
    from trainops.distributed import spawn

    results = spawn(_run_formats, cfg["workers"], cfg, list(formats), backend="gloo", timeout_s=300.0)
    return {fmt: [r[i] for r in results] for i, fmt in enumerate(formats)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainops.examples.diloco", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2, help="gloo worker processes, 2-4 (default 2)")
    p.add_argument("--steps", type=int, default=600, help="inner steps per worker (default 600)")
    p.add_argument("--sync-every", type=int, default=30, help="H: inner steps between syncs (default 30)")
    p.add_argument("--fragments", type=int, default=1, help="Streaming DiLoCo fragments (default 1)")
    p.add_argument("--overlap", type=int, default=0, help="tau: inner steps a sync overlaps (default 0)")
    p.add_argument("--alpha", type=float, default=0.0, help="fragment mixing alpha (default 0)")
    p.add_argument("--fmt", default="fp4_e3m0", help="quantized exchange format (default fp4_e3m0)")
    p.add_argument("--block-size", type=int, default=128, help="quantization block size (default 128)")
    p.add_argument("--error-feedback", action="store_true", help="keep quantization residuals")
    p.add_argument("--lr", type=float, default=3e-3, help="inner AdamW learning rate (default 3e-3)")
    p.add_argument("--batch-size", type=int, default=64, help="batch per worker (default 64)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 1 <= args.workers <= 8:
        p.error("--workers must be between 1 and 8")
    if args.steps < 1 or args.sync_every < 1 or args.fragments < 1 or args.sync_every % args.fragments:
        p.error("--steps, --sync-every, --fragments must be >= 1 and --sync-every divisible by --fragments")
    if not 0 <= args.overlap < args.sync_every:
        p.error("--overlap must be in [0, --sync-every)")
    try:
        from trainops.formats import check_block_size, get_format

        get_format(args.fmt)
        check_block_size(args.block_size)
    except (TypeError, ValueError) as e:
        p.error(str(e))
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = {"workers": args.workers, "steps": args.steps, "sync_every": args.sync_every,
           "fragments": args.fragments, "overlap": args.overlap, "alpha": args.alpha,
           "block_size": args.block_size, "error_feedback": args.error_feedback, "lr": args.lr,
           "batch_size": args.batch_size, "seed": args.seed}
    print(f"DiLoCo: {args.workers} gloo workers, {args.steps} inner steps, H={args.sync_every}, "
          f"fragments={args.fragments}, overlap={args.overlap}, alpha={args.alpha}", flush=True)
    start = time.perf_counter()
    results = run(cfg, (None, args.fmt))
    print("\n| exchange | final eval loss (per worker) | bytes sent per worker | syncs |")
    print("|---|---|---|---|")
    sent = {}
    for fmt, per_worker in results.items():
        name = "fp32" if fmt is None else fmt
        sent[name] = per_worker[0]["bytes_sent"]
        losses = ", ".join(f"{r['loss']:.4f}" for r in per_worker)
        print(f"| {name} | {losses} | {per_worker[0]['bytes_sent']:,} | {per_worker[0]['syncs']} |")
    fp32_loss = results[None][0]["loss"]
    q_loss = results[args.fmt][0]["loss"]
    print(f"\n{args.fmt} / fp32: loss ratio {q_loss / fp32_loss:.4f}, "
          f"bytes ratio {sent['fp32'] / max(1, sent[args.fmt]):.2f}x fewer; total {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
