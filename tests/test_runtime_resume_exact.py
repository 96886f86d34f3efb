"""``trainops train --resume`` is exact from every step: resumed runs end bit for bit where
the uninterrupted run ends (final checkpoint of every worker: model, optimizer, DiLoCo,
replay buffer, RNG, run state; and every metrics row).

Two 2-worker configurations, 12 global steps each (pre-training 4 + 2 tasks x 4):

* ``diloco``: one fragment, sync_every 2: odd steps lie between two syncs, where the
  workers' weights differ; even steps are syncs, steps 4, 8, 12 phase ends.
* ``streaming``: 2 fragments, sync_every 4: fragment 0 is synced after steps 2 mod 4,
  fragment 1 after steps 0 mod 4, so at every step at least one fragment is mid-way.

The checkpoints go through the real path (``--stop-after k`` saves to
``out_dir/checkpoint`` and stops, ``--resume`` loads it), driven through
:func:`trainops.runtime.loop.run_worker` in one pair of worker processes (each process
start costs seconds): per configuration one uninterrupted run, then a chain of runs that
stops at k = 1, 2, ..., 12, each resuming the previous stop, and a copy of the chain's
directory at each k resumed to the end (12 resume points per configuration: odd and even
steps, the first and last step of every phase, steps with replayed rows). The chain makes
each checkpoint cost one step instead of k; a wrong resume anywhere in it shows up in the
final comparison of every later k. Overlapping exchanges (overlap_steps > 0, not a runtime
option) are covered by tests/test_diloco.py.
"""
import json
import os
import shutil

import pytest
import torch
import torch.distributed as dist

from test_runtime_e2e import TINY
from trainops.distributed import spawn
from trainops.runtime.checkpoint import load_checkpoint
from trainops.runtime.config import config_from_dict

# measured seconds (rows and run state) differ between any two runs
TIMES = ("tokens_per_s", "phase_seconds", "wall_s", "comm_s", "flag_s")
STEPS = TINY["pretrain_steps"] + 2 * TINY["task_steps"]  # 12
CASES = {
    "diloco": {**TINY, "fragments": 1, "sync_every": 2},
    "streaming": {**TINY, "fragments": 2, "sync_every": 4},
}


def _resume_everywhere(rank, world, cases, root):
    import trainops.runtime.report
    from trainops.runtime.loop import run_worker

    # report.md and its plots are drawn after training from the run's state, which the
    # final checkpoint holds and the test compares: skip seconds of matplotlib per run
    trainops.runtime.report.write_report = lambda *args, **kwargs: None

    for name, cfg in cases.items():
        def run(out, **kw):
            return run_worker(rank, world, config_from_dict({**cfg, "out_dir": os.path.join(root, name, out),
                                                             **kw}).to_dict())

        done = run("straight")
        assert not done["interrupted"] and done["state"]["global_step"] == STEPS
        for k in range(1, STEPS + 1):
            stopped = run("chain", stop_after=k, resume=k > 1)
            assert stopped["interrupted"] and stopped["state"]["global_step"] == k, (name, k)
            if rank == 0:
                shutil.copytree(os.path.join(root, name, "chain"), os.path.join(root, name, f"from{k}"))
            dist.barrier()
            done = run(f"from{k}", resume=True)
            assert not done["interrupted"] and done["state"]["global_step"] == STEPS, (name, k)
    return True


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("resume"))
    spawn(_resume_everywhere, 2, {name: config_from_dict(cfg).to_dict() for name, cfg in CASES.items()}, root,
          timeout_s=300)
    return root


def _final(out_dir, rank):
    root = os.path.join(out_dir, "checkpoint")
    with open(os.path.join(root, "latest.json")) as fh:
        assert json.load(fh)["final"], out_dir
    return load_checkpoint(root, rank, 2)


def _rows(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as fh:
        return [{k: v for k, v in json.loads(ln).items() if k not in TIMES} for ln in fh]


def _bits(t):
    return t.detach().cpu().reshape(-1).contiguous().view(torch.uint8)


def _differences(a, b, path=""):
    """Paths at which two checkpoint objects differ (tensors bit for bit, dtype and shape included)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(_bits(a), _bits(b)))
        return [] if same else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path} keys {sorted(map(str, set(a) ^ set(b)))}"]
        return [d for k in a for d in _differences(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path} length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]


def _comparable(ckpt):
    """A final checkpoint without what legitimately differs: the run's own config entries
    (out_dir, resume, stop_after) and wall-clock times."""
    ckpt = dict(ckpt)
    ckpt["config"] = {k: v for k, v in ckpt["config"].items() if k not in ("out_dir", "resume", "stop_after")}
    ckpt["state"] = {k: v for k, v in ckpt["state"].items() if k not in TIMES}
    return ckpt


@pytest.mark.parametrize("case", sorted(CASES))
def test_resume_from_every_step_is_bit_for_bit(runs, case):
    straight = [_comparable(_final(os.path.join(runs, case, "straight"), r)) for r in range(2)]
    ref_rows = _rows(os.path.join(runs, case, "straight"))
    assert len([r for r in ref_rows if "event" not in r]) == STEPS
    # the two workers end each phase on a full sync: same digests, same model
    assert straight[0]["state"]["weights_sha1"] == straight[1]["state"]["weights_sha1"]
    bad = {}
    for k in range(1, STEPS + 1):
        out = os.path.join(runs, case, f"from{k}")
        for r in range(2):
            diff = _differences(straight[r], _comparable(_final(out, r)))
            if diff:
                bad[(k, r)] = diff[:6]
        if _rows(out) != ref_rows:
            bad[(k, "metrics")] = [i for i, (x, y) in enumerate(zip(_rows(out), ref_rows)) if x != y][:6]
    assert not bad, f"resumes that differ from the uninterrupted run (step, rank): {bad}"
