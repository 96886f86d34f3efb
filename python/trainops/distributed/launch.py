"""Start a local process group: N worker processes on one machine, gloo or NCCL.

Used by the tests (real multi-process collectives over localhost), the examples and
``trainops train --workers N``. Under ``torchrun`` use :func:`init_from_env` instead.

Liveness (like torchrun's elastic agent): the launcher has no wall-clock deadline, a
healthy job runs as long as it needs. It gives up only on a worker that failed: when a
worker raises, exits nonzero or is killed by a signal, its peers get ``failure_grace_s``
to finish or fail on their own (a collective with a dead peer raises, at the latest
after ``timeout_s``), then the launcher stops them and raises :class:`WorkerError`
naming the rank and how it ended. A hung worker makes its peers' next collective time
out (``timeout_s``), so it ends the same way once a peer has failed; a job of one
worker that hangs outside collectives is not detected (no heartbeat).

Orphans: workers die with the launcher. Each worker asks the kernel for SIGTERM when
its parent dies (``PR_SET_PDEATHSIG``, Linux), so trainops's runtime checkpoints and
stops at the next step; a watchdog thread that polls ``os.getppid()`` covers other
systems, and SIGKILLs the worker ``orphan_grace_s`` after the parent is gone (a worker
blocked in a collective may never reach its SIGTERM handler). A worker whose parent
died before the request took effect exits at once.
"""
from __future__ import annotations

import ctypes
import datetime
import os
import pickle
import queue
import signal
import socket
import sys
import threading
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["spawn", "init_from_env", "WorkerError", "free_port", "default_backend"]

_PR_SET_PDEATHSIG = 1
#: Seconds between two checks of the parent pid by a worker's watchdog thread.
_PARENT_POLL_S = 0.5
#: Seconds a worker gets between SIGTERM and SIGKILL when the launcher stops it.
_TERM_TO_KILL_S = 5.0


class WorkerError(RuntimeError):
    """A spawned worker failed. ``rank``: the first worker that failed; ``exitcode``: its exit
    status as :attr:`multiprocessing.Process.exitcode` gives it (negative: killed by that signal;
    None: it raised and was still running when stopped); ``signal``: the signal's name or None."""

    def __init__(self, message: str, rank: int, exitcode: int | None):
        super().__init__(message)
        self.rank = rank
        self.exitcode = exitcode
        self.signal = signal.Signals(-exitcode).name if exitcode is not None and exitcode < 0 else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def _set_parent_death_signal(sig: int) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent thread exits (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int, grace_s: float, signalled: bool) -> None:
    while os.getppid() == parent_pid:
        time.sleep(_PARENT_POLL_S)
    if not signalled:  # no PR_SET_PDEATHSIG here: deliver the SIGTERM it would have sent
        os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)
    os.kill(os.getpid(), signal.SIGKILL)


def die_with_parent(parent_pid: int, grace_s: float) -> None:
    """Make this process end when ``parent_pid`` (its parent now) dies: SIGTERM at once, SIGKILL
    ``grace_s`` seconds later. Exits at once if the parent is already gone."""
    signalled = _set_parent_death_signal(signal.SIGTERM)
    # Checked after prctl: a parent that died before it will never send the signal.
    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid, grace_s, signalled), daemon=True,
                     name="trainops-parent-watch").start()


def _worker(rank, world_size, port, backend, timeout_s, fn, args, results, parent_pid, orphan_grace_s,
            startup_timeout_s):
    die_with_parent(parent_pid, orphan_grace_s)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    # Rendezvous with a startup timeout of its own: workers that import torch at different
    # speeds must not trip a short collective timeout before training even starts.
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=rank == 0,
                          timeout=datetime.timedelta(seconds=startup_timeout_s), wait_for_workers=True)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
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
        # Flush the result before leaving the group: peers notice this worker's exit only
        # afterwards, so its own report reaches the launcher before theirs.
        results.close()
        results.join_thread()
        dist.destroy_process_group()


