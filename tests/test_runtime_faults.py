"""Faults of `trainops train` as a real command: signals, killed workers, a kill during a
checkpoint write, a full disk, damaged or crafted checkpoints, a second run into the same
folder. Each ends in a clear message, runs no code from a checkpoint and loses nothing that
was checkpointed."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from test_runtime_e2e import TINY, _argv
from trainops.runtime.checkpoint import load_checkpoint, rank_file, save_checkpoint, verify_checkpoint
from trainops.runtime.cli import _check_previous_run, main
from trainops.runtime.config import config_from_dict

LONG = {**TINY, "task_steps": 400, "checkpoint_every": 0, "timeout_s": 15}


def _start(out, **kw):
    cmd = [sys.executable, "-m", "trainops.train", *_argv({**LONG, "workers": 2, "out_dir": out, **kw})]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _steps(out):
    """Global steps of the metrics rows (a partial last line ignored)."""
    path, rows = os.path.join(out, "metrics.jsonl"), []
    if os.path.exists(path):
        for ln in open(path):
            try:
                row = json.loads(ln)
            except ValueError:
                continue
            if "event" not in row:
                rows.append(row["global_step"])
    return rows


def _latest(out):
    try:
        return verify_checkpoint(os.path.join(out, "checkpoint"))["step"]
    except Exception:
        return None


def _wait(proc, cond, what, limit=120.0):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if cond():
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited before {what}: {proc.communicate()}")
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"no {what} within {limit}s: {proc.communicate()}")


def _workers(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        kids = [int(p) for p in fh.read().split()]
    return [p for p in kids if "spawn_main" in open(f"/proc/{p}/cmdline").read()]


def _temporaries(root):
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if ".tmp" in f]


def _snapshot(root):
    return {os.path.relpath(os.path.join(d, f), root): hashlib.sha256(open(os.path.join(d, f), "rb").read()).digest()
            for d, _, fs in os.walk(root) for f in fs if f != ".lock"}


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A run stopped by SIGTERM after >= 6 steps (checkpoint, exit 130); a pristine copy of
    its folder is kept for the damage tests."""
    out = str(tmp_path_factory.mktemp("stopped"))
    proc = _start(out)
    _wait(proc, lambda: len(_steps(out)) >= 6, "6 steps")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    pristine = str(tmp_path_factory.mktemp("pristine") / "run")
    shutil.copytree(out, pristine, symlinks=True)
    return out, pristine, proc.returncode, err


def test_sigterm_checkpoints_exits_130(stopped):
    out, _, rc, err = stopped
    assert rc == 130, err
    assert "stopped; checkpoint saved" in err and "continue with --resume" in err
    step = _latest(out)
    assert step is not None and step >= 6 and _steps(out) == list(range(1, step + 1))
    assert _temporaries(out) == []


