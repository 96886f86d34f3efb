"""Elastic restarts of ``trainops train`` under torchrun on two emulated hosts.

Two network namespaces joined by 100mbit token-bucket links (benchmarks.wan.hosts) run
one torchrun agent each with a c10d rendezvous on host 0. One worker is SIGKILLed after the
first checkpoint; under ``--max-restarts 1`` every worker restarts, resumes from the last
complete checkpoint and the job ends with a final checkpoint and metrics equal to an
uninterrupted run's, bit for bit (the runtime's resume is exact from every step); a worker
lost before any checkpoint makes the restarted job start over, with the same result. The
namespace tests skip, with the reason, where ``ip netns add`` is not permitted (no root);
they run on the project's CPU machine.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _own_prefix() -> str:
    """'t' + this pytest's pid in base 36 + '-': another harness on this machine (a second test
    run, a benchmark, the leftovers of a killed one) has other names, so neither refuses to
    start nor cleans up the other. Set before the harness module reads it; the scripts these
    tests start inherit it."""
    n, digits = os.getpid() % 36 ** 4, ""
    while n or not digits:
        n, d = divmod(n, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[d] + digits
    return f"t{digits}-"


os.environ.setdefault("TRAINOPS_NETNS_PREFIX", _own_prefix())

from benchmarks.wan.hosts import Hosts, cleanup, cmdline, descendants, leftovers, namespace, netns_permitted  # noqa: E402
from test_runtime_e2e import TINY, _argv  # noqa: E402
from test_runtime_resume_exact import _comparable, _differences, _final, _rows  # noqa: E402
from trainops.runtime import elastic  # noqa: E402
from trainops.runtime.config import config_from_dict  # noqa: E402

_OK, _WHY = netns_permitted()
needs_netns = pytest.mark.skipif(not _OK, reason=_WHY)

# 20 steps, a checkpoint every 2: the kill lands long before the end
RUN = {**TINY, "tasks": "arith", "pretrain_steps": 8, "task_steps": 12, "checkpoint_every": 2, "timeout_s": 120}


def _cfg(out, **kw):
    return config_from_dict({**RUN, "out_dir": str(out), **kw})


# -- the restart decision, without processes --------------------------------------------------

def test_first_attempt_and_foreign_markers_change_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    cfg = _cfg(tmp_path)
    assert elastic.restart_config(cfg, 0) == cfg
    elastic.write_marker(str(tmp_path))
    assert elastic.restart_config(cfg, 0) == cfg  # first attempt
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")  # another job's marker: the ordinary checks apply
    assert elastic.restart_config(cfg, 1) == cfg
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    restarted = elastic.restart_config(cfg, 1)  # own job, no checkpoint yet: start over
    assert restarted.overwrite and not restarted.resume
    elastic.forget_marker(str(tmp_path))
    assert elastic.restart_config(cfg, 1) == cfg


def test_restart_refuses_a_damaged_checkpoint(tmp_path, monkeypatch):
    from trainops.runtime.config import ConfigError

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    monkeypatch.setenv("WORLD_SIZE", "2")
    elastic.write_marker(str(tmp_path))
    os.makedirs(tmp_path / "checkpoint")
    (tmp_path / "checkpoint" / "latest.json").write_text("{not json")
    with pytest.raises(ConfigError, match="torchrun restart 2: cannot resume"):
        elastic.restart_config(_cfg(tmp_path), 2)


# -- joining torchrun's shared store after a restart ------------------------------------------

def test_generation_handshake_ignores_a_previous_starts_keys():
    """The keys a finished start left behind (hello, welcome and ready of rank 1) must neither
    let rank 0 go ahead without the live rank 1 nor hand rank 1 the old generation."""
    import threading

    import torch.distributed as dist

    from trainops.distributed.agent_store import agree_generation

    store = dist.HashStore()
    keys = "trainops/join"
    store.set(f"{keys}/hello/1", "old")
    store.set(f"{keys}/welcome/1", "old gen0")
    store.set(f"{keys}/ready/1", "old gen0")
    got = {}

    def join(rank):
        got[rank] = agree_generation(store, rank, 2, timeout_s=30)

    first = threading.Thread(target=join, args=(0,))
    first.start()
    first.join(0.3)
    assert first.is_alive()  # rank 0 waits for the live rank 1, the stale ready/1 does not count
    second = threading.Thread(target=join, args=(1,))
    second.start()
    first.join(30)
    second.join(30)
    assert got[0] == got[1] != "gen0" and len(got[0]) == 32


def test_generation_handshake_times_out_naming_the_missing_rank():
    import torch.distributed as dist

    from trainops.distributed.agent_store import agree_generation

    with pytest.raises(TimeoutError, match=r"ranks \[1, 2\] did not join"):
        agree_generation(dist.HashStore(), 0, 3, timeout_s=0.2)
    with pytest.raises(TimeoutError, match="rank 2: rank 0 did not answer"):
        agree_generation(dist.HashStore(), 2, 3, timeout_s=0.2)


_JOIN = """
import os, signal, sys, torch, torch.distributed as dist
from trainops.runtime.elastic import agreed_restart_count
print("joining", flush=True)
restarts = agreed_restart_count(float(sys.argv[1]))  # joins the process group
t = torch.ones(1)
dist.all_reduce(t)
print("sum", t.item(), "restarts", restarts, flush=True)
if sys.argv[2] == "die":  # as torchrun's workers end before a restart: nothing cleaned up
    os.kill(os.getpid(), signal.SIGKILL)
