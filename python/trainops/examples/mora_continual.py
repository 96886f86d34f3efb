"""Continual learning with MoRA vs plain LoRA on synthetic tasks.

    python -m trainops.examples.mora_continual [--tasks 5 --steps 300 ...]

Each task t draws inputs around its own centre μ_t (x = μ_t + ε) and labels them with its
own random linear rule (y = argmax W_t ε), so tasks conflict: a single adapter trained
on task t+1 forgets task t. The model is a frozen random MLP (Linear → GELU → Linear)
whose two Linears carry the adapter. Tasks are learned in sequence:

  MoRA: ``MoRALinear`` layers; after each task ``add_task()`` freezes its ranks and appends
        ``rank`` new ones; routing runs over all ranks (arXiv 2506.21035).
  LoRA: one plain LoRA adapter (x Aᵀ Bᵀ) of rank ``rank · tasks`` (the parameter count
        MoRA ends with), trained on every task in turn with the same optimizer and steps.

Printed: the accuracy matrix acc[i][j] = accuracy on task j after training task i, the
final average accuracy and the average forgetting, and MoRA's routing statistics (which
task's ranks fire for which task's inputs). The numbers are what this run measures.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from trainops.nn import LoRALinear, MoRALinear, add_task, mora_activation_stats, mora_modules, set_mora_stats


def make_tasks(num_tasks, dim, classes, samples, seed):
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(num_tasks):
        mu = torch.randn(dim, generator=g)
        mu = 3.0 * mu / mu.norm()
        W = torch.randn(classes, dim, generator=g)

        def draw(n, mu=mu, W=W):
            eps = torch.randn(n, dim, generator=g)
            return mu + eps, (eps @ W.t()).argmax(1)

        tasks.append((draw(samples), draw(samples)))  # (train, test)
    return tasks


def base_model(dim, hidden, classes, seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, classes))


def accuracy(model, data):
    model.eval()
    with torch.no_grad():
        x, y = data
        return float((model(x).argmax(1) == y).float().mean())


def train_task(model, data, steps, lr, batch, seed):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    x, y = data
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(0, x.shape[0], (batch,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[i]), y[i]).backward()
        opt.step()


def run(num_tasks=5, dim=32, hidden=64, classes=4, rank=8, top_k=8, temperature=0.03, threshold=0.2,
        steps=300, samples=512, lr=1e-2, batch=64, seed=0, verbose=True):
    """Train both methods task by task; returns the accuracy matrices, routing statistics and
    whether every finished task's MoRA ranks stayed bit-identical until the end."""
    tasks = make_tasks(num_tasks, dim, classes, samples, seed)
    mora_model = base_model(dim, hidden, classes, seed)
    for i in (0, 2):
        mora_model[i] = MoRALinear(mora_model[i], rank=rank, top_k=top_k, temperature=temperature,
                                   threshold=threshold)
    lora_model = base_model(dim, hidden, classes, seed)
    for i in (0, 2):
        lora_model[i] = LoRALinear(lora_model[i], rank * num_tasks)

    acc = {"mora": [], "lora": []}
    snapshots = []
    for t, (train, _) in enumerate(tasks):
        if t > 0:
            add_task(mora_model)
        train_task(mora_model, train, steps, lr, batch, seed + t)
        snapshots.append([(m.lora_A.detach().clone(), m.lora_B.detach().clone()) for _, m in mora_modules(mora_model)])
        train_task(lora_model, train, steps, lr, batch, seed + t)
        for name, model in (("mora", mora_model), ("lora", lora_model)):
            acc[name].append([accuracy(model, test) for _, test in tasks])
        if verbose:
            print(f"after task {t}: MoRA {fmt_row(acc['mora'][-1])} | LoRA {fmt_row(acc['lora'][-1])}", flush=True)

    identical = True
    for layer_idx, (_, m) in enumerate(mora_modules(mora_model)):
        for t, sl in enumerate(m.task_slices()[:-1]):
            A, B = snapshots[t][layer_idx]
            identical &= torch.equal(m.frozen_A[sl], A) and torch.equal(m.frozen_B[sl], B.t())

    routing = []  # routing[j][t]: fraction of activations of task j's inputs on adapter task t's ranks
    mora_model.eval()
    for j, (_, test) in enumerate(tasks):
        set_mora_stats(mora_model, True, label=j)
        with torch.no_grad():
            mora_model(test[0])
    stats = mora_activation_stats(mora_model)
    set_mora_stats(mora_model, False)
    first = stats[next(iter(stats))]
    routing = [first[j]["task_frequency"] for j in range(num_tasks)]
    res = {"mora": acc["mora"], "lora": acc["lora"], "routing": routing, "old_ranks_bit_identical": bool(identical)}
    if verbose:
        report(res)
    return res


def fmt_row(row):
    return " ".join(f"{a:.3f}" for a in row)


def summary(matrix):
    """Final average accuracy and average forgetting (best earlier accuracy − final, over old tasks)."""
    final = matrix[-1]
    n = len(final)
    forgetting = [max(matrix[i][j] for i in range(j, n - 1)) - final[j] for j in range(n - 1)]
    return sum(final) / n, (sum(forgetting) / len(forgetting) if forgetting else 0.0)


def report(res):
    for name in ("mora", "lora"):
        print(f"\n{name.upper()}: accuracy on task j (columns) after training task i (rows)")
        for i, row in enumerate(res[name]):
            print(f"  task {i}: {fmt_row(row)}")
        avg, fgt = summary(res[name])
        print(f"  final average accuracy {avg:.3f}, average forgetting {fgt:.3f}")
    print("\nMoRA routing (first layer): share of activations of task j's inputs (rows) on task t's ranks (columns)")
    for j, row in enumerate(res["routing"]):
        print(f"  inputs of task {j}: {fmt_row(row)}")
    print(f"\nold-task MoRA ranks bit-identical after later tasks: {res['old_ranks_bit_identical']}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=5)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=0.03)
    ap.add_argument("--threshold", type=float, default=0.2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    run(a.tasks, a.dim, a.hidden, a.classes, a.rank, a.top_k, a.temperature, a.threshold, a.steps, a.samples,
        a.lr, seed=a.seed)


if __name__ == "__main__":
    main()
