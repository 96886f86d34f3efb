"""trainops train under torchrun: each process is one worker (gloo on CPU), rank 0 writes the report."""
import json
import os
import subprocess
import sys

from test_runtime_e2e import TINY, _argv

RUN = {**TINY, "tasks": "arith", "pretrain_steps": 2, "task_steps": 2, "checkpoint_every": 0, "timeout_s": 60}


def test_torchrun_two_processes(tmp_path):
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "trainops.train", *_argv({**RUN, "out_dir": out, "workers": 1})]  # --workers is ignored
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trainops train: done") == 1  # rank 0 only
    report = open(os.path.join(out, "report.md")).read()
    assert "workers 2," in report and "| task0:arith |" in report
    meta = json.load(open(os.path.join(out, "checkpoint", "latest.json")))
    assert meta["final"] and meta["world_size"] == 2
    assert sorted(os.listdir(os.path.join(out, "checkpoint", meta["dir"]))) == ["manifest.json", "rank0.safetensors",
                                                                                 "rank1.safetensors"]
    rows = [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["phase"] for r in rows if r.get("event") == "eval"] == ["pretrain", "task0:arith"]
