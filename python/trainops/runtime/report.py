"""Final report of a run: ``report.md`` (settings, accuracy matrix, forgetting, specialization,
bytes exchanged), the same numbers in ``summary.json``, and PNG plots under ``plots/``
(matplotlib, Agg backend)."""
from __future__ import annotations

import json
import os

__all__ = ["write_report", "forgetting", "summary_numbers", "SUMMARY_FILE"]

#: The report's numbers as JSON (accuracy matrix, forgetting, bytes), for scripts.
SUMMARY_FILE = "summary.json"


def forgetting(matrix: list[list[float]], rows: list[str]) -> tuple[float, list[float]]:
    """Average forgetting over the tasks before the last one: for task j,
    max over the rows after task j was learned of acc[i][j], minus the final acc[-1][j]."""
    task_rows = [i for i, r in enumerate(rows) if r.startswith("task")]
    per = []
    for j in range(len(task_rows) - 1):
        after = [matrix[i][j] for i in task_rows[j:]]
        per.append(max(after) - matrix[task_rows[-1]][j])
    return (sum(per) / len(per) if per else 0.0), per


def _plots(out: str, cfg, summary: dict) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pdir = os.path.join(out, "plots")
    os.makedirs(pdir, exist_ok=True)
    rows = [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl"))]
    steps = [r for r in rows if "event" not in r]
    state, domains = summary["state"], summary["domains"]
    files = []

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    gs = [r["global_step"] for r in steps]
    ax[0].plot(gs, [r["loss"] for r in steps], lw=0.8)
    ax[0].set(title="answer cross-entropy (rank 0)", xlabel="step", yscale="log")
    ax[1].plot(gs, [r["lbl"] for r in steps], lw=0.8, color="C1")
    ax[1].set(title=f"load-balancing loss ({cfg.lbl_scope})", xlabel="step")
    bounds = {}
    for r in steps:
        bounds.setdefault(r["phase"], r["global_step"])
    for a in ax:
        for name, s in bounds.items():
            a.axvline(s, color="grey", lw=0.5, ls=":")
    fig.tight_layout()
    files.append(os.path.join(pdir, "loss.png"))
    fig.savefig(files[-1], dpi=100)
    plt.close(fig)

    m = state["acc_matrix"]
    fig, ax = plt.subplots(figsize=(1.2 * len(domains) + 2.5, 0.5 * len(m) + 1.8))
    im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
    for i, row in enumerate(m):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=8)
    ax.set(xticks=range(len(domains)), xticklabels=domains, yticks=range(len(m)),
           yticklabels=[f"after {r}" for r in state["acc_rows"]],
           title="exact-match accuracy (greedy decoding)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    files.append(os.path.join(pdir, "accuracy_matrix.png"))
    fig.savefig(files[-1], dpi=100)
    plt.close(fig)

    routing = state["routing"]
    key = "pretrain" if "pretrain" in routing else state["acc_rows"][-1]
    layers = routing[key]
    # Each row: the share of a domain's token-to-expert assignments that each expert gets
    # (a row sums to 1). A token picks top_k distinct experts, so no expert can get more
    # than 1/top_k: that is the top of the colour scale, the same for every layer and run.
    freqs = [[[c / max(1e-9, sum(r)) for c in r] for r in counts] for counts in layers]
    top = 1.0 / cfg.top_k
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers) + 2, 0.4 * len(domains) + 2), squeeze=False,
                             layout="constrained")
    for li, freq in enumerate(freqs):
        a = axes[0][li]
        im = a.imshow(freq, vmin=0, vmax=top, cmap="magma")
        a.set(title=f"layer {li} routing ({key})", xlabel="expert", xticks=range(len(freq[0])),
              yticks=range(len(domains)), yticklabels=domains)
    fig.colorbar(im, ax=axes[0].tolist(), label="share of the domain's\nexpert assignments")
    files.append(os.path.join(pdir, "expert_by_domain.png"))
    fig.savefig(files[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(gs, [r["bytes_fp32_equiv"] / 1e6 for r in steps], label="fp32 (same syncs)")
    ax.plot(gs, [r["bytes_sent"] / 1e6 for r in steps], label=f"sent ({cfg.exchange})")
    ax.set(xlabel="step", ylabel="MB sent per worker", title="DiLoCo bytes exchanged")
    ax.legend()
    fig.tight_layout()
    files.append(os.path.join(pdir, "bytes_exchanged.png"))
    fig.savefig(files[-1], dpi=100)
    plt.close(fig)
    return files


def _table(domains, rows, matrix, chance) -> list[str]:
    out = ["| after | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    out += [f"| {r} | " + " | ".join(f"{v:.3f}" for v in row) + " |" for r, row in zip(rows, matrix)]
    if chance and any(c is not None for c in chance):
        out.append("| *chance* | " + " | ".join("" if c is None else f"*{c:.3f}*" for c in chance) + " |")
    return out


def summary_numbers(state: dict) -> dict:
    """The headline numbers of a run's state, computed here only (the report, summary.json
    and the ablation tables all take them from this): final average exact-match and per-byte
    accuracy, average forgetting (and per task), specialization after pre-training and at the end."""
    rows, m, bm = state["acc_rows"], state["acc_matrix"], state.get("byte_acc_matrix")
    spec = state["spec"]
    avg_forget, per_forget = forgetting(m, rows)
    return {"final_avg_accuracy": sum(m[-1]) / len(m[-1]) if m else 0.0,
            "final_avg_byte_accuracy": sum(bm[-1]) / len(bm[-1]) if bm else None,
            "forgetting": avg_forget, "forgetting_per_task": per_forget,
            "specialization_pretrain": spec.get("pretrain"),
            "specialization_final": spec[rows[-1]] if rows else None}


def write_report(cfg, world: int, summary: dict) -> str:
    out = cfg.out_dir
    state, domains = summary["state"], summary["domains"]
    rows, m = state["acc_rows"], state["acc_matrix"]
    bm = state.get("byte_acc_matrix")
    headline = summary_numbers(state)
    avg_forget, per_forget, final_avg = headline["forgetting"], headline["forgetting_per_task"], \
        headline["final_avg_accuracy"]
    sent, fp32 = summary["bytes_sent"], state["bytes_fp32"]
    files = _plots(out, cfg, summary)
    spec = state["spec"]
    lines = [
        "# trainops train report", "",
        "## Settings", "",
        f"workers {world}, exchange **{cfg.exchange}**, LBL scope **{cfg.lbl_scope}** (coeff {cfg.lbl_coeff}), "
        f"replay **{cfg.replay}** (ratio {cfg.replay_ratio}), adapter **{cfg.adapter}** (rank {cfg.adapter_rank}), "
        f"DiLoCo H={cfg.sync_every} fragments={cfg.fragments}, seed {cfg.seed}.", "",
        f"Model: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.num_experts} experts top-{cfg.top_k}; "
        f"pre-training {cfg.pretrain_steps} steps x {cfg.grad_accum} micro-batches, {cfg.task_steps} steps per task, "
        f"batch {cfg.batch_size} x {cfg.seq_len} tokens per worker.", "",
        "## Accuracy matrix", "",
        "Exact-match accuracy on every task (columns) after each phase (rows): the answer is generated "
        "greedily from the prompt, byte by byte, and counts only if all of it equals the target. "
        "This is the headline number (final average, forgetting, the accuracy plot).", "",
        *_table(domains, rows, m, summary.get("chance")), "",
        f"Final average accuracy: **{final_avg:.3f}**. Average forgetting: **{avg_forget:.3f}** "
        f"(per task: {', '.join(f'{v:.3f}' for v in per_forget) or 'n/a'}).", "",
    ]
    if bm:
        lines += [
            "Teacher-forced accuracy per answer byte (the true prefix is given at every position; "
            "a softer measure of the same models):", "",
            *_table(domains, rows, bm, None), "",
            f"Final average per-byte accuracy: {headline['final_avg_byte_accuracy']:.3f}.", "",
        ]
    lines += [
        "## Expert specialization", "",
        "Normalized mutual information between domain and routed expert on held-out data "
        "(trainops.nn.specialization_score, mean over MoE layers):", "",
    ]
    lines += [f"- after {k}: {v:.4f}" for k, v in spec.items()]
    ratio = fp32 / sent if sent else float("nan")
    lines += [
        "", "## Bytes exchanged (per worker)", "",
        f"{sent:,} bytes sent in {cfg.exchange}; the same syncs in fp32 would send {fp32:,} bytes "
        f"({ratio:.2f}x).", "",
        "## Plots", "",
    ]
    lines += [f"![{os.path.basename(f)}](plots/{os.path.basename(f)})" for f in files]
    text = "\n".join(lines) + "\n"
    from trainops.runtime.checkpoint import atomic_write_text
    numbers = {"domains": domains, "chance": summary.get("chance"), "rows": rows, "accuracy": m,
               "byte_accuracy": bm, **headline, "specialization": spec, "bytes_sent": sent, "bytes_fp32_equiv": fp32,
               "exchange": cfg.exchange, "workers": world, "seed": cfg.seed,
               "phase_seconds": state.get("phase_seconds", {})}
    atomic_write_text(os.path.join(out, SUMMARY_FILE), json.dumps(numbers, indent=1) + "\n")
    atomic_write_text(os.path.join(out, "report.md"), text)
    return text
