"""RLEP steps of ``trainops rl`` on CUDA: the replay path of each step (sampling the groups,
assembling them, advantages, rows, loss, the masked insert of the successes) runs under
``torch.cuda.set_sync_debug_mode("error")``, so any host synchronization in it fails the test.
The rest of the step (rollout sampling, the MoE forward) is outside the replay path. Run on the
GPU machine (``gpu`` marker); the CPU twin is tests/test_rlep_no_sync.py."""
import contextlib

import pytest
import torch

from trainops.runtime import rl_loop
from trainops.runtime.config import config_from_dict
from trainops.runtime.domains import VOCAB, generator, make_domains
from trainops.runtime.model import MoETransformer
from trainops.runtime.rl_config import RLConfig

pytestmark = pytest.mark.gpu

CFG = {"tasks": "arith", "seq_len": 8, "batch_size": 4, "eval_size": 16, "d_model": 32, "n_layers": 1,
       "n_heads": 2, "num_experts": 2, "top_k": 1, "ffn_size": 32, "pretrain_steps": 0, "grad_accum": 1,
       "task_steps": 4, "sync_every": 2, "rollouts": 4, "replay_per_group": 2, "rl_pool": 6, "replay_capacity": 16,
       "progress": False, "rlep": "on", "rlep_store": "all", "rl_temperature": 3.0, "out_dir": "unused"}


@contextlib.contextmanager
def _sync_is_an_error():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


class _NoSync:
    def after_backward(self, seconds):
        pass


def test_rlep_steps_on_cuda_add_no_host_synchronization(monkeypatch):
    for name in ("replay_groups", "training_rows", "store_rollouts", "group_advantages", "grpo_loss"):
        inner = getattr(rl_loop, name)

        def guarded(*args, _inner=inner, **kwargs):
            with _sync_is_an_error():
                return _inner(*args, **kwargs)
        monkeypatch.setattr(rl_loop, name, guarded)
    cfg = config_from_dict(CFG, cls=RLConfig)
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = MoETransformer(cfg, VOCAB).to(device)
    buffer = rl_loop.rlep_buffer(cfg, 0, device)
    assert buffer.lazy_counters
    pool = make_domains(cfg.task_list(), cfg.seq_len)[0].sample(generator(9), cfg.rl_pool)
    stored = replayed = 0
    for step in range(4):
        row, groups = rl_loop.grpo_step(model, model, _NoSync(), cfg, pool, 100, buffer,
                                        torch.Generator().manual_seed(step), device)
        model.zero_grad()
        assert buffer._host_behind  # nothing in the step read the counters back
        assert groups["tokens"].shape[1] == cfg.rollouts + cfg.replay_per_group
        stored = min(cfg.replay_capacity, stored + cfg.batch_size * cfg.rollouts)
        assert row["buffer_size"] == stored and (step > 0 or row["replay_rows"] == 0)
        assert torch.isfinite(torch.tensor(row["loss"]))
        replayed += row["replay_rows"]
    assert len(buffer) == stored and replayed > 0
