"""trainops train as a real command: SIGTERM checkpoints and stops; a killed worker is reported."""
import json
import os
import signal
import subprocess
import sys
import time

from test_runtime_e2e import TINY, _argv

LONG = {**TINY, "task_steps": 400, "checkpoint_every": 0, "timeout_s": 15}


def _start(out):
    cmd = [sys.executable, "-m", "trainops.train", *_argv({**LONG, "workers": 2, "out_dir": out})]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(proc, out, n, limit=60.0):
    path = os.path.join(out, "metrics.jsonl")
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"exited early: {proc.communicate()}")
        if os.path.exists(path) and sum(1 for _ in open(path)) >= n:
            return
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("no progress")


def _children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        return [int(p) for p in fh.read().split()]


def test_sigterm_checkpoints_and_resume_is_possible(tmp_path):
    out = str(tmp_path)
    proc = _start(out)
    _wait_for_steps(proc, out, 8)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "continue with --resume" in err
    meta = json.load(open(os.path.join(out, "checkpoint", "latest.json")))
    assert meta["step"] >= 8 and not meta["final"]
    names = sorted(os.listdir(os.path.join(out, "checkpoint", meta["dir"])))
    assert names == ["manifest.json", "rank0.safetensors", "rank1.safetensors"]  # no temporary files left


def test_dead_worker_is_reported(tmp_path):
    out = str(tmp_path)
    proc = _start(out)
    _wait_for_steps(proc, out, 8)
    workers = [p for p in _children(proc.pid) if "spawn_main" in open(f"/proc/{p}/cmdline").read()]
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    start = time.monotonic()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    # no checkpoint yet (checkpoint_every 0): the message says so instead of offering --resume
    assert f"a worker failed; no checkpoint was saved in {out}/checkpoint" in err and "can be resumed" not in err
    assert time.monotonic() - start < 100
    for name in os.listdir(os.path.join(out, "checkpoint")):
        assert ".tmp" not in name
