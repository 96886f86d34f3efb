"""``trainops rl``: GRPO pieces against plain-PyTorch references, the RLEP switch, and the
command end to end on 2 CPU workers (report, plots, checkpoint, exact resume)."""
import json
import os
import shutil

import pytest
import torch

from test_runtime_e2e import _argv
from test_runtime_resume_exact import _differences
from trainops.runtime.checkpoint import load_checkpoint
from trainops.runtime.cli import main
from trainops.runtime.config import ConfigError, config_from_dict
from trainops.runtime.domains import VOCAB, generator, make_domains
from trainops.runtime.grpo import answer_logprobs, exact_match_rewards, group_advantages, grpo_loss, sample_rollouts
from trainops.runtime.loop import greedy_answers
from trainops.runtime.model import MoETransformer
from trainops.runtime.rl_config import RLConfig
from trainops.runtime.rl_loop import grpo_step, rlep_buffer

TINY_RL = {"tasks": "arith", "seq_len": 8, "batch_size": 4, "eval_size": 16, "d_model": 32, "n_layers": 1,
           "n_heads": 2, "num_experts": 2, "top_k": 1, "ffn_size": 32, "pretrain_steps": 2, "grad_accum": 1,
           "task_steps": 6, "sync_every": 2, "rollouts": 4, "replay_per_group": 2, "rl_pool": 6, "eval_every": 2,
           "replay_capacity": 64, "checkpoint_every": 2, "progress": False, "timeout_s": 60,
           "rlep_store": "all"}  # an untrained policy rarely succeeds: store every rollout so groups replay
TIMES = ("tokens_per_s", "phase_seconds", "wall_s", "comm_s", "flag_s", "replay_s")


def _cfg(**kw) -> RLConfig:
    return config_from_dict({**TINY_RL, "out_dir": "unused", **kw}, cls=RLConfig)


# -- the pieces against references ------------------------------------------------------------

def _advantages_reference(rewards, valid, eps=1e-4):
    out = torch.zeros_like(rewards)
    for p in range(rewards.shape[0]):
        r = [float(rewards[p, k]) for k in range(rewards.shape[1]) if valid[p, k]]
        mean = sum(r) / len(r)
        std = (sum((x - mean) ** 2 for x in r) / len(r)) ** 0.5
        for k in range(rewards.shape[1]):
            if valid[p, k]:
                out[p, k] = (float(rewards[p, k]) - mean) / (std + eps)
    return out


@pytest.mark.parametrize("shape", [(1, 1), (3, 4), (5, 10), (7, 3)])
def test_group_advantages_match_a_loop_over_each_group(shape):
    g = torch.Generator().manual_seed(shape[0] * 31 + shape[1])
    rewards = torch.randint(0, 2, shape, generator=g).float()
    rewards[0] += torch.rand(shape[1], generator=g)  # non-binary rewards too
    valid = torch.rand(shape, generator=g) < 0.7
    valid[:, 0] = True
    torch.testing.assert_close(group_advantages(rewards, valid), _advantages_reference(rewards, valid))
    same = torch.ones(shape)  # a group that agrees has no signal
    assert torch.equal(group_advantages(same, torch.ones(shape, dtype=torch.bool)), torch.zeros(shape))


def test_grpo_loss_matches_the_clipped_surrogate_and_its_gradient_is_the_policy_gradient():
    g = torch.Generator().manual_seed(0)
    B, S = 6, 5
    logp = torch.randn(B, S, generator=g, requires_grad=True)
    old = logp.detach() + 0.5 * torch.randn(B, S, generator=g)
    mask = torch.rand(B, S, generator=g) < 0.6
    mask[:, 0] = True
    adv, valid = torch.randn(B, generator=g), torch.tensor([True, True, False, True, True, True])
    ref = 0.0
    for b in range(B):
        if not valid[b]:
            continue
        terms = []
        for t in range(S):
            if mask[b, t]:
                rho = torch.exp(logp[b, t] - old[b, t])
                terms.append(torch.minimum(rho * adv[b], rho.clamp(0.8, 1.2) * adv[b]))
        ref = ref - sum(terms) / len(terms)
    ref = ref / int(valid.sum())
    torch.testing.assert_close(grpo_loss(logp, old, mask, adv, valid, 0.2), ref)
    # one update per batch (old = current): the gradient is -A / (|o| N) per answer token
    logp.grad = None
    grpo_loss(logp, logp.detach(), mask, adv, valid, 0.2).backward()
    expected = -(adv[:, None] * mask / mask.sum(1, keepdim=True)) * valid[:, None] / int(valid.sum())
    torch.testing.assert_close(logp.grad, expected)