def _how_it_ended(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"was killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    if exitcode == 0:
        return "exited with code 0 without returning a result"
    return f"exited with code {exitcode}"


def _stop(procs) -> None:
    """SIGTERM every live worker, SIGKILL those still alive a few seconds later; reap all."""
    live = [p for p in procs if p.is_alive()]
    for p in live:
        p.terminate()
    end = time.monotonic() + _TERM_TO_KILL_S
    for p in live:
        p.join(max(0.0, end - time.monotonic()))
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join()


def _supervise(procs, results, failure_grace_s: float) -> list:
    world_size = len(procs)
    outputs: dict[int, object] = {}
    tracebacks: dict[int, str] = {}  # rank -> traceback, in the order received
    exits: dict[int, int] = {}  # rank -> exit code, for workers that ended without a result
    give_up_at = None

    def drain(wait_s):
        try:
            item = results.get(timeout=wait_s) if wait_s else results.get_nowait()
            while True:
                rank, status, payload = item
                if status == "ok":
                    outputs[rank] = pickle.loads(payload)
                else:
                    tracebacks[rank] = payload
                item = results.get_nowait()
        except queue.Empty:
            pass

    while True:
        drain(0.2)
        ended = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode is not None]
        drain(0)  # what a worker put just before it ended is in the pipe by now
        for r, code in ended:
            if r not in outputs:
                exits.setdefault(r, code)
        if len(outputs) == world_size:
            break
        settled = set(outputs) | set(exits)
        if len(settled) == world_size:
            break
        if give_up_at is None and (tracebacks or exits):
            give_up_at = time.monotonic() + failure_grace_s
        if give_up_at is not None and time.monotonic() >= give_up_at:
            break
    if len(outputs) == world_size:
        # Every result is in: a worker stuck on its way out (e.g. in destroy_process_group)
        # gets the grace period, then is stopped; its result stands.
        end = time.monotonic() + failure_grace_s
        for p in procs:
            p.join(max(0.0, end - time.monotonic()))
        return [outputs[r] for r in range(world_size)]

    # Report the likely cause first: workers that ended without a Python traceback (os._exit,
    # a signal), then tracebacks in the order received (peers of a dead worker raise too).
    order = [r for r in exits if r not in tracebacks] + [r for r in tracebacks]
    lines = []
    for r in order:
        pid = procs[r].pid
        if r in tracebacks:
            how = f", then {_how_it_ended(exits[r])}" if r in exits and exits[r] != 1 else ""
            lines.append(f"worker {r} failed (pid {pid}{how}):\n{tracebacks[r]}")
        else:
            lines.append(f"worker {r} failed: pid {pid} {_how_it_ended(exits[r])}")
    first = order[0]
    stopped = [r for r in range(world_size) if r not in outputs and r not in exits and r not in tracebacks]
    if stopped:
        lines.append(f"worker(s) {', '.join(map(str, stopped))} still running {failure_grace_s:g}s after "
                     f"worker {first} failed: stopped by the launcher")
    raise WorkerError("\n".join(lines), first, exits.get(first))


def spawn(fn, world_size: int, *args, backend: str | None = None, timeout_s: float = 120.0,
          failure_grace_s: float = 10.0, orphan_grace_s: float = 30.0,
          startup_timeout_s: float | None = None) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes joined in a group.

    ``fn`` must be importable (a module-level function). Returns the list of the values
    ``fn`` returned, by rank, however long the job runs. Raises :class:`WorkerError` (a
    RuntimeError) naming the failed rank with its traceback, exit code or signal if a
    worker fails; the other workers are stopped at most ``failure_grace_s`` seconds later.
    ``timeout_s``: how long a collective waits for its peers before it raises.
    ``orphan_grace_s``: how long a worker whose launcher died may take to checkpoint and
    stop after its SIGTERM before it is killed. ``startup_timeout_s`` (default
    ``max(timeout_s, 300)``): how long the workers wait for each other at start-up.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    backend = backend or default_backend()
    startup_timeout_s = max(timeout_s, 300.0) if startup_timeout_s is None else startup_timeout_s
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, backend, timeout_s, fn, args, results,
                                               os.getpid(), orphan_grace_s, startup_timeout_s))
             for r in range(world_size)]
    try:
        for p in procs:
            p.start()
        return _supervise(procs, results, failure_grace_s)
    finally:
        _stop([p for p in procs if p.pid is not None])
        results.close()


def init_from_env(backend: str | None = None, timeout_s: float = 600.0) -> tuple[int, int]:
    """init_process_group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT).

    In torchrun's shared store the process group's keys go under a prefix of this start of
    the workers only, so a restart never reads its predecessors' (:mod:`.agent_store`)."""
    from trainops.distributed.agent_store import fresh_agent_store, uses_agent_store

    backend = backend or default_backend()
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        timeout = datetime.timedelta(seconds=timeout_s)
        if uses_agent_store():
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            dist.init_process_group(backend, store=fresh_agent_store(rank, world, timeout_s), rank=rank,
                                    world_size=world, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()
