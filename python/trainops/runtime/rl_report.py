"""Final report of ``trainops rl``: ``report.md`` (settings, held-out accuracy against GRPO
step, reward, replay), the same numbers in ``summary.json`` and PNG plots under ``plots/``."""
from __future__ import annotations

import json
import os

from trainops.runtime.checkpoint import atomic_write_text
from trainops.runtime.report import SUMMARY_FILE

__all__ = ["write_rl_report"]


def _plots(out: str, summary: dict) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pdir = os.path.join(out, "plots")
    os.makedirs(pdir, exist_ok=True)
    rows = [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl"))]
    grpo = [r for r in rows if "event" not in r and "reward" in r]
    curve, domains = summary["state"]["curve"], summary["domains"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    for d, name in enumerate(domains):
        ax[0].plot([p["global_step"] for p in curve], [p["accuracy"][d] for p in curve], marker=".", label=name)
    ax[0].set(title="held-out exact match (greedy, rank 0)", xlabel="global step", ylim=(0, 1))
    ax[0].legend()
    ax[1].plot([r["global_step"] for r in grpo], [r["reward"] for r in grpo], lw=0.8, color="C2")
    ax[1].set(title="mean reward of the fresh rollouts (rank 0)", xlabel="global step", ylim=(0, 1))
    fig.tight_layout()
    path = os.path.join(pdir, "rl_accuracy.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def write_rl_report(cfg, world: int, summary: dict) -> str:
    out, state, domains = cfg.out_dir, summary["state"], summary["domains"]
    curve = state["curve"]
    final = state["acc_matrix"][-1] if state["acc_matrix"] else []
    files = _plots(out, summary)
    wall = state.get("wall_s", 0.0)
    replay_share = state.get("replay_s", 0.0) / wall if wall else 0.0
    lines = [
        "# trainops rl report", "",
        "## Settings", "",
        f"workers {world}, sync **{cfg.sync}**, GRPO with G={cfg.rollouts} rollouts per prompt at temperature "
        f"{cfg.rl_temperature}, {cfg.batch_size} prompts per step per worker from a pool of {cfg.rl_pool} per task; "
        f"RLEP **{cfg.rlep}** (M={cfg.replay_per_group} replayed per group, storing {cfg.rlep_store}); "
        f"{cfg.pretrain_steps} supervised warm-up steps, {cfg.task_steps} GRPO steps per task; seed {cfg.seed}.", "",
        "## Held-out accuracy against step", "",
        "Greedy exact match on the held-out set of each domain (rank 0's weights).", "",
        "| phase | step | " + " | ".join(domains) + " |", "|---|---|" + "---|" * len(domains),
    ]
    lines += [f"| {p['phase']} | {p['step']} | " + " | ".join(f"{a:.3f}" for a in p["accuracy"]) + " |"
              for p in curve]
    lines += ["", "Final: " + ", ".join(f"{d} **{a:.3f}**" for d, a in zip(domains, final)) + ".", "",
              f"Time in the RLEP replay path (group sampling and storing): {state.get('replay_s', 0.0):.2f} s of "
              f"{wall:.1f} s of training ({100 * replay_share:.2f}%, rank 0).", "", "## Plots", ""]
    lines += [f"![{os.path.basename(f)}](plots/{os.path.basename(f)})" for f in files]
    text = "\n".join(lines) + "\n"
    numbers = {"domains": domains, "curve": curve, "final_accuracy": final, "rlep": cfg.rlep,
               "replay_per_group": cfg.replay_per_group, "seed": cfg.seed, "workers": world,
               "replay_s": state.get("replay_s", 0.0), "wall_s": wall, "bytes_sent": summary["bytes_sent"],
               "phase_seconds": state.get("phase_seconds", {})}
    atomic_write_text(os.path.join(out, SUMMARY_FILE), json.dumps(numbers, indent=1) + "\n")
    atomic_write_text(os.path.join(out, "report.md"), text)
    return text