def test_answer_logprobs_and_exact_match_rewards():
    logits = torch.randn(2, 4, VOCAB)
    tokens = torch.randint(0, VOCAB, (2, 4))
    got = answer_logprobs(logits, tokens, 0.5)
    for b in range(2):
        for i in range(3):
            torch.testing.assert_close(got[b, i], torch.log_softmax(logits[b, i] / 0.5, -1)[tokens[b, i + 1]])
    targets = torch.tensor([[1, 2, 3, 0], [1, 2, 3, 0], [1, 2, 3, 0]])
    mask = torch.tensor([[0, 1, 1, 0]] * 3)  # logits 1, 2 predict the answer: tokens 2 and 3
    outs = torch.tensor([[1, 2, 3, 0], [1, 2, 4, 0], [9, 5, 3, 0]])  # outside the answer does not count
    assert exact_match_rewards(outs, targets, mask).tolist() == [1.0, 0.0, 1.0]


def test_sample_rollouts_replace_only_answers_and_are_seeded():
    cfg = _cfg(tasks="add", seq_len=12)
    torch.manual_seed(0)
    model = MoETransformer(cfg, VOCAB).eval()
    tokens, mask = make_domains(["add"], 12)[0].sample(generator(1), 16)
    a = sample_rollouts(model, tokens, mask, 1.0, torch.Generator().manual_seed(5))
    b = sample_rollouts(model, tokens, mask, 1.0, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    answer = mask.roll(1, 1).bool()
    assert torch.equal(a[~answer], tokens[~answer])
    # at a tiny temperature sampling is greedy decoding
    cold = sample_rollouts(model, tokens, mask, 1e-6, torch.Generator().manual_seed(6))
    assert torch.equal(cold, greedy_answers(model, tokens, mask))


# -- RLEP in a GRPO step ----------------------------------------------------------------------

class _NoSync:
    def after_backward(self, seconds):
        pass


def _step(cfg, buffer, seed=0):
    torch.manual_seed(0)
    model = MoETransformer(cfg, VOCAB)
    pool = make_domains(cfg.task_list(), cfg.seq_len)[0].sample(generator(9), cfg.rl_pool)
    row, groups = grpo_step(model, model, _NoSync(), cfg, pool, 100, buffer, torch.Generator().manual_seed(seed),
                            torch.device("cpu"))
    return model, pool, row, groups


def test_rlep_on_mixes_stored_successes_into_each_group_and_advantages_span_g_plus_m():
    cfg = _cfg(rlep="on", rlep_store="successes", rl_temperature=3.0)
    buffer = rlep_buffer(cfg, 0, torch.device("cpu"))
    pool = make_domains(["arith"], cfg.seq_len)[0].sample(generator(9), cfg.rl_pool)
    # two stored successes of every prompt but the last, whose group stays short
    n = cfg.rl_pool - 1
    buffer.extend({"tokens": pool[0][:n].repeat(2, 1), "mask": pool[1][:n].repeat(2, 1), "reward": torch.ones(2 * n)},
                  group=(torch.arange(n) + 100).repeat(2))
    before = len(buffer)
    _, _, row, groups = _step(cfg, buffer)
    G, M = cfg.rollouts, cfg.replay_per_group
    ids = groups["ids"] - 100
    assert groups["tokens"].shape[1] == G + M
    expected_valid = (ids != cfg.rl_pool - 1)[:, None].expand(-1, M)
    assert torch.equal(groups["valid"][:, G:], expected_valid)
    assert row["replay_rows"] == int(expected_valid.sum()) > 0
    # the replayed rows are the stored ones of the same prompt, with their reward
    rep = groups["tokens"][:, G:][expected_valid]
    assert torch.equal(rep, pool[0][ids[:, None].expand(-1, M)[expected_valid]])
    assert torch.equal(groups["rewards"][:, G:][expected_valid], torch.ones(int(expected_valid.sum())))
    # advantages over the fresh and replayed items of each group together
    torch.testing.assert_close(groups["advantages"], _advantages_reference(groups["rewards"], groups["valid"]))
    # only this step's verified successes were stored, keyed by their prompt
    assert len(buffer) - before == int(groups["rewards"][:, :G].sum())
    every = buffer.sample_groups(torch.arange(cfg.rl_pool) + 100, 2 + cfg.batch_size * G)
    assert int(every.mask.sum()) == len(buffer)
    assert bool((every.batch["reward"][every.mask] == 1).all())
    # a success of this task is the prompt with its right answer: stored under its own prompt
    target = pool[0][:, None].expand(-1, every.mask.shape[1], -1)
    assert torch.equal(every.batch["tokens"][every.mask], target[every.mask])


def test_rlep_store_all_keeps_failures_with_their_reward():
    cfg = _cfg(rlep="on", rl_temperature=3.0)
    buffer = rlep_buffer(cfg, 0, torch.device("cpu"))
    _, _, row, groups = _step(cfg, buffer)
    assert row["replay_rows"] == 0  # empty before the step: nothing replayed
    assert len(buffer) == cfg.batch_size * cfg.rollouts
    got = buffer.sample_groups(groups["ids"], cfg.rollouts)
    stored = got.batch["reward"][got.mask]
    assert sorted(stored.tolist()) == sorted(groups["rewards"][:, :cfg.rollouts].reshape(-1).tolist())


def test_rlep_off_has_no_buffer_and_no_replayed_rows():
    cfg = _cfg(rlep="off")
    assert rlep_buffer(cfg, 0, torch.device("cpu")) is None
    _, _, row, groups = _step(cfg, None)
    assert row["replay_rows"] == 0 and groups["tokens"].shape[1] == cfg.rollouts and bool(groups["valid"].all())


def test_rl_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="rlep='maybe'"):
        _cfg(rlep="maybe")
    with pytest.raises(ConfigError, match="replay_per_group=0"):
        _cfg(rlep="on", replay_per_group=0)
    with pytest.raises(ConfigError, match="rlep_store"):
        _cfg(rlep_store="failures")
    with pytest.raises(ConfigError, match="replay="):
        _cfg(replay="power_law")
    with pytest.raises(ConfigError, match="clip_eps"):
        _cfg(clip_eps=1.5)
    with pytest.raises(ConfigError, match="unknown key 'rollout'.*trainops rl --help"):
        config_from_dict({**TINY_RL, "rollout": 3}, cls=RLConfig)


