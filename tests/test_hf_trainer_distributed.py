"""The Hugging Face drop-in under ``Trainer`` on 2 processes launched by torchrun (gloo):
a tiny Qwen3-MoE with the global scope, gradient accumulation 2 and activation
checkpointing. Every rank's aux loss of every micro-batch equals the reference built from
both ranks' router logits of the optimizer step so far, and the logged aux loss and load
balance (the same on both ranks) equal the reference too."""
import json
import os
import subprocess
import sys

import pytest

import trainops

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytestmark = pytest.mark.skipif(not trainops.has_extension(), reason="C++ extension not built")

HERE = os.path.dirname(os.path.abspath(__file__))


def test_trainer_under_torchrun(tmp_path):
    from test_hf_trainer import check

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "test_hf_trainer.py"), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=HERE)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = []
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.json") as f:
            ranks.append(json.load(f))
    # Trainer's sampler gives the ranks different rows: the global counts really mix them.
    assert ranks[0]["forwards"][0]["logits"] != ranks[1]["forwards"][0]["logits"]
    check([r["forwards"] for r in ranks], ranks[0]["logs"], ranks[0]["K"])
    keys = ("aux_loss", "expert_load_max_over_mean", "expert_load_cv")
    assert [[log[k] for k in keys] for log in ranks[1]["logs"]] == [[log[k] for k in keys] for log in ranks[0]["logs"]]
