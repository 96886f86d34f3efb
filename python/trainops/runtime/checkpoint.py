"""Atomic multi-worker checkpoints: ``checkpoint/step-<N>/rank<r>.pt`` then ``latest.json``.

Each file is written to a temporary name and moved into place with ``os.replace``; the
pointer ``latest.json`` is replaced only after every worker has written its file (a
barrier), so an interrupted or crashed save never leaves a half-written checkpoint as
the one ``--resume`` reads.
"""
from __future__ import annotations

import json
import os
import shutil

import torch

from trainops.runtime.config import RESUME_KEYS, ConfigError

__all__ = ["atomic_save", "atomic_write_text", "save_checkpoint", "load_checkpoint", "check_resume_config"]


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_save(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_checkpoint(root: str, global_step: int, rank: int, state: dict, barrier, final: bool = False) -> None:
    """Every rank calls this with its state; ``barrier()`` synchronizes the ranks. Each save
    gets a directory of its own, so the one ``latest.json`` names is never rewritten."""
    name = f"{'final' if final else 'step'}-{global_step}"
    step_dir = os.path.join(root, name)
    os.makedirs(step_dir, exist_ok=True)
    atomic_save(state, os.path.join(step_dir, f"rank{rank}.pt"))
    barrier()
    if rank == 0:
        atomic_write_text(os.path.join(root, "latest.json"),
                          json.dumps({"step": global_step, "dir": name, "final": final,
                                      "world_size": state["world_size"]}))
        for old in os.listdir(root):  # older complete checkpoints are no longer needed
            if (old.startswith("step-") or old.startswith("final-")) and old != name:
                shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    barrier()


def load_checkpoint(root: str, rank: int, world_size: int) -> dict:
    pointer = os.path.join(root, "latest.json")
    if not os.path.exists(pointer):
        raise ConfigError(f"--resume: no checkpoint in {root} (latest.json missing)")
    with open(pointer) as fh:
        meta = json.load(fh)
    if meta["world_size"] != world_size:
        raise ConfigError(f"--resume: checkpoint was written by {meta['world_size']} workers, this run has "
                          f"{world_size}; resume with --workers {meta['world_size']}")
    return torch.load(os.path.join(root, meta["dir"], f"rank{rank}.pt"), weights_only=False)


def check_resume_config(saved: dict, current: dict) -> None:
    diff = sorted(k for k in set(saved) | set(current)
                  if k not in RESUME_KEYS and saved.get(k) != current.get(k))
    if diff:
        detail = ", ".join(f"{k}: saved {saved.get(k)!r} vs now {current.get(k)!r}" for k in diff)
        raise ConfigError(f"--resume: the checkpoint was written with a different config ({detail})")