# -- the command end to end -------------------------------------------------------------------

def _rows(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as fh:
        return [{k: v for k, v in json.loads(ln).items() if k not in TIMES} for ln in fh]


def _final(out_dir, rank):
    ckpt = load_checkpoint(os.path.join(out_dir, "checkpoint"), rank, 2)
    ckpt["config"] = {k: v for k, v in ckpt["config"].items() if k not in ("out_dir", "resume", "stop_after")}
    ckpt["state"] = {k: v for k, v in ckpt["state"].items() if k not in TIMES}
    return ckpt


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("rl"))
    assert main(["rl", *_argv({**TINY_RL, "workers": 2, "out_dir": out})]) == 0
    return out


def test_rl_run_writes_report_plots_and_a_final_checkpoint(straight):
    report = open(os.path.join(straight, "report.md")).read()
    assert "# trainops rl report" in report and "RLEP **on**" in report
    assert os.path.getsize(os.path.join(straight, "plots", "rl_accuracy.png")) > 1000
    summary = json.load(open(os.path.join(straight, "summary.json")))
    # the curve: after pre-training, every eval_every GRPO steps, at the end
    assert [(p["phase"], p["step"]) for p in summary["curve"]] == [
        ("pretrain", 2), ("task0:arith", 2), ("task0:arith", 4), ("task0:arith", 6)]
    rows = _rows(straight)
    grpo = [r for r in rows if r.get("phase") == "task0:arith" and "event" not in r]
    assert len(grpo) == 6 and all(0 <= r["reward"] <= 1 for r in grpo)
    assert any(r["replay_rows"] > 0 for r in grpo[1:]), "RLEP on replayed nothing"
    finals = [_final(straight, r) for r in range(2)]
    assert finals[0]["state"]["weights_sha1"] == finals[1]["state"]["weights_sha1"]
    assert finals[0]["replay"] is not None


