"""Workers die with their launcher: SIGKILL of the launcher alone leaves no worker running.

A launcher subprocess spawns 2 gloo workers that loop forever and write their pids; the
test SIGKILLs the launcher and checks that every worker is gone within a few seconds.
"""
import os
import signal
import subprocess
import sys
import textwrap
import time

import torch
import torch.distributed as dist

from test_launch_liveness import _gone

TESTS = os.path.dirname(os.path.abspath(__file__))


def _wait_for(predicate, timeout_s, what):
    end = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.1)


def _pid_files(piddir, n):
    names = [n for n in os.listdir(piddir) if n.endswith(".pid")]
    if len(names) < n:
        return None
    return [int(open(os.path.join(piddir, name)).read()) for name in names]


def _loop_forever(rank, world, piddir):
    t = torch.ones(1)
    dist.all_reduce(t)
    with open(os.path.join(piddir, f"{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
    while True:
        dist.all_reduce(t)
        time.sleep(0.1)


def _stuck_and_deaf(rank, world, piddir):
    """Rank 0 notes its SIGTERM and keeps going; rank 1 sits in a collective rank 0 never joins."""
    def note(signum, frame):
        open(os.path.join(piddir, f"{rank}.sigterm"), "w").close()

    signal.signal(signal.SIGTERM, note)
    dist.barrier()
    with open(os.path.join(piddir, f"{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
    if rank == 1:
        dist.all_reduce(torch.ones(1))  # blocks in C++: no Python handler runs until it returns
    while True:
        time.sleep(0.1)


def _start_launcher(piddir, fn_name, timeout_s, orphan_grace_s):
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {TESTS!r})
        from test_launch_orphans import {fn_name} as fn
        from trainops.distributed.launch import spawn
        spawn(fn, 2, {str(piddir)!r}, backend="gloo", timeout_s={timeout_s}, orphan_grace_s={orphan_grace_s})
    """)
    return subprocess.Popen([sys.executable, "-c", code])


def _kill_launcher_and_check(launcher, pids, within_s):
    launcher.kill()
    launcher.wait()
    try:
        _wait_for(lambda: all(_gone(p) for p in pids), within_s, f"workers {pids} to die with their launcher")
    finally:
        for p in pids:  # never leave a worker behind, even when the test fails
            if not _gone(p):
                os.kill(p, signal.SIGKILL)


def test_workers_die_with_sigkilled_launcher(tmp_path):
    launcher = _start_launcher(tmp_path, "_loop_forever", timeout_s=30, orphan_grace_s=30)
    try:
        _wait_for(lambda: _pid_files(tmp_path, 2), 120, "2 workers to start")
        pids = _pid_files(tmp_path, 2)
        assert not any(_gone(p) for p in pids)
        time.sleep(0.5)
        assert launcher.poll() is None and not any(_gone(p) for p in pids)  # training, not dying
        # SIGTERM from the kernel: with the default disposition they stop at once, well within the grace
        _kill_launcher_and_check(launcher, pids, within_s=10)
    finally:
        launcher.kill()


def test_worker_blocked_in_collective_is_killed_after_grace(tmp_path):
    """SIGTERM cannot stop a worker stuck in a collective (or one that ignores it): the watchdog SIGKILLs it."""
    launcher = _start_launcher(tmp_path, "_stuck_and_deaf", timeout_s=600, orphan_grace_s=2)
    try:
        _wait_for(lambda: _pid_files(tmp_path, 2), 120, "2 workers to start")
        pids = _pid_files(tmp_path, 2)
        _kill_launcher_and_check(launcher, pids, within_s=20)
        if sys.platform.startswith("linux"):  # PR_SET_PDEATHSIG sent SIGTERM first (the checkpoint chance)
            assert os.path.exists(os.path.join(tmp_path, "0.sigterm"))
    finally:
        launcher.kill()


_ORPHAN = """
import os, sys, time
import trainops.distributed.launch as launch
if sys.argv[1] == "no-prctl":
    launch._set_parent_death_signal = lambda sig: False  # as on a system without PR_SET_PDEATHSIG
    launch.die_with_parent(os.getppid(), grace_s=30)
else:
    launch.die_with_parent(os.getppid() + 4_000_000, grace_s=30)  # not our parent: it is "already dead"
print(os.getpid(), flush=True)
while True:
    time.sleep(0.1)
"""


def test_parent_already_gone_exits_at_once():
    proc = subprocess.run([sys.executable, "-c", _ORPHAN, "dead-parent"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""


def test_watchdog_without_prctl_terminates_orphan(tmp_path):
    """The getppid() watchdog alone (no PR_SET_PDEATHSIG) ends a worker whose parent died."""
    pidfile = tmp_path / "orphan.pid"
    # an intermediate parent that starts the worker, then is SIGKILLed
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import subprocess, sys, time
        with open({str(pidfile)!r}, "w") as out:
            subprocess.Popen([sys.executable, "-c", {_ORPHAN!r}, "no-prctl"], stdout=out)
        time.sleep(600)
    """)])
    try:
        _wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 120, "the worker to start")
        pid = int(pidfile.read_text())
        assert not _gone(pid)
        _kill_launcher_and_check(parent, [pid], within_s=10)
    finally:
        parent.kill()
