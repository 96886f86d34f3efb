"""A fresh key space in torchrun's shared store each time the workers start.

torchrun's c10d rendezvous hands its workers the agent's own TCPStore
(``TORCHELASTIC_USE_AGENT_STORE=True``, the default unless the agents run with
``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``). That server lives as long as the agent of
node rank 0, across restarts of the workers, and ``init_process_group`` writes the same
key names every time. After a restart the previous workers' keys are still there: a worker
that reads a peer's address before the restarted peer has overwritten it gets the dead
predecessor's, and gloo's ``connectFullMesh`` fails with "Connection refused" (NCCL reads a
stale unique id; pytorch/pytorch#135712). ``TORCHELASTIC_RESTART_COUNT`` cannot name the
attempt: each agent counts only its own failures, so the counts differ between hosts.

So the workers first agree on a key prefix nobody used before, with a handshake that stale
keys cannot satisfy: rank 0 draws a random ``generation``; every other rank ``r`` posts a
random token under ``hello/r`` and waits for ``welcome/r`` to echo *its* token with the
generation; rank 0 answers whatever token it finds under ``hello/r`` (a stale one is
answered too, and answered again once the live worker replaces it) until ``ready/r``
carries the live token with *this* generation, which only a worker of this start can
write. Then everyone joins the process group under ``trainops/<generation>/``.

The same store tells whether the workers started before in this job: rank 0 finds the
generation of an earlier start there. Unlike the restart counts this holds when no agent
counted a failure, e.g. when every host restarts its workers for a replacement host.
"""
from __future__ import annotations

import datetime
import os
import time
import uuid

import torch.distributed as dist

__all__ = ["uses_agent_store", "agree_generation", "fresh_agent_store", "earlier_start_seen"]

_KEYS = "trainops/join"
_POLL_S = 0.02
_seen = {"earlier_start": False}  # what this process's join found (rank 0 only)


def uses_agent_store() -> bool:
    """Whether torchrun handed this worker its agent's store (read as torch itself reads it)."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)


def _value(store, key: str) -> str | None:
    return store.get(key).decode() if store.check([key]) else None


def agree_generation(store, rank: int, world_size: int, timeout_s: float) -> str:
    """The generation every worker of this start agrees on (see the module docstring).

    Raises TimeoutError naming the ranks that did not answer within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    if rank == 0:
        generation = uuid.uuid4().hex
        answered: dict[int, str] = {}
        waiting = set(range(1, world_size))
        while waiting:
            for r in sorted(waiting):
                token = _value(store, f"{_KEYS}/hello/{r}")
                if token is None:
                    continue
                if answered.get(r) != token:
                    store.set(f"{_KEYS}/welcome/{r}", f"{token} {generation}")
                    answered[r] = token
                if _value(store, f"{_KEYS}/ready/{r}") == f"{token} {generation}":
                    waiting.discard(r)
            if waiting and time.monotonic() > deadline:
                raise TimeoutError(f"rank 0: ranks {sorted(waiting)} did not join within {timeout_s} s")
            if waiting:
                time.sleep(_POLL_S)
        return generation
    token = uuid.uuid4().hex
    store.set(f"{_KEYS}/hello/{rank}", token)
    while True:
        welcome = _value(store, f"{_KEYS}/welcome/{rank}")
        if welcome is not None and welcome.startswith(token + " "):
            generation = welcome.split(" ", 1)[1]
            store.set(f"{_KEYS}/ready/{rank}", f"{token} {generation}")
            return generation
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: rank 0 did not answer within {timeout_s} s")
        time.sleep(_POLL_S)


def fresh_agent_store(rank: int, world_size: int, timeout_s: float):
    """A client of the agent's store at MASTER_ADDR:MASTER_PORT, under a prefix of this start only."""
    timeout = datetime.timedelta(seconds=timeout_s)
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size=world_size,
                           is_master=False, timeout=timeout)
    if rank == 0:
        _seen["earlier_start"] = client.check([f"{_KEYS}/generation"])
    generation = agree_generation(client, rank, world_size, timeout_s)
    if rank == 0:
        client.set(f"{_KEYS}/generation", generation)
    return dist.PrefixStore(f"trainops/{generation}/", client)


def earlier_start_seen() -> bool:
    """Rank 0, after joining through :func:`fresh_agent_store`: whether the agent's store
    had seen an earlier start of the workers (this start is a restart of the job)."""
    return _seen["earlier_start"]
