"""``trainops train --sync ddp``: DistributedDataParallel in the runtime, 2 gloo workers on CPU.

* :class:`trainops.runtime.sync.DDPSync` (fp32) with gradient accumulation: after every
  optimizer step both workers hold the same weights bit for bit, equal to one process
  training on both workers' micro-batches (the mean of their losses) within fp32 rounding.
* the runtime end to end with the quantized hook (int8) across a phase change (MoRA
  adapters added): workers agree, bytes counted and fewer than fp32's, time stamps.
* resume of a ``--sync ddp`` run continues bit for bit; bad keys fail naming the key.
"""
import copy
import os

import pytest
import torch
import torch.distributed as dist

from trainops.distributed import spawn
from trainops.runtime.checkpoint import load_checkpoint
from trainops.runtime.cli import main
from trainops.runtime.config import ConfigError, config_from_dict
from test_runtime_e2e import _argv, _rows  # noqa: E402  (tests/ is on sys.path)

TINY = {"tasks": "arith", "seq_len": 12, "batch_size": 8, "eval_size": 16, "d_model": 32, "n_layers": 2,
        "n_heads": 2, "num_experts": 4, "top_k": 2, "ffn_size": 32, "pretrain_steps": 3, "grad_accum": 2,
        "task_steps": 3, "replay": "off", "checkpoint_every": 0, "progress": False, "log_every": 0,
        "timeout_s": 60, "sync": "ddp"}


def _batch(cfg, step, micro, rank):
    from trainops.runtime.domains import generator, make_domains
    dom = make_domains(cfg.task_list(), cfg.seq_len)[0]
    return dom.sample(generator(cfg.seed, rank, 0, step, micro), cfg.batch_size)


def _ddp_vs_single_worker(rank, world, steps):
    from trainops.distributed.stats import CommStats
    from trainops.nn import reset_load_balancing
    from trainops.runtime.domains import VOCAB
    from trainops.runtime.loop import _loss
    from trainops.runtime.model import MoETransformer
    from trainops.runtime.sync import DDPSync

    torch.set_num_threads(1)
    # micro-batch LBL scope: the single-process reference computes each worker's aux loss alone
    cfg = config_from_dict({**TINY, "lbl_scope": "micro_batch", "ddp_hook": "fp32"})
    torch.manual_seed(rank)  # different inits: DDP must broadcast rank 0's
    model = MoETransformer(cfg, VOCAB)
    torch.manual_seed(0)
    ref = MoETransformer(cfg, VOCAB)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.0)
    stats = CommStats()
    sync = DDPSync(model, cfg, stats)
    max_diff, identical = 0.0, []
    for step in range(steps):
        for m in range(cfg.grad_accum):
            tokens, mask = _batch(cfg, step, m, rank)
            ctx = sync.no_sync() if m < cfg.grad_accum - 1 else torch.enable_grad()
            with ctx:
                ce, aux = _loss(sync, tokens, mask)
                ((ce + aux) / cfg.grad_accum).backward()
            # the reference: one process, both workers' micro-batches, mean of their losses
            total = 0.0
            for r in range(world):
                t, k = _batch(cfg, step, m, r)
                ce_r, aux_r = _loss(ref, t, k)
                total = total + (ce_r + aux_r) / (cfg.grad_accum * world)
            total.backward()
        sync.after_backward(0.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        reset_load_balancing(model)
        reset_load_balancing(ref)
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        identical.append(all(torch.equal(gathered[0], g) for g in gathered))
        ref_flat = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])
        max_diff = max(max_diff, float((flat - ref_flat).abs().max()))
    n = sum(p.numel() for p in model.parameters())
    return {"identical": identical, "max_diff": max_diff, "bytes": stats.bytes_sent, "numel": n,
            "full_calls": stats.full_precision_calls, "comm_s": sync.comm_s}


