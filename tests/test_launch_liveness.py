"""spawn has no wall-clock deadline: a long healthy job finishes; a dead worker ends the job promptly.

Real gloo workers over localhost with a tiny collective timeout (timeout_s = 1-2 s).
"""
import os
import signal
import time

import pytest
import torch
import torch.distributed as dist

from trainops.distributed.launch import WorkerError, spawn

TIMEOUT_S = 2.0


def _write_pid(piddir, rank):
    with open(os.path.join(piddir, f"{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))


def _pids(piddir):
    return [int(open(os.path.join(piddir, name)).read()) for name in sorted(os.listdir(piddir))]


def _gone(pid):
    """True once ``pid`` no longer runs (absent, or a zombie not yet reaped by its new parent)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _long_job(rank, world, seconds, piddir):
    """Collectives every 0.1 s (well inside the collective timeout) for ``seconds`` of wall clock."""
    _write_pid(piddir, rank)
    start = time.monotonic()
    steps = 0
    t = torch.zeros(1)
    while True:
        # rank 0 decides when to stop, so both ranks run the same number of collectives
        t.fill_(1.0 if rank == 0 and time.monotonic() - start >= seconds else 0.0)
        dist.all_reduce(t)
        steps += 1
        if t.item() > 0:
            break
        time.sleep(0.1)
    return {"steps": steps, "elapsed": time.monotonic() - start}


def _one_rank_dies(rank, world, piddir, how):
    _write_pid(piddir, rank)
    t = torch.ones(1)
    for step in range(100_000):
        if rank == 1 and step == 5:
            if how == "exit":
                os._exit(3)
            os.kill(os.getpid(), signal.SIGKILL)
        dist.all_reduce(t)
        time.sleep(0.05)
    return rank


def _peer_hangs_outside_collectives(rank, world, piddir):
    _write_pid(piddir, rank)
    dist.barrier()
    if rank == 1:
        os._exit(5)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL can stop this one
    while True:
        time.sleep(0.1)


def test_job_longer_than_old_deadline_finishes(tmp_path):
    seconds = 3 * 4 * TIMEOUT_S + 1  # three times the old 4 x timeout_s wall-clock limit
    out = spawn(_long_job, 2, seconds, str(tmp_path), backend="gloo", timeout_s=TIMEOUT_S)
    assert [o["steps"] for o in out][0] == out[1]["steps"] > 10
    assert all(o["elapsed"] >= seconds for o in out)
    assert all(_gone(pid) for pid in _pids(tmp_path))


@pytest.mark.parametrize("how, expected", [("exit", "exited with code 3"), ("sigkill", "was killed by signal SIGKILL")])
def test_dead_worker_ends_job_and_is_named(tmp_path, how, expected):
    start = time.monotonic()
    with pytest.raises(WorkerError) as info:
        spawn(_one_rank_dies, 2, str(tmp_path), how, backend="gloo", timeout_s=TIMEOUT_S, failure_grace_s=5.0)
    elapsed = time.monotonic() - start
    err = info.value
    assert err.rank == 1
    assert f"worker 1 failed: pid {_pids(tmp_path)[1]} {expected}" in str(err)
    assert str(err).startswith("worker 1 ")  # the dead worker is reported first, before its peer
    assert err.exitcode == (3 if how == "exit" else -signal.SIGKILL)
    assert err.signal == (None if how == "exit" else "SIGKILL")
    assert elapsed < 60, f"the job took {elapsed:.0f}s to notice a dead worker"
    pids = _pids(tmp_path)
    assert len(pids) == 2 and all(_gone(pid) for pid in pids)


def test_peer_that_ignores_failure_is_stopped(tmp_path):
    start = time.monotonic()
    with pytest.raises(WorkerError, match="exited with code 5") as info:
        spawn(_peer_hangs_outside_collectives, 2, str(tmp_path), backend="gloo", timeout_s=TIMEOUT_S,
              failure_grace_s=1.0)
    assert info.value.rank == 1
    assert "worker(s) 0 still running 1s after worker 1 failed: stopped by the launcher" in str(info.value)
    assert time.monotonic() - start < 60
    assert all(_gone(pid) for pid in _pids(tmp_path))
