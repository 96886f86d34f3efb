"""``trainops train [--config file.yaml] [--key value ...]`` (also ``python -m trainops.train``).

Spawns ``--workers`` local processes (gloo on CPU, NCCL on CUDA) through
:func:`trainops.distributed.spawn`; under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) this
process is one worker and joins the group with :func:`trainops.distributed.init_from_env`.
"""
from __future__ import annotations

import os
import signal
import sys
import time

__all__ = ["main", "train"]

USAGE = """usage: trainops train [--config FILE.yaml] [--key value ...]

Continual training of a small MoE transformer on embedded synthetic domains with MoRA
adapters, replay and Streaming DiLoCo (see trainops.runtime). Every option can be given
as --key value (or --key=value), in a YAML file passed with --config (keys with
underscores), or both (the command line wins). Booleans: --flag / --no-flag / --flag false.

options:
"""


def _help() -> str:
    from trainops.runtime.config import help_text
    return USAGE + help_text()


def train(cfg) -> dict:
    """Run training with a validated :class:`~trainops.runtime.config.TrainConfig`; returns rank 0's summary."""
    import yaml

    from trainops.distributed import init_from_env, spawn
    from trainops.runtime.checkpoint import atomic_write_text
    from trainops.runtime.loop import run_worker

    os.makedirs(cfg.out_dir, exist_ok=True)
    if cfg.resume:  # a mismatching checkpoint is refused before any worker starts
        from trainops.runtime.checkpoint import check_resume_config, load_checkpoint
        world = int(os.environ.get("WORLD_SIZE", cfg.workers))
        saved = load_checkpoint(os.path.join(cfg.out_dir, "checkpoint"), 0, world)
        check_resume_config(saved["config"], cfg.to_dict())
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ
    if under_torchrun:
        rank, world = init_from_env(timeout_s=cfg.timeout_s)
        if rank == 0:
            atomic_write_text(os.path.join(cfg.out_dir, "config.yaml"), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        import torch.distributed as dist
        try:
            return {**run_worker(rank, world, cfg.to_dict()), "rank": rank}
        finally:
            dist.destroy_process_group()
    atomic_write_text(os.path.join(cfg.out_dir, "config.yaml"), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    import multiprocessing as mp

    def forward(signum, frame):  # the workers checkpoint and stop at the next step
        for child in mp.active_children():
            os.kill(child.pid, signal.SIGTERM)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        results = spawn(run_worker, cfg.workers, cfg.to_dict(), timeout_s=cfg.timeout_s)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return results[0]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        argv = argv[1:]
    elif argv and not argv[0].startswith("-"):
        print(f"trainops: unknown command {argv[0]!r}; the command is `trainops train`", file=sys.stderr)
        return 2
    if any(a in ("-h", "--help") for a in argv):
        print(_help())
        return 0
    from trainops.runtime.config import ConfigError, load_config
    try:
        cfg = load_config(argv)
    except ConfigError as e:
        print(f"trainops train: error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        summary = train(cfg)
    except ConfigError as e:
        print(f"trainops train: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        msg = str(e)
        if "ConfigError" in msg:  # raised inside a worker: show the message, not the traceback
            line = [ln for ln in msg.splitlines() if "ConfigError" in ln][-1]
            print(f"trainops train: error: {line.split('ConfigError: ', 1)[-1]}", file=sys.stderr)
            return 2
        print(f"trainops train: a worker failed; the last complete checkpoint in {cfg.out_dir}/checkpoint "
              f"can be resumed with --resume.\n{msg}", file=sys.stderr)
        return 1
    took = time.perf_counter() - start
    if summary.get("rank", 0) != 0:  # under torchrun: rank 0 speaks for the job
        return 130 if summary.get("interrupted") else 0
    if summary.get("interrupted"):
        print(f"trainops train: stopped; checkpoint saved in {cfg.out_dir}/checkpoint "
              f"(continue with --resume) after {took:.1f}s", file=sys.stderr)
        return 130
    print(f"trainops train: done in {took:.1f}s; report: {os.path.join(cfg.out_dir, 'report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