def test_ddp_fp32_workers_identical_and_equal_to_one_process():
    steps = 4
    res = spawn(_ddp_vs_single_worker, 2, steps, timeout_s=60)
    for r in res:
        assert r["identical"] == [True] * steps
        assert r["max_diff"] < 1e-5, r["max_diff"]
        # one all-reduce of every gradient per optimizer step (none for the no_sync micro-batch):
        # 2 (W - 1) / W x 4 bytes per element with W = 2, rounded up per bucket
        assert r["full_calls"] >= steps
        assert steps * 4 * r["numel"] <= r["bytes"] <= steps * (4 * r["numel"] + 8 * r["full_calls"])
        assert r["comm_s"] >= 0.0


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp_int8"))
    assert main(["train", *_argv({**TINY, "ddp_hook": "int8", "workers": 2, "out_dir": out})]) == 0
    return out


def test_runtime_ddp_int8_across_phases(int8_run):
    rows = _rows(int8_run)
    steps = [r for r in rows if "event" not in r]
    evals = [r for r in rows if r.get("event") == "eval"]
    assert [r["phase"] for r in evals] == ["pretrain", "task0:arith"]  # MoRA adapters added: DDP rebuilt
    assert len(steps) == 6 and all(r["exchange"] == "ddp:int8" for r in steps)
    sent = [r["bytes_sent"] for r in steps]
    assert all(b > a for a, b in zip(sent, sent[1:]))  # every step exchanges
    assert 0 < sent[-1] < 0.5 * steps[-1]["bytes_fp32_equiv"]  # int8 codes + scales vs fp32
    walls = [r["wall_s"] for r in steps]
    assert all(b > a for a, b in zip(walls, walls[1:]))
    for r in steps:
        assert 0.0 <= r["comm_s"] and 0.0 <= r["flag_s"] and r["comm_s"] + r["flag_s"] <= r["wall_s"]
    ckpts = [load_checkpoint(os.path.join(int8_run, "checkpoint"), r, 2) for r in range(2)]
    for k, v in ckpts[0]["model"].items():  # the quantized average is the same on both workers
        assert torch.equal(v, ckpts[1]["model"][k]), k
    assert ckpts[0]["diloco"]["kind"] == "ddp" and ckpts[0]["diloco"]["hook"]["fmt"] == "int8"


def test_runtime_ddp_resume_is_exact(tmp_path):
    cfg = {**TINY, "ddp_hook": "fp32", "workers": 2}
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert main(["train", *_argv({**cfg, "out_dir": full})]) == 0
    assert main(["train", *_argv({**cfg, "out_dir": part, "stop_after": 4})]) == 130  # stopped
    assert load_checkpoint(os.path.join(part, "checkpoint"), 0, 2)["phase"] == 1  # stopped inside the task phase
    assert main(["train", *_argv({**cfg, "out_dir": part}), "--resume"]) == 0
    a = load_checkpoint(os.path.join(full, "checkpoint"), 0, 2)["model"]
    b = load_checkpoint(os.path.join(part, "checkpoint"), 0, 2)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra, rb = _rows(full), _rows(part)
    assert [r.get("loss") for r in ra] == [r.get("loss") for r in rb]
    assert rb[-2]["wall_s"] > rb[2]["wall_s"]  # the clock continues across the resume


@pytest.mark.parametrize("key,value,needle", [
    ("sync", "allreduce", "sync='allreduce'"),
    ("ddp_hook", "fp7", "ddp_hook='fp7'"),
    ("overlap_steps", 10, "overlap_steps=10"),
    ("overlap_steps", -1, "overlap_steps=-1"),
])
def test_bad_sync_keys_name_the_key(key, value, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        config_from_dict({**TINY, "sync": "diloco", "sync_every": 10, "pretrain_steps": 10, "task_steps": 10,
                          key: value})


def test_ddp_ignores_the_diloco_schedule():
    # DDP syncs every step: sync_every need not divide the phases
    cfg = config_from_dict({**TINY, "sync_every": 7})
    assert cfg.sync == "ddp" and copy.deepcopy(cfg).to_dict()["ddp_hook"] == "fp32"