dist.destroy_process_group()
"""


def test_workers_restarted_on_torchruns_shared_store_connect():
    """Workers of a second start on the same agent store (as after a torchrun restart) join
    when rank 0 arrives well before rank 1: without a fresh key space rank 0 reads the
    killed rank 1's address and gloo's connectFullMesh fails. They know they restart
    although no agent counted a restart (TORCHELASTIC_RESTART_COUNT unset)."""
    import torch.distributed as dist

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, multi_tenant=True, wait_for_workers=False)
    env = {**os.environ, "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(server.port), "TORCHELASTIC_USE_AGENT_STORE": "True", "GLOO_SOCKET_IFNAME": "lo",
           "OMP_NUM_THREADS": "1"}  # the workers import the trainops this test imports (installed or editable)

    def start(rank, end="exit"):
        return subprocess.Popen([sys.executable, "-c", _JOIN, "20", end], env={**env, "RANK": str(rank)},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def finish(procs, restarts, returncode=0):
        outs = [p.communicate(timeout=120)[0] for p in procs]
        for p, out in zip(procs, outs):
            assert p.returncode == returncode and f"sum 2.0 restarts {restarts}" in out, out[-3000:]

    # the first start is killed and leaves its keys in the store
    finish([start(0, "die"), start(1, "die")], restarts=0, returncode=-signal.SIGKILL)
    early = start(0)
    assert early.stdout.readline().strip() == "joining"
    time.sleep(1.0)  # rank 0 is in init_process_group before rank 1 has even started
    finish([early, start(1)], restarts=1)


# -- the harness ------------------------------------------------------------------------------

_SINK = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5001)); s.listen(); print("ready", flush=True)
c, _ = s.accept(); n = 0; t = None
while True:
    b = c.recv(1 << 16)
    if not b: break
    t = t or time.perf_counter(); n += len(b)
print(n * 8 / (time.perf_counter() - t) / 1e6, flush=True)
"""


@needs_netns
def test_hosts_rate_limit_and_cleanup():
    with Hosts(2, rate="20mbit") as hosts:
        sink = hosts.popen(1, [sys.executable, "-c", _SINK, hosts.address(1)], stdout=subprocess.PIPE, text=True)
        assert sink.stdout.readline().strip() == "ready"
        send = "import socket,sys; s=socket.create_connection((sys.argv[1],5001)); s.sendall(b'x'*(4<<20)); s.close()"
        hosts.run(0, [sys.executable, "-c", send, hosts.address(1)], check=True, timeout=60)
        mbit = float(sink.communicate(timeout=60)[0])
        # loopback moves gigabits per second; the token bucket lets ~20 through
        assert 8 < mbit < 26, mbit
        assert len(leftovers()[0]) == 2
    assert leftovers() == ([], [])


@needs_netns
def test_hosts_cleaned_up_after_an_exception():
    with pytest.raises(ZeroDivisionError):
        with Hosts(3, rate="10mbit") as hosts:
            hosts.popen(2, ["sleep", "60"])
            assert len(leftovers()[0]) == 3
            1 / 0
    assert leftovers() == ([], [])


