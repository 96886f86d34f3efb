"""Start a local process group: N worker processes on one machine, gloo or NCCL.

Used by the tests (real multi-process collectives over localhost), the examples and
``trainops train --workers N``. Under ``torchrun`` use :func:`init_from_env` instead.
"""
from __future__ import annotations

import datetime
import os
import pickle
import queue
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def _worker(rank, world_size, port, backend, timeout_s, fn, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        out = fn(rank, world_size, *args)
        # Plain pickle (by value): the queue's own pickler would pass tensors as shared
        # memory handles, which are gone once this worker exits.
        results.put((rank, "ok", pickle.dumps(out)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
        raise
    finally:
        dist.destroy_process_group()


def spawn(fn, world_size: int, *args, backend: str | None = None, timeout_s: float = 120.0) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes joined in a group.

    ``fn`` must be importable (a module-level function). Returns the list of the
    values ``fn`` returned, by rank; raises RuntimeError with the worker's traceback
    if any worker fails, and gives up on collectives after ``timeout_s`` seconds.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    backend = backend or default_backend()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, backend, timeout_s, fn, args, results))
             for r in range(world_size)]
    for p in procs:
        p.start()
    outputs, errors = {}, []
    deadline = time.monotonic() + timeout_s * 4
    # Drain results while waiting: a worker blocks on a full queue until it is read.
    while len(outputs) + len(errors) < world_size and time.monotonic() < deadline:
        try:
            rank, status, payload = results.get(timeout=0.5)
        except queue.Empty:
            if not any(p.is_alive() for p in procs) and results.empty():
                break
            continue
        if status == "ok":
            outputs[rank] = pickle.loads(payload)
        else:
            errors.append(f"worker {rank} failed:\n{payload}")
    for r, p in enumerate(procs):
        p.join(max(0.0, min(10.0, deadline - time.monotonic())))
        if p.is_alive():
            p.kill()
            p.join()
            if r not in outputs:
                errors.append(f"worker {r} did not finish within {timeout_s * 4:.0f}s")
        elif r not in outputs and p.exitcode != 0 and not errors:
            errors.append(f"worker {r} exited with code {p.exitcode}")
    if errors:
        raise RuntimeError("\n".join(errors))
    return [outputs[r] for r in range(world_size)]


def init_from_env(backend: str | None = None, timeout_s: float = 600.0) -> tuple[int, int]:
    """init_process_group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT)."""
    backend = backend or default_backend()
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()
