"""``trainops train|rl [--config file.yaml] [--key value ...]`` (also ``python -m trainops.train`` /
``python -m trainops.rl``).

Spawns ``--workers`` local processes (gloo on CPU, NCCL on CUDA) through
:func:`trainops.distributed.spawn`; under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) this
process is one worker and joins the group with :func:`trainops.distributed.init_from_env`.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import sys
import time

__all__ = ["main", "train", "train_main", "rl_main"]

COMMANDS = """usage: trainops <command> [options]

commands:
  train   continual training of a small MoE transformer (MoRA adapters, replay, Streaming
          DiLoCo with an FP4 exchange) on 2 CPU workers by default; options: trainops train --help
  rl      GRPO on verifiable tasks with RLEP (replay of verified rollouts per prompt) over the
          same workers, checkpoints and reports; options: trainops rl --help

`trainops train` with no options runs the default job.
"""

USAGE = """usage: trainops train [--config FILE.yaml] [--key value ...]

Continual training of a small MoE transformer on embedded synthetic domains with MoRA
adapters, replay and Streaming DiLoCo (see trainops.runtime). Every option can be given
as --key value (or --key=value), in a YAML file passed with --config (keys with
underscores), or both (the command line wins). Booleans: --flag / --no-flag / --flag false.

options:
"""


RL_USAGE = """usage: trainops rl [--config FILE.yaml] [--key value ...]

GRPO post-training of the same small MoE transformer on verifiable embedded tasks (reward:
exact match of the sampled answer), after a brief supervised warm-up, with RLEP: verified
completions are kept per prompt in trainops' ReplayBuffer and M of them join each group
(--rlep on|off, --replay-per-group M, --rlep-store successes|all). Workers, sync modes,
checkpoints, --resume, progress and reports as in `trainops train`.