@needs_netns
def test_cleanup_removes_leftovers_of_a_killed_harness():
    script = ("import sys, time; sys.path.insert(0, sys.argv[1]); from benchmarks.wan.hosts import Hosts\n"
              "h = Hosts(2, rate=None).__enter__(); print('up', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", script, ROOT], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        proc.kill()  # no handler runs on SIGKILL: the namespaces stay behind
        proc.wait()
        assert len(leftovers()[0]) == 2
        done = subprocess.run([sys.executable, "-m", "benchmarks.wan.run", "--cleanup"], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and namespace(0) in done.stdout, done.stdout + done.stderr
        assert leftovers() == ([], [])
    finally:
        proc.kill()
        cleanup()


@needs_netns
def test_sigterm_removes_the_hosts():
    script = ("import sys, time; sys.path.insert(0, sys.argv[1]); from benchmarks.wan.hosts import Hosts\n"
              "with Hosts(2, rate='10mbit') as h:\n"
              "    h.popen(1, ['sleep', '60']); print('up', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", script, ROOT], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        assert len(leftovers()[0]) == 2
        proc.terminate()
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        assert leftovers() == ([], [])
    finally:
        proc.kill()
        cleanup()


# -- elastic restart over the emulated links --------------------------------------------------

def _worker_pid(agent_pid: int) -> int | None:
    for pid in descendants(agent_pid):
        if "trainops.train" in cmdline(pid) and "torch.distributed.run" not in cmdline(pid):
            return pid
    return None


def _wait(what, timeout=180.0, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        for p in procs:
            assert p.poll() is None, "a torchrun agent ended early"
        time.sleep(0.02)
    raise AssertionError("timed out")


def _metrics_row(out):
    path = os.path.join(out, "metrics.jsonl")
    return os.path.exists(path) and os.path.getsize(path) > 0


def _run_job(hosts, out, port, kill_rank_host=None, run=RUN, kill_when="checkpoint"):
    """Run the job on every host; with ``kill_rank_host`` SIGKILL that host's worker after
    the first checkpoint (``kill_when="checkpoint"``) or the first metrics row ("metrics")."""
    args = _argv({**run, "out_dir": out})
    # files, not pipes: a pipe nobody reads while waiting on the other host fills and blocks its writer
    logs = [open(f"{out}.host{i}.log", "w+") for i in range(hosts.n)]
    # one restart must do: the workers of a restart join under keys of their own in the agent's
    # store (trainops.distributed.agent_store), never the dead workers' addresses
    procs = hosts.launch_torchrun(args, port=port, max_restarts=1, stdout_per_host=logs, stderr=subprocess.STDOUT)
    killed_at = None
    if kill_rank_host is not None:
        pointer = os.path.join(out, "checkpoint", "latest.json")
        _wait((lambda: os.path.exists(pointer)) if kill_when == "checkpoint" else (lambda: _metrics_row(out)),
              procs=procs)
        victim = _wait(lambda: _worker_pid(procs[kill_rank_host].pid), procs=procs)
        os.kill(victim, signal.SIGSTOP)  # freeze it first, so the run cannot finish meanwhile
        killed_at = {"final": False, "step": 0}
        if os.path.exists(pointer):
            with open(pointer) as fh:
                killed_at = json.load(fh)
        os.kill(victim, signal.SIGKILL)
    # one agent that gives up leaves the other waiting for a rendezvous: stop waiting then
    deadline = time.monotonic() + 400
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if any(p.poll() not in (None, 0) for p in procs):
            time.sleep(20)
            break
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-4000:]
    return killed_at, outputs


@needs_netns
def test_killed_worker_restarts_and_ends_like_an_uninterrupted_run(tmp_path):
    with Hosts(2, rate="100mbit") as hosts:
        straight = str(tmp_path / "straight")
        _run_job(hosts, straight, port=29511)
        killed = str(tmp_path / "killed")
        killed_at, outputs = _run_job(hosts, killed, port=29512, kill_rank_host=1)
    assert leftovers() == ([], [])
    assert not killed_at["final"] and killed_at["step"] < 20, killed_at
    steps = RUN["pretrain_steps"] + RUN["task_steps"]
    for r in range(2):
        a, b = _final(straight, r), _final(killed, r)
        assert b["config"]["resume"] and not a["config"]["resume"]  # the second attempt resumed
        assert a["state"]["global_step"] == b["state"]["global_step"] == steps
        assert _differences(_comparable(a), _comparable(b)) == []
    assert _rows(killed) == _rows(straight)
    assert sum("trainops train: done" in o for o in outputs) == 1


@needs_netns
def test_worker_lost_before_any_checkpoint_restarts_from_scratch(tmp_path):
    run = {**RUN, "checkpoint_every": 0}  # only the final checkpoint
    with Hosts(2, rate="100mbit") as hosts:
        straight = str(tmp_path / "straight")
        _run_job(hosts, straight, port=29521, run=run)
        killed = str(tmp_path / "killed")
        killed_at, _ = _run_job(hosts, killed, port=29522, kill_rank_host=1, run=run, kill_when="metrics")
    assert killed_at == {"final": False, "step": 0}
    for r in range(2):
        a, b = _final(straight, r), _final(killed, r)
        assert b["config"]["overwrite"] and not b["config"]["resume"]  # the second attempt started over
        a, b = _comparable(a), _comparable(b)
        b["config"]["overwrite"] = False
        assert _differences(a, b) == []
    assert _rows(killed) == _rows(straight)