def test_rl_resume_is_exact(straight, tmp_path):
    """Stopped after GRPO step 3 (between two syncs, buffer non-empty), resumed to the end:
    the final checkpoints (model, optimizer, DiLoCo, RLEP buffer, run state) and every
    metrics row equal the uninterrupted run's."""
    out = str(tmp_path / "resumed")
    argv = _argv({**TINY_RL, "workers": 2, "out_dir": out})
    assert main(["rl", *argv, "--stop-after", "5"]) == 130
    assert main(["rl", *argv, "--resume"]) == 0
    for r in range(2):
        diff = _differences(_final(straight, r), _final(out, r))
        assert not diff, diff[:6]
    assert _rows(out) == _rows(straight)
    shutil.rmtree(out)


def test_rl_help_and_unknown_option(capsys):
    assert main(["rl", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--rlep" in text and "--replay-per-group" in text and "--rlep-store" in text
    assert main(["rl", "--rollout", "3"]) == 2
    assert "trainops rl --help" in capsys.readouterr().err


def test_rl_under_ddp_keeps_the_workers_identical(tmp_path):
    out = str(tmp_path / "ddp")
    assert main(["rl", *_argv({**TINY_RL, "workers": 2, "out_dir": out, "sync": "ddp", "task_steps": 3,
                               "eval_every": 3})]) == 0
    finals = [_final(out, r) for r in range(2)]
    assert finals[0]["state"]["weights_sha1"] == finals[1]["state"]["weights_sha1"]
    assert not _differences(finals[0]["model"], finals[1]["model"])  # DDP: equal after every step


# -- fixed shapes (the GPU's step) against compaction (the CPU's) --------------------------------

def _fixed_or_compacting(cfg, fixed, prefill):
    buffer = rlep_buffer(cfg, 0, torch.device("cpu"))
    buffer._lazy = fixed  # counters on the device, as on a GPU
    pool = make_domains(cfg.task_list(), cfg.seq_len)[0].sample(generator(9), cfg.rl_pool)
    if prefill:  # one stored row of every prompt but the last: every group lacks rows
        n = cfg.rl_pool - 1
        buffer.extend({"tokens": pool[0][:n], "mask": pool[1][:n], "reward": torch.ones(n)},
                      group=torch.arange(n) + 100)
    torch.manual_seed(0)
    model = MoETransformer(cfg, VOCAB)
    row, groups = grpo_step(model, model, _NoSync(), cfg, pool, 100, buffer, torch.Generator().manual_seed(3),
                            torch.device("cpu"), fixed_shapes=fixed)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return row, groups, grads, buffer


@pytest.mark.parametrize("prefill", [True, False])
@pytest.mark.parametrize("store", ["all", "successes"])
def test_the_fixed_shape_step_gives_the_compacting_steps_loss_gradients_and_buffer(prefill, store):
    cfg = _cfg(rlep="on", rlep_store=store, rl_temperature=3.0, lbl_coeff=0.1)
    row_c, groups_c, grads_c, buf_c = _fixed_or_compacting(cfg, False, prefill)
    row_f, groups_f, grads_f, buf_f = _fixed_or_compacting(cfg, True, prefill)
    assert buf_f._host_behind  # the masked insert left the counters on the device
    assert row_c["lbl"] != 0.0 and (row_c["replay_rows"] > 0) == prefill
    for key in ("loss", "lbl"):
        assert row_f[key] == pytest.approx(row_c[key], rel=1e-5, abs=1e-7), key
    for key in ("reward", "replay_rows", "tokens", "buffer_size"):
        assert row_f[key] == row_c[key], key
    assert grads_f.keys() == grads_c.keys()
    for name in grads_c:
        torch.testing.assert_close(grads_f[name], grads_c[name], rtol=1e-4, atol=1e-6, msg=name)
    K = groups_c["valid"].shape[1]  # the compacting step skips an empty buffer: K = G there
    assert not bool(groups_f["valid"][:, K:].any())
    for key in ("tokens", "rewards", "valid", "advantages"):
        assert torch.equal(groups_f[key][:, :K], groups_c[key]), key
    for key, value in buf_c.state_dict().items():
        if key == "counters":  # the fixed step samples an empty buffer too: one more draw
            assert value[:3].tolist() == buf_f.state_dict()[key][:3].tolist()
        elif key != "config":
            assert torch.equal(value, buf_f.state_dict()[key]), key