options:
"""


def _help(cls=None) -> str:
    from trainops.runtime.config import TrainConfig, help_text
    cls = cls or TrainConfig
    return (RL_USAGE if cls.COMMAND == "rl" else USAGE) + help_text(cls)


LOCK_FILE = ".lock"
ERROR_LOG = "worker_errors.log"


def _flock_nb(fd: int, wait_s: float) -> None:
    """``flock(LOCK_EX | LOCK_NB)``, retried for up to ``wait_s`` seconds while another process holds it."""
    import fcntl

    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN) or time.monotonic() >= deadline:
                raise
        time.sleep(0.2)


def lock_out_dir(out_dir: str, wait_s: float = 0.0) -> int:
    """Hold ``out_dir/.lock`` (``fcntl.flock``, exclusive) for as long as the returned file
    descriptor is open; the holder's pid is written into it. A second run into the same
    folder fails (at once, or after ``wait_s`` seconds) with a ConfigError naming that pid.
    The kernel releases the lock when the holder exits, however it ends (no stale lock
    after a SIGKILL)."""
    from trainops.runtime.config import ConfigError

    path = os.path.join(out_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _flock_nb(fd, wait_s)
    except OSError as e:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise ConfigError(f"out_dir {out_dir}: cannot lock {path} ({e.strerror})") from None
        raise ConfigError(f"out_dir {out_dir} is in use by another trainops train (pid {holder or 'unknown'}); "
                          "wait for it to end or choose another --out-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _previous_run(out_dir: str) -> list[str]:
    """What of an earlier run ``out_dir`` holds: a non-empty metrics.jsonl, a checkpoint."""
    found = []
    metrics = os.path.join(out_dir, "metrics.jsonl")
    if os.path.isfile(metrics) and os.path.getsize(metrics) > 0:
        found.append("metrics.jsonl")
    ckpt = os.path.join(out_dir, "checkpoint")
    if os.path.isdir(ckpt) and os.listdir(ckpt):
        found.append("checkpoint/")
    return found


def _check_previous_run(cfg, may_delete: bool) -> None:
    """Refuse to start over a previous run unless --resume (continue it) or --overwrite
    (delete its checkpoint, metrics and report first, on the process that holds the lock)."""
    from trainops.runtime.config import ConfigError

    found = _previous_run(cfg.out_dir)
    if not found or cfg.resume:
        return
    if not cfg.overwrite:
        raise ConfigError(f"out_dir {cfg.out_dir} holds a previous run ({', '.join(found)}); continue it with "
                          "--resume, or pass --overwrite to delete it and start over")
    if may_delete:
        if os.path.isdir(os.path.join(cfg.out_dir, "checkpoint")):
            shutil.rmtree(os.path.join(cfg.out_dir, "checkpoint"))
        for name in ("metrics.jsonl", "report.md", "summary.json", ERROR_LOG):
            path = os.path.join(cfg.out_dir, name)
            if os.path.lexists(path):
                os.unlink(path)


def train(cfg) -> dict:
    """Run training with a validated :class:`~trainops.runtime.config.TrainConfig`; returns rank 0's summary.

    Before any worker starts: the config is checked against this machine (``preflight``),
    ``out_dir`` is locked for the run's lifetime (by this launcher, or by rank 0 under
    torchrun), a previous run there is refused without --resume / --overwrite, and with
    --resume the whole checkpoint is verified and its config compared."""
    from trainops.runtime import elastic
    from trainops.runtime.config import ConfigError, preflight

    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ
    preflight(cfg, under_torchrun)
    os.makedirs(cfg.out_dir, exist_ok=True)
    restarts = elastic.agreed_restart_count(cfg.timeout_s) if under_torchrun else 0
    restarted = restarts > 0
    holds_lock = not under_torchrun or os.environ.get("RANK") == "0"
    # after a torchrun restart the previous rank 0 (maybe on another host) may still be exiting
    lock = lock_out_dir(cfg.out_dir, wait_s=60.0 if restarted else 0.0) if holds_lock else None
    try:
        if restarted:  # continue this job from its last complete checkpoint (trainops.runtime.elastic)
            cfg = elastic.restart_config(cfg, restarts)
        elif under_torchrun and holds_lock:
            elastic.forget_marker(cfg.out_dir)
        _check_previous_run(cfg, may_delete=holds_lock)
        if cfg.resume:  # a damaged or mismatching checkpoint is refused before any worker starts
            from trainops.runtime.checkpoint import check_resume_config, load_checkpoint, verify_checkpoint
            world = int(os.environ.get("WORLD_SIZE", cfg.workers))
            root = os.path.join(cfg.out_dir, "checkpoint")
            meta = verify_checkpoint(root, world)
            saved = load_checkpoint(root, 0, world, device=None)
            check_resume_config(saved["config"], cfg.to_dict(), type(cfg)().to_dict())
            if meta["final"]:
                raise ConfigError(f"--resume: the run in {cfg.out_dir} is already complete; use a new --out-dir")
        if under_torchrun and holds_lock and not restarted:
            elastic.write_marker(cfg.out_dir)
        return _run(cfg, under_torchrun)
    finally:
        if lock is not None:
            os.close(lock)


def _run(cfg, under_torchrun: bool) -> dict:
    import yaml

    from trainops.distributed import init_from_env, spawn
    from trainops.runtime.checkpoint import atomic_write_text
    from trainops.runtime.loop import run_worker

    if cfg.COMMAND == "rl":
        from trainops.runtime.rl_loop import run_rl_worker as run_worker
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


def _missing_runtime_packages() -> list[str]:
    """The packages of the `runtime` extra that are not installed (distribution names)."""
    import importlib.util

    needed = {"yaml": "pyyaml", "tqdm": "tqdm", "matplotlib": "matplotlib", "safetensors": "safetensors"}
    return [dist for module, dist in needed.items() if importlib.util.find_spec(module) is None]


def main(argv=None) -> int:
    """``trainops <command> ...``: a bare ``trainops`` (or ``--help``) prints the commands."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(COMMANDS, end="")
        return 0
    if argv[0] == "train":
        return train_main(argv[1:])
    if argv[0] == "rl":
        return rl_main(argv[1:])
    if argv[0].startswith("-"):
        print(f"trainops: options follow a command: trainops train {' '.join(argv)}", file=sys.stderr)
    else:
        print(f"trainops: unknown command {argv[0]!r}; the commands are `trainops train` and `trainops rl` (see `trainops --help`)",
              file=sys.stderr)
    return 2


def train_main(argv=None) -> int:
    """``trainops train [options]`` and ``python -m trainops.train [options]``."""
    from trainops.runtime.config import TrainConfig
    return _command_main(argv, TrainConfig)


