"""What rank 0 reports while a run trains, besides ``metrics.jsonl``: the same scalars as
TensorBoard events (``--tensorboard``, in ``out_dir/tensorboard``) and, when the tqdm
bars are off (``--no-progress``), a log line on stderr every ``--log-every`` steps."""
from __future__ import annotations

import os
import sys

from trainops._validation import is_number

__all__ = ["RunMonitor", "require_tensorboard", "scalars", "TENSORBOARD_DIR"]

TENSORBOARD_DIR = "tensorboard"


def require_tensorboard():
    """``torch.utils.tensorboard.SummaryWriter``, or a ConfigError naming the extra to install."""
    from trainops.runtime.config import ConfigError
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("tensorboard=True needs the tensorboard package: "
                          "pip install 'trainops[tensorboard]'") from None
    return SummaryWriter


def scalars(row: dict, domains: list[str]) -> dict[str, float]:
    """The scalars of one metrics.jsonl row as TensorBoard tags: ``train/<key>`` for a
    step row, ``eval/<key>`` for an evaluation row, whose per-domain lists become
    ``eval/<key>/<domain>``. Strings (phase, scope, format) and the step counters are left out."""
    prefix = "eval" if "event" in row else "train"
    out = {}
    for key, value in row.items():
        if key in ("global_step", "step"):
            continue
        if is_number(value):
            out[f"{prefix}/{key}"] = float(value)
        elif isinstance(value, list) and len(value) == len(domains) and all(map(is_number, value)):
            out.update({f"{prefix}/{key}/{d}": float(v) for d, v in zip(domains, value)})
    return out


def log_line(row: dict, steps: int, command: str = "train") -> str:
    reward = f" reward {row['reward']:.3f}" if "reward" in row else ""
    return (f"trainops {command}: [{row['phase']}] step {row['step']}/{steps} (global {row['global_step']}) "
            f"loss {row['loss']:.4f}{reward} lbl {row['lbl']:.4f} {row['tokens_per_s']:,.0f} tokens/s "
            f"sent {row['bytes_sent'] / 1e6:.2f} MB")


def eval_line(row: dict, domains: list[str], command: str = "train") -> str:
    accs = " ".join(f"{d}={a:.3f}" for d, a in zip(domains, row["accuracy"]))
    return f"trainops {command}: [{row['phase']}] exact-match (greedy) {accs} specialization={row['specialization']:.3f}"


class RunMonitor:
    """Receives every row rank 0 logs to metrics.jsonl (``log``); a no-op on other ranks.

    ``phase_steps``: steps of each phase by name, for "step i/n" and the line at a phase's
    last step. ``resume_step``: the global step a resumed run continues after; TensorBoard
    hides what the interrupted run logged after it (``purge_step``)."""

    def __init__(self, cfg, rank: int, domains: list[str], phase_steps: dict[str, int],
                 resume_step: int | None = None):
        self.domains, self.phase_steps = domains, phase_steps
        self.command = getattr(cfg, "COMMAND", "train")
        self.log_every = cfg.log_every if rank == 0 and not cfg.progress else 0
        self.writer = None
        if rank == 0 and cfg.tensorboard:
            SummaryWriter = require_tensorboard()
            self.writer = SummaryWriter(os.path.join(cfg.out_dir, TENSORBOARD_DIR), flush_secs=10,
                                        purge_step=None if resume_step is None else resume_step + 1)

    def log(self, row: dict) -> None:
        if self.writer is not None:
            for tag, value in scalars(row, self.domains).items():
                self.writer.add_scalar(tag, value, row["global_step"])
        if not self.log_every:
            return
        if "event" in row:
            print(eval_line(row, self.domains, self.command), file=sys.stderr, flush=True)
            return
        steps = self.phase_steps[row["phase"]]
        if row["step"] % self.log_every == 0 or row["step"] == steps:
            print(log_line(row, steps, self.command), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