def test_sigkill_of_a_worker_then_resume(stopped, tmp_path, capsys):
    """Resume the SIGTERMed run (checkpoint every 2 steps), with a partial metrics line left
    by a kill; a second run into the folder is refused meanwhile; SIGKILL one worker: the
    job ends naming it and the last complete checkpoint; --resume continues from there."""
    out = str(tmp_path / "run")
    shutil.copytree(stopped[1], out, symlinks=True)
    first = _latest(out)
    with open(os.path.join(out, "metrics.jsonl"), "a") as fh:
        fh.write('{"global_step": 99, "phase": "task0:ar')  # killed mid-write
    proc = _start(out, resume=True, checkpoint_every=2)
    try:
        _wait(proc, lambda: (_latest(out) or 0) > first + 1 and len(_steps(out)) > first + 3, "a new checkpoint")
        # a second run into the same folder fails at once, naming the holder
        assert main(["train", *_argv({**LONG, "workers": 2, "out_dir": out, "resume": True})]) == 2
        second = capsys.readouterr().err
        assert f"out_dir {out} is in use by another trainops train (pid {proc.pid})" in second
        assert second.count("\n") == 1
        victim = _workers(proc.pid)[1]
        os.kill(victim, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "dropped a partial last line" in err
    assert proc.returncode == 1, err
    last = _latest(out)
    summary = err[err.index("trainops train: a worker failed"):]
    assert summary.startswith(f"trainops train: a worker failed; the last complete checkpoint (step {last}) in "
                              f"{out}/checkpoint can be resumed with --resume."), summary
    assert str(victim) in summary and "SIGKILL" in summary, summary
    assert os.path.exists(os.path.join(out, "worker_errors.log"))
    assert _temporaries(out) == []
    # --resume continues from the last checkpoint: metrics rows 1..last+2, each once
    proc = _start(out, resume=True, stop_after=last + 2)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err
    assert _steps(out) == list(range(1, last + 3)) and _latest(out) == last + 2


def test_sigkill_of_everything_while_checkpointing_every_step(tmp_path):
    """The launcher and its workers killed at once while a checkpoint is written at every
    step: the checkpoint latest.json names is complete, verified and loads on every rank."""
    out = str(tmp_path)
    proc = _start(out, checkpoint_every=1, replay_capacity=4096)  # larger files: longer writes
    try:
        _wait(proc, lambda: len(_steps(out)) >= 5, "5 steps")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    root = os.path.join(out, "checkpoint")
    meta = verify_checkpoint(root, 2)
    assert meta["step"] >= 4
    for r in range(2):
        state = load_checkpoint(root, r, 2)
        assert state["state"]["global_step"] == meta["step"] and state["world_size"] == 2


def _fork_and_die(fn):
    pid = os.fork()
    if pid == 0:
        try:
            fn()
        finally:
            os._exit(3)  # not reached when fn kills the process
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


def _state(rank, step):
    return {"world_size": 2, "step": step, "w": torch.full((128, 128), float(10 * step + rank))}


def _save_both(root, step):
    for rank in (1, 0):  # rank 0 last: it writes the manifest and the pointer after the "barrier"
        save_checkpoint(root, step, rank, _state(rank, step), lambda: None)


@pytest.mark.parametrize("point", ["rank-file-write", "before-rename-1", "before-rename-2", "manifest",
                                   "pointer-write", "cleanup"])
def test_sigkill_at_each_point_of_a_checkpoint_write(tmp_path, point):
    """A save killed (real SIGKILL) at each point: the previous checkpoint, or the new one once
    its pointer is in place, loads; the next save removes what the killed one left."""
    root = str(tmp_path)
    _save_both(root, 2)

    def killed_save():
        import builtins
        real_open, real_replace, calls = builtins.open, os.replace, {"replace": 0}
        die = lambda: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731

        def replace(src, dst):
            calls["replace"] += 1
            n = {"before-rename-1": 1, "before-rename-2": 2, "manifest": 3}.get(point)
            if n == calls["replace"]:
                die()
            return real_replace(src, dst)

        class Half:
            def __init__(self, fh):
                self.fh = fh

            def __enter__(self):
                return self

            def __exit__(self, *a):
                return self.fh.__exit__(*a)

            def write(self, data):
                self.fh.write(data[:len(data) // 2])
                self.fh.flush()
                die()

            def __getattr__(self, name):
                return getattr(self.fh, name)

        def opener(path, mode="r", *a, **k):
            fh = real_open(path, mode, *a, **k)
            target = {"rank-file-write": "rank1.safetensors.tmp", "pointer-write": "latest.json.tmp"}.get(point)
            return Half(fh) if target and target in str(path) and "w" in mode else fh

        builtins.open = opener
        os.replace = replace
        if point == "cleanup":
            shutil.rmtree = lambda path, **k: (os.unlink(os.path.join(path, rank_file(0))), die())
        _save_both(root, 4)

    _fork_and_die(killed_save)
    expect = 4 if point == "cleanup" else 2
    assert verify_checkpoint(root, 2)["step"] == expect
    for r in range(2):
        assert torch.equal(load_checkpoint(root, r, 2)["w"], _state(r, expect)["w"])
    _save_both(root, 4)  # the killed save's step again: what it left in step-4 is removed too
    assert sorted(os.listdir(root)) == ["latest.json", "step-4"] and _temporaries(root) == []
    assert sorted(os.listdir(os.path.join(root, "step-4"))) == ["manifest.json", rank_file(0), rank_file(1)]
    assert torch.equal(load_checkpoint(root, 1, 2)["w"], _state(1, 4)["w"])


@pytest.fixture
def small_disk(tmp_path):
    path = tmp_path / "disk"
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the simulated ENOSPC of "
                    "test_runtime_checkpoint_security covers the save")
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_disk_full_during_a_run(small_disk):
    """The disk fills up after the first checkpoints: the job ends naming the error and the
    last complete checkpoint; no temporary file is left; that checkpoint loads."""
    out = os.path.join(small_disk, "run")
    proc = _start(out, checkpoint_every=2)
    try:
        _wait(proc, lambda: (_latest(out) or 0) >= 4, "a checkpoint at step 4")
        with open(os.path.join(small_disk, "filler"), "wb") as fh:
            try:
                while True:
                    fh.write(b"\0" * (1 << 16))
                    fh.flush()
            except OSError:
                pass
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, err
    last = _latest(out)
    assert last is not None and last >= 4
    assert f"a worker failed; the last complete checkpoint (step {last})" in err, err
    assert "No space left on device" in err
    assert _temporaries(out) == []
    os.unlink(os.path.join(small_disk, "filler"))
    for r in range(2):
        assert load_checkpoint(os.path.join(out, "checkpoint"), r, 2)["state"]["global_step"] == last


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _fix_digests(ckpt, name):
    meta = json.load(open(os.path.join(ckpt, "latest.json")))
    step = os.path.join(ckpt, meta["dir"])
    man = json.load(open(os.path.join(step, "manifest.json")))
    data = open(os.path.join(step, name), "rb").read()
    man["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    text = json.dumps(man)
    open(os.path.join(step, "manifest.json"), "w").write(text)
    meta["manifest_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    open(os.path.join(ckpt, "latest.json"), "w").write(json.dumps(meta))


def _damage(case, out, marker):
    ckpt = os.path.join(out, "checkpoint")
    meta = json.load(open(os.path.join(ckpt, "latest.json")))
    step = os.path.join(ckpt, meta["dir"])
    r0, r1 = os.path.join(step, rank_file(0)), os.path.join(step, rank_file(1))
    if case == "truncated":
        data = open(r1, "rb").read()
        open(r1, "wb").write(data[:len(data) // 3])
        return f"{r1} has {len(data) // 3} bytes, the manifest says {len(data)}"
    if case == "bit-flipped":
        data = bytearray(open(r0, "rb").read())
        for i in range(64):
            data[len(data) // 2 + 13 * i] ^= 0x5A
        open(r0, "wb").write(bytes(data))
        return f"{r0} does not match its sha256 in the manifest"
    if case in ("pickle", "pickle-digests-fixed"):
        torch.save({"model": _RunsCode(marker)}, r1)
        if case == "pickle-digests-fixed":
            _fix_digests(ckpt, rank_file(1))
            return f"{r1}: not a safetensors file"
        return f"{r1} has "
    if case == "traversal":
        elsewhere = os.path.join(os.path.dirname(out), "elsewhere")
        shutil.copytree(step, elsewhere)
        torch.save({"model": _RunsCode(marker)}, os.path.join(elsewhere, rank_file(0)))
        meta["dir"] = "../../elsewhere"
        open(os.path.join(ckpt, "latest.json"), "w").write(json.dumps(meta))
        return "names '../../elsewhere'; only step-<N> or final-<N>"
    if case == "symlink":
        elsewhere = os.path.join(os.path.dirname(out), "elsewhere")
        shutil.move(step, elsewhere)
        os.symlink(elsewhere, step)
        return f"{step} is not a real directory"
    if case == "manifest-missing":
        os.unlink(os.path.join(step, "manifest.json"))
        return "manifest.json is missing"
    if case == "pointer-truncated":
        text = open(os.path.join(ckpt, "latest.json")).read()
        open(os.path.join(ckpt, "latest.json"), "w").write(text[:20])
        return "latest.json is not valid JSON"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["truncated", "bit-flipped", "pickle", "pickle-digests-fixed", "traversal",
                                  "symlink", "manifest-missing", "pointer-truncated"])
def test_damaged_checkpoint_is_refused_in_one_line(stopped, tmp_path, capsys, case):
    out, marker = str(tmp_path / "run"), tmp_path / "code-ran"
    shutil.copytree(stopped[1], out, symlinks=True)
    expected = _damage(case, out, marker)
    before = _snapshot(out)
    assert main(["train", *_argv({**LONG, "workers": 2, "out_dir": out, "resume": True})]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trainops train: error: --resume: ") and err.count("\n") == 1, err
    assert expected in err, err
    assert not marker.exists()  # no code from the checkpoint ran
    assert _snapshot(out) == before  # nothing deleted or rewritten


def test_rerun_into_a_previous_run_is_refused_unless_overwrite(stopped, tmp_path, capsys):
    out = str(tmp_path / "run")
    shutil.copytree(stopped[1], out, symlinks=True)
    before = _snapshot(out)
    assert main(["train", *_argv({**TINY, "workers": 2, "out_dir": out})]) == 2
    err = capsys.readouterr().err
    assert err == (f"trainops train: error: out_dir {out} holds a previous run (metrics.jsonl, checkpoint/); "
                   "continue it with --resume, or pass --overwrite to delete it and start over\n")
    assert _snapshot(out) == before
    # --overwrite deletes the previous run's checkpoint and metrics before starting over
    _check_previous_run(config_from_dict({**TINY, "out_dir": out, "overwrite": True}), may_delete=True)
    assert not any(os.path.exists(os.path.join(out, n)) for n in ("checkpoint", "metrics.jsonl"))


def test_lock_names_the_holder(tmp_path, capsys):
    out = str(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({os.path.join(out, '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, f'{os.getpid()}\\n'.encode())\n"
        "print('locked', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["train", *_argv({**TINY, "workers": 2, "out_dir": out})]) == 2
        err = capsys.readouterr().err
        assert err == (f"trainops train: error: out_dir {out} is in use by another trainops train (pid {holder.pid}); "
                       "wait for it to end or choose another --out-dir\n")
    finally:
        holder.kill()
        holder.wait()
    assert sorted(os.listdir(out)) == [".lock"]  # nothing written by the refused run


def test_worker_failure_messages(tmp_path, capsys):
    """What a person reads after a failure: the checkpoint's real state, one line per worker;
    a config or checkpoint error raised inside a worker is its one line only."""
    from trainops.runtime.cli import _worker_failed
    out = str(tmp_path)
    cfg = config_from_dict({**TINY, "out_dir": out})
    tb = ("worker 1 (pid 41) was killed by signal SIGKILL\nworker 0 (pid 40) failed:\nTraceback (most recent call "
          "last):\n  File \"loop.py\", line 1, in run_worker\nRuntimeError: Connection closed by peer\nGLHF!\n")
    assert _worker_failed(cfg, RuntimeError(tb)) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (f"trainops train: a worker failed; no checkpoint was saved in {out}/checkpoint, so there is "
                      "nothing to resume (rerun with --overwrite).")
    assert err[1:3] == ["  worker 1 (pid 41) was killed by signal SIGKILL",
                        "  worker 0 (pid 40) failed: RuntimeError: Connection closed by peer"]
    assert open(os.path.join(out, "worker_errors.log")).read() == tb + "\n"
    root = os.path.join(out, "checkpoint")
    _save_both(root, 2)
    assert _worker_failed(cfg, RuntimeError(tb)) == 1
    assert capsys.readouterr().err.startswith(
        f"trainops train: a worker failed; the last complete checkpoint (step 2) in {root} can be resumed with --resume.")
    with open(os.path.join(root, "step-2", rank_file(1)), "r+b") as fh:
        fh.seek(200)
        fh.write(b"\xff" * 64)
    assert _worker_failed(cfg, RuntimeError(tb)) == 1
    assert capsys.readouterr().err.startswith(
        "trainops train: a worker failed; there is no usable checkpoint to resume from: "
        f"{root}/step-2/rank1.safetensors does not match its sha256 in the manifest (damaged).")
    inner = tb + ("worker 1 failed:\nTraceback (most recent call last):\ntrainops.runtime.checkpoint.CheckpointError: "
                  "--resume: x/rank1.safetensors is missing\n")
    assert _worker_failed(cfg, RuntimeError(inner)) == 2
    assert capsys.readouterr().err == "trainops train: error: --resume: x/rank1.safetensors is missing\n"