def rl_main(argv=None) -> int:
    """``trainops rl [options]`` and ``python -m trainops.rl [options]``."""
    from trainops.runtime.rl_config import RLConfig
    return _command_main(argv, RLConfig)


def _command_main(argv, cls) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    me = f"trainops {cls.COMMAND}"
    if any(a in ("-h", "--help") for a in argv):
        print(_help(cls))
        return 0
    missing = _missing_runtime_packages()
    if missing:
        print(f"{me}: needs {', '.join(missing)}: pip install 'trainops[runtime]'", file=sys.stderr)
        return 2
    from trainops.runtime.config import ConfigError, load_config
    try:
        cfg = load_config(argv, cls)
    except ConfigError as e:
        print(f"{me}: error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        summary = train(cfg)
    except ConfigError as e:
        print(f"{me}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        return _worker_failed(cfg, e)
    except OSError as e:  # e.g. out_dir not writable, disk full while writing config.yaml
        where = f"{e.filename}: " if e.filename else ""
        print(f"{me}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    took = time.perf_counter() - start
    if summary.get("rank", 0) != 0:  # under torchrun: rank 0 speaks for the job
        return 130 if summary.get("interrupted") else 0
    if summary.get("interrupted"):
        print(f"{me}: stopped; checkpoint saved in {cfg.out_dir}/checkpoint "
              f"(continue with --resume) after {took:.1f}s", file=sys.stderr)
        return 130
    print(f"{me}: done in {took:.1f}s; report: {os.path.join(cfg.out_dir, 'report.md')}")
    return 0


_RAISED = re.compile(r"(?:ConfigError|CheckpointError): (.*)")


def _checkpoint_status(cfg) -> str:
    """What --resume would find: a complete, verified checkpoint, or why there is none."""
    from trainops.runtime.checkpoint import verify_checkpoint
    from trainops.runtime.config import ConfigError

    root = os.path.join(cfg.out_dir, "checkpoint")
    try:
        meta = verify_checkpoint(root)
    except ConfigError as e:
        if not os.path.lexists(os.path.join(root, "latest.json")):
            return f"no checkpoint was saved in {root}, so there is nothing to resume (rerun with --overwrite)"
        return f"there is no usable checkpoint to resume from: {str(e).removeprefix('--resume: ')}"
    if meta["final"]:
        return f"the final checkpoint (step {meta['step']}) in {root} is complete"
    return f"the last complete checkpoint (step {meta['step']}) in {root} can be resumed with --resume"


def _worker_summary(msg: str) -> list[str]:
    """One line per failed worker: how it ended and the last line of its traceback."""
    blocks, cur = [], None
    for line in msg.splitlines():
        if re.match(r"worker(\(s\))? \d", line):
            cur = [line]
            blocks.append(cur)
        elif cur is not None and line.strip():
            cur.append(line)
    if not blocks:
        lines = [ln for ln in msg.splitlines() if ln.strip()]
        return [lines[-1] if lines else msg]

    def raised(lines):  # the exception line of a traceback: unindented "pkg.ErrorName: message"
        found = [ln for ln in lines if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b", ln)]
        text = (found or lines)[-1].strip()
        return text if len(text) <= 300 else text[:297] + "..."

    return [b[0].rstrip(":") + (f": {raised(b[1:])}" if len(b) > 1 else "") for b in blocks]


def _worker_failed(cfg, e: RuntimeError) -> int:
    msg = str(e)
    raised = [m.group(1) for m in map(_RAISED.search, msg.splitlines()) if m]
    if raised:  # a config or checkpoint error raised inside a worker: the message, not the traceback
        print(f"trainops {cfg.COMMAND}: error: {raised[-1]}", file=sys.stderr)
        return 2
    log = os.path.join(cfg.out_dir, ERROR_LOG)
    try:
        with open(log, "w") as fh:
            fh.write(msg + "\n")
    except OSError:
        log = None
    lines = [f"trainops {cfg.COMMAND}: a worker failed; {_checkpoint_status(cfg)}."]
    lines += [f"  {ln}" for ln in _worker_summary(msg)]
    if log:
        lines.append(f"  full worker tracebacks: {log}")
    print("\n".join(lines), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
