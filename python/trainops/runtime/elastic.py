"""Elastic restarts of ``trainops train`` under ``torchrun --max-restarts K``.

When a worker dies, torchrun stops the others and starts every worker again with the same
command line, ``TORCHELASTIC_RESTART_COUNT`` > 0 on at least one host (the workers agree on
the largest). The restarted workers must
continue *this job* from its last complete checkpoint, as ``--resume`` would, while the rule
that a previous run is refused without --resume / --overwrite still protects *other* jobs'
output. The two are told apart by a marker, ``out_dir/.elastic.json``: the first attempt's
rank 0 deletes any marker once it holds the out-dir lock and writes a new one (with
torchrun's run id) only after the previous-run checks passed. A restart therefore finds a
marker with its run id only when an earlier attempt of its own job was allowed to start.
The out_dir must be shared by the hosts (as checkpoints already require).
"""
from __future__ import annotations

import dataclasses
import json
import os

__all__ = ["restart_count", "agreed_restart_count", "forget_marker", "write_marker", "restart_config"]

MARKER = ".elastic.json"


def restart_count() -> int:
    """This host's torchrun restart number (0: its first attempt, or not under torchrun)."""
    try:
        return max(0, int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))
    except ValueError:
        return 0


def agreed_restart_count(timeout_s: float) -> int:
    """The largest restart number over all workers (joins the process group to ask).

    Each torchrun agent counts its own restarts, and only failures count: when a worker on
    another host dies, this host's agent may restart its healthy worker as a membership
    change with ``TORCHELASTIC_RESTART_COUNT`` still 0. Any worker above 0 means this
    round is a restart of the job; so does rank 0 finding an earlier start in the agent's
    store (:func:`trainops.distributed.agent_store.earlier_start_seen`), which also covers
    a restart that no agent counted, e.g. all hosts restarting for a replacement host."""
    import torch
    import torch.distributed as dist

    from trainops.distributed import init_from_env
    from trainops.distributed.agent_store import earlier_start_seen

    init_from_env(timeout_s=timeout_s)
    n = torch.tensor([max(restart_count(), int(earlier_start_seen()))], dtype=torch.int64)
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    return int(n.item())


def _run_id() -> str:
    return os.environ.get("TORCHELASTIC_RUN_ID", "")


def forget_marker(out_dir: str) -> None:
    """First attempt, rank 0, under the lock: a marker left by an earlier job must not count."""
    path = os.path.join(out_dir, MARKER)
    if os.path.lexists(path):
        os.unlink(path)


def write_marker(out_dir: str) -> None:
    """First attempt, rank 0, after the previous-run checks passed."""
    from trainops.runtime.checkpoint import atomic_write_text

    atomic_write_text(os.path.join(out_dir, MARKER), json.dumps({"run_id": _run_id()}) + "\n")


def _marker_matches(out_dir: str) -> bool:
    try:
        with open(os.path.join(out_dir, MARKER)) as fh:
            return json.load(fh).get("run_id") == _run_id()
    except (OSError, ValueError, AttributeError):
        return False


def restart_config(cfg, restarts: int):
    """The config a worker of restart round ``restarts`` (see :func:`agreed_restart_count`) runs with: ``resume`` when its job left a complete
    checkpoint, otherwise ``overwrite`` (the failed attempt's partial metrics go; it saved
    no checkpoint). Unchanged when this is no restart of a job that was allowed to start:
    then the ordinary checks apply and refuse what they would refuse."""
    from trainops.runtime.checkpoint import verify_checkpoint
    from trainops.runtime.config import ConfigError

    if restarts == 0 or not _marker_matches(cfg.out_dir):
        return cfg
    root = os.path.join(cfg.out_dir, "checkpoint")
    if os.path.lexists(os.path.join(root, "latest.json")):
        try:
            verify_checkpoint(root, int(os.environ.get("WORLD_SIZE", cfg.workers)))
        except ConfigError as e:  # a damaged checkpoint is not silently replaced by a fresh start
            raise ConfigError(f"torchrun restart {restarts}: cannot resume: {e}") from None
        return dataclasses.replace(cfg, resume=True, overwrite=False)
    return dataclasses.replace(cfg, resume=False, overwrite=True)
