"""RLEP for trl.GRPOTrainer (trainops.integrations.trl): replayed successes join each prompt's
group, advantages over G + M match a plain-PyTorch reference, the pool survives checkpoint and
resume, and with RLEP off the trainer is GRPOTrainer. A tiny Llama and a character-level
tokenizer built offline; CPU."""
from __future__ import annotations

import os

import pytest
import torch
from datasets import Dataset
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import GRPOConfig, GRPOTrainer

from trainops.integrations._trl_advantages import group_advantages
from trainops.integrations.trl import REPLAY_FILE, RLEPConfig, RLEPGRPOTrainer, prompt_group_id
from trainops.replay import ReplayBuffer

G, M, L = 4, 2, 4
PROMPTS = {"1+2=": "3", "2+2=": "4"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Layers this small run several times faster on one thread (no OpenMP hand-offs on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate("0123456789+=")}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                      bos_token_id=None)
    return LlamaForCausalLM(cfg)


def dataset():
    return Dataset.from_dict({"prompt": list(PROMPTS), "answer": list(PROMPTS.values())})


class ParityReward:
    """Verified reward: 1 when the answer's first digit has the parity of the true sum. Records
    what it returned, in call order."""

    __name__ = "parity"

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, completions, answer, **kwargs):
        r = [float(c[:1].isdigit() and int(c[0]) % 2 == int(a) % 2) for c, a in zip(completions, answer)]
        self.calls.append(torch.tensor(r))
        return r


def args(cls, out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=G * len(PROMPTS), num_generations=G,
                max_completion_length=L, max_steps=3, learning_rate=1e-2, logging_steps=1, report_to="none",
                save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    if cls is RLEPConfig:
        base.update(replay_per_group=M)
    base.update(kw)
    return cls(**base)


class Recording(RLEPGRPOTrainer):
    """Keeps each generation's batch (before TRL shuffles it), layout and pool size before it."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.generations = []

    def _generate_and_score_completions(self, inputs):
        before = len(self.replay_buffer)
        out = super()._generate_and_score_completions(inputs)
        self.generations.append((before, out, self.last_replay_step))
        return out


def make(cls, out, reward=None, config=RLEPConfig, model=None, **kw):
    return cls(model=model or tiny_model(), reward_funcs=reward or ParityReward(), args=args(config, out, **kw),
               train_dataset=dataset(), processing_class=tokenizer())


def stored(buf: ReplayBuffer, lo: int, hi: int) -> dict:
    rows = buf[lo:hi]
    return {**rows, "groups": buf.state_dict(stored_only=True)["groups"][lo:hi]}


def test_replayed_successes_join_their_groups_and_only_successes_are_stored(tmp_path):
    reward = ParityReward()
    trainer = make(Recording, tmp_path, reward, max_steps=4)
    trainer.train()
    buf, replayed_total = trainer.replay_buffer, 0
    pad = trainer.processing_class.pad_token_id
    after = [g[0] for g in trainer.generations[1:]] + [len(buf)]
    for step, ((before, out, layout), fresh_r) in enumerate(zip(trainer.generations, reward.calls)):
        n = fresh_r.numel()
        B = n // G
        rows = layout.group_ids.numel()
        assert out["completion_ids"].shape[0] == rows == n + int(layout.is_replay.sum())
        replayed_total += int(layout.is_replay.sum())
        if step == 0:
            assert not layout.is_replay.any()  # nothing stored yet
        # the rollouts stored after the draw: this generation's fresh successes, in order
        fresh = ~layout.is_replay
        f_ids, f_mask = out["completion_ids"][fresh], out["completion_mask"][fresh]
        success = (fresh_r >= 1.0) & (f_mask.sum(1) > 0)
        new = stored(buf, before, before + layout.stored)
        assert layout.stored == int(success.sum()) and after[step] == before + layout.stored
        assert (new["rewards"][:, 0] >= 1.0).all()
        assert torch.equal(new["groups"], layout.group_ids[fresh][success])
        for k, i in enumerate(success.nonzero().view(-1).tolist()):
            ln = int(f_mask[i].sum())
            assert int(new["length"][k]) == ln and torch.equal(new["completion_ids"][k, :ln].long(), f_ids[i, :ln])
        # each group: G fresh rows, then <= M replayed rows of its own prompt taken from the pool
        at = 0
        for b in range(B):
            slots = layout.replay_slots[b][layout.replay_slots[b] >= 0]
            size = G + slots.numel()
            assert slots.numel() <= M and not layout.is_replay[at:at + G].any()
            assert layout.is_replay[at + G:at + size].all()
            assert (layout.group_ids[at:at + size] == layout.group_ids[at]).all()
            pool = stored(buf, 0, len(buf))
            assert (pool["groups"][slots] == layout.group_ids[at]).all() and (slots < before).all()
            for j, s in enumerate(slots.tolist()):
                r, ln = at + G + j, int(pool["length"][s])
                assert torch.equal(out["prompt_ids"][r], out["prompt_ids"][at])
                assert torch.equal(out["completion_ids"][r, :ln], pool["completion_ids"][s, :ln].long())
                assert int(out["completion_mask"][r].sum()) == ln and (out["completion_ids"][r, ln:] == pad).all()
            # advantages over the G fresh + replayed items: plain-PyTorch reference
            x = torch.cat([fresh_r[b * G:(b + 1) * G], pool["rewards"][slots, 0]])
            ref = (x - x.mean()) / (x.std() + 1e-4)
            torch.testing.assert_close(out["advantages"][at:at + size], ref, rtol=1e-5, atol=1e-5)
            at += size
        assert at == rows
        assert int(out["num_items_in_batch"]) == int(out["completion_mask"].sum())
    assert replayed_total > 0
    assert any(layout.replay_slots.ge(0).sum(1).eq(M).any() for _, _, layout in trainer.generations[1:])
    logs = [h for h in trainer.state.log_history if "rlep/replayed_fraction" in h]
    assert len(logs) == 4 and logs[-1]["rlep/buffer_size"] == len(buf)


def test_store_all_keeps_every_scored_rollout_and_off_has_no_replay(tmp_path):
    reward = ParityReward()
    trainer = make(Recording, tmp_path, reward, max_steps=2, replay_store="all")
    trainer.train()
    (_, out0, layout0), (before1, _, _) = trainer.generations
    assert layout0.stored == int((out0["completion_mask"].sum(1) > 0).sum()) == before1
    assert (stored(trainer.replay_buffer, 0, before1)["rewards"][:, 0] < 1.0).any()  # failures kept too

    off = make(RLEPGRPOTrainer, tmp_path / "off", max_steps=1, replay_per_group=0)
    assert off.replay_buffer is None
    off.train()
    assert off.last_replay_step is None
    assert not any("rlep/replayed_fraction" in h for h in off.state.log_history)


def test_rlep_off_is_grpo_trainer(tmp_path):
    losses, params = [], []
    for cls, config in ((GRPOTrainer, GRPOConfig), (RLEPGRPOTrainer, RLEPConfig)):
        trainer = make(cls, tmp_path / cls.__name__, config=config, max_steps=1,
                       **({"replay_per_group": 0} if config is RLEPConfig else {}))
        trainer.train()
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
        params.append([p.detach().clone() for p in trainer.model.parameters()])
    assert losses[0] == losses[1] and len(losses[0]) == 1
    assert all(torch.equal(a, b) for a, b in zip(*params))


def test_first_generation_advantages_equal_grpo_trainer(tmp_path):
    """With an empty pool the groups are G fresh items and the advantages are TRL's own."""
    outs = []
    for cls, config in ((GRPOTrainer, GRPOConfig), (RLEPGRPOTrainer, RLEPConfig)):
        trainer = make(cls, tmp_path / cls.__name__, config=config, max_steps=1)
        batch = [x for x in dataset() for _ in range(G)]
        trainer.model.train()
        outs.append(trainer._generate_and_score_completions(batch))
    assert torch.equal(outs[0]["completion_ids"], outs[1]["completion_ids"])
    torch.testing.assert_close(outs[0]["advantages"], outs[1]["advantages"], rtol=0, atol=0)


class RecomputingLogps(Recording):
    """Also recomputes the whole mixed batch's log-probs with the current and reference models."""

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
        mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
        keep = out["completion_ids"].shape[1]
        with torch.no_grad():
            old = self._get_per_token_logps_and_entropies(self.model, ids, mask, keep, batch_size=64)[0]
            ref = self._get_per_token_logps_and_entropies(self.ref_model, ids, mask, keep, batch_size=64)[0]
        self.recomputed.append((old, ref))
        return out


def test_replayed_rows_get_old_and_reference_logps_and_the_batch_splits_evenly(tmp_path):
    """steps_per_generation=2 with one accumulation step: TRL keeps old log-probs (and with
    beta > 0 reference ones); the replayed rows get theirs, and the batch splits in two."""
    tiny_model().save_pretrained(tmp_path / "tiny")  # the reference model (beta > 0) is loaded from a path
    trainer = make(RecomputingLogps, tmp_path, model=str(tmp_path / "tiny"), max_steps=4,
                   per_device_train_batch_size=G, steps_per_generation=2, beta=0.04, seed=2)
    trainer.recomputed, drawn, sample_groups = [], [], trainer.replay_buffer.sample_groups
    trainer.replay_buffer.sample_groups = lambda *a: drawn.append(sample_groups(*a)) or drawn[-1]
    trainer.train()
    assert len(trainer.generations) == 2 and sum(int(g[2].is_replay.sum()) for g in trainer.generations) > 0
    # 8 fresh rows + the drawn replays, less one when odd (with seed 2: 3 drawn, 2 kept)
    assert [int(g[2].is_replay.sum()) for g in trainer.generations[1:]] == [int(d.mask.sum()) // 2 * 2 for d in drawn]
    for (_, out, layout), (old, ref) in zip(trainer.generations, trainer.recomputed):
        assert out["completion_ids"].shape[0] % 2 == 0
        m = out["completion_mask"].bool()
        assert out["old_per_token_logps"].shape == out["ref_per_token_logps"].shape == m.shape
        torch.testing.assert_close(out["old_per_token_logps"][m], old[m], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out["ref_per_token_logps"][m], ref[m], rtol=1e-4, atol=1e-5)


def test_a_peft_model_gets_reference_logps_of_replayed_rows_with_its_adapter_off(tmp_path):
    from peft import LoraConfig, get_peft_model

    class RefFromBase(Recording):
        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
            mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
            with torch.no_grad(), self.model.disable_adapter():
                self.refs.append(self._get_per_token_logps_and_entropies(self.model, ids, mask,
                                                                         out["completion_ids"].shape[1], 64)[0])
            return out

    model = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainer = make(RefFromBase, tmp_path, model=model, max_steps=4, per_device_train_batch_size=G,
                   steps_per_generation=2, beta=0.04, seed=2)
    trainer.refs = []
    trainer.train()
    assert trainer.ref_model is None and any(g[2].is_replay.any() for g in trainer.generations)
    for (_, out, _), ref in zip(trainer.generations, trainer.refs):
        m = out["completion_mask"].bool()
        torch.testing.assert_close(out["ref_per_token_logps"][m], ref[m], rtol=1e-4, atol=1e-5)


def test_conversational_prompts_are_grouped_by_their_messages(tmp_path):
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    data = Dataset.from_dict({"prompt": chats, "answer": list(PROMPTS.values())})
    tok = tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"

    def parity(prompts, completions, answer, **kwargs):
        return ParityReward()(prompts, [c[0]["content"] for c in completions], answer)

    trainer = Recording(model=tiny_model(), reward_funcs=parity, args=args(RLEPConfig, tmp_path, max_steps=3),
                        train_dataset=data, processing_class=tok)
    trainer.train()
    ids = {prompt_group_id(c) for c in chats}
    for _, out, layout in trainer.generations:
        assert set(layout.group_ids.tolist()) == ids
    assert any(layout.is_replay.any() for _, _, layout in trainer.generations)
    assert set(stored(trainer.replay_buffer, 0, len(trainer.replay_buffer))["groups"].tolist()) <= ids


WORKER = """
import sys
import torch
from safetensors.torch import save_file
sys.path.insert(0, sys.argv[2])
import test_trl_rlep as T
from datasets import Dataset

torch.set_num_threads(1)
T.PROMPTS = {"1+2=": "3", "2+2=": "4", "3+4=": "7"}
reward = T.ParityReward()
trainer = T.make(T.Recording, sys.argv[1], reward, max_steps=3, per_device_train_batch_size=6)
trainer.train()
rank = trainer.accelerator.process_index
out = {f"pool.{k}": v.contiguous() for k, v in trainer.replay_buffer.state_dict(stored_only=True).items()
       if isinstance(v, torch.Tensor)}
for t, ((_, batch, layout), fresh) in enumerate(zip(trainer.generations, reward.calls)):
    out.update({f"{t}.group_ids": layout.group_ids, f"{t}.is_replay": layout.is_replay,
                f"{t}.advantages": batch["advantages"], f"{t}.slots": layout.replay_slots, f"{t}.fresh": fresh,
                f"{t}.items": batch["num_items_in_batch"].reshape(1), f"{t}.mask": batch["completion_mask"]})
save_file(out, f"{sys.argv[1]}/rank{rank}.safetensors")
"""


def test_two_processes_share_one_pool_and_the_advantages_of_straddling_groups(tmp_path):
    """2 gloo processes, 3 groups of G=4 over 2 x 6 rows: the middle group straddles the two.
    Both keep the same pool and share the replayed rows evenly; the advantages of every row
    match the reference over its whole group."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(29500 + os.getpid() % 1000), str(script), str(tmp_path), os.path.dirname(__file__)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    pool = {k: v for k, v in r0.items() if k.startswith("pool.")}
    assert pool and all(torch.equal(v, r1[k]) for k, v in pool.items())  # one pool, replicated
    n, replayed = 6, 0
    for t in range(3):
        slots = r0[f"{t}.slots"]
        assert torch.equal(slots, r1[f"{t}.slots"])
        fresh = torch.cat([r0[f"{t}.fresh"], r1[f"{t}.fresh"]])  # the generation batch, rank order
        gids = torch.cat([r[f"{t}.group_ids"][~r[f"{t}.is_replay"]] for r in (r0, r1)])
        for b in range(3):
            s = slots[b][slots[b] >= 0]
            gid = gids[b * G]
            assert (gids[b * G:(b + 1) * G] == gid).all()
            x = torch.cat([fresh[b * G:(b + 1) * G], pool["pool.storage.rewards"][s, 0]])
            ref = (x - x.mean()) / (x.std() + 1e-4)
            got = [r[f"{t}.advantages"][(r[f"{t}.group_ids"] == gid) & ~r[f"{t}.is_replay"]] for r in (r0, r1)]
            torch.testing.assert_close(torch.cat(got), ref[:G], rtol=1e-5, atol=1e-5)
            rep = [r[f"{t}.advantages"][(r[f"{t}.group_ids"] == gid) & r[f"{t}.is_replay"]] for r in (r0, r1)]
            torch.testing.assert_close(torch.cat(rep), ref[G:], rtol=1e-5, atol=1e-5)
            replayed += s.numel()
        assert r0[f"{t}.is_replay"].sum() == r1[f"{t}.is_replay"].sum()  # the replays shared out evenly
        assert int(r0[f"{t}.items"]) == int(r1[f"{t}.items"]) == int(r0[f"{t}.mask"].sum() + r1[f"{t}.mask"].sum())
    assert replayed > 0


class Resumed(RLEPGRPOTrainer):
    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        self.loaded = {k: v.clone() for k, v in self.replay_buffer.state_dict(stored_only=True).items()
                       if isinstance(v, torch.Tensor)}


def test_pool_survives_checkpoint_and_resume(tmp_path):
    first = make(RLEPGRPOTrainer, tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    first.train()
    saved = first.replay_buffer.state_dict(stored_only=True)
    assert len(first.replay_buffer) > 0
    ckpt = tmp_path / "checkpoint-2"
    assert (ckpt / REPLAY_FILE).is_file() and not list(ckpt.glob("*rlep*.pt")) and not list(ckpt.glob("*.pkl"))
    assert ReplayBuffer.load(str(ckpt / REPLAY_FILE)).state_dict(stored_only=True)["counters"].tolist() \
        == saved["counters"].tolist()

    second = make(Resumed, tmp_path, max_steps=3, save_strategy="no")
    assert len(second.replay_buffer) == 0
    second.train(resume_from_checkpoint=str(ckpt))
    assert second.state.global_step == 3
    assert set(second.loaded) == {k for k, v in saved.items() if isinstance(v, torch.Tensor)}
    for k, v in second.loaded.items():
        assert torch.equal(v, saved[k]), k  # storage (tokens, lengths, rewards), groups, counters, RNG offset
    assert len(second.replay_buffer) >= len(first.replay_buffer)


def test_resume_from_a_checkpoint_without_a_pool_starts_empty(tmp_path, caplog):
    make(GRPOTrainer, tmp_path, config=GRPOConfig, max_steps=1, save_strategy="steps", save_steps=1).train()
    trainer = make(Resumed, tmp_path, max_steps=1)
    with caplog.at_level("WARNING", logger="trainops.integrations.trl"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert trainer.loaded["counters"].tolist() == [0, 0, 0, 0]
    assert REPLAY_FILE in caplog.text


@pytest.mark.parametrize("bad, error, match", [
    ({"replay_per_group": -1}, ValueError, "replay_per_group"),
    ({"replay_per_group": 1.5}, TypeError, "replay_per_group"),
    ({"replay_capacity": 0}, ValueError, "replay_capacity"), ({"replay_store": "failures"}, ValueError, "replay_store"),
    ({"replay_success_threshold": float("nan")}, ValueError, "replay_success_threshold"),
    ({"replay_success_threshold": "1"}, TypeError, "replay_success_threshold"),
    ({"replay_seed": "0"}, TypeError, "replay_seed"),
])
def test_config_rejects_bad_values(tmp_path, bad, error, match):
    with pytest.raises(error, match=match):
        args(RLEPConfig, tmp_path, **bad)


def test_prompt_group_id_is_a_stable_int64():
    import hashlib
    assert prompt_group_id("1+2=") == int.from_bytes(hashlib.blake2b(b"1+2=", digest_size=8).digest(), "little",
                                                     signed=True)
    chat = [{"role": "user", "content": "1+2="}]
    assert prompt_group_id(chat) == prompt_group_id([{"content": "1+2=", "role": "user"}]) != prompt_group_id("1+2=")
    assert len({prompt_group_id(f"{i}+1=") for i in range(1000)}) == 1000
    assert -2**63 <= prompt_group_id("x") < 2**63


def test_group_advantages_match_a_loop_reference_with_absent_rows():
    g = torch.Generator().manual_seed(0)
    r = torch.randint(0, 3, (5, 6, 2), generator=g).float()
    r[0, 4:] = float("nan")  # absent replay slots
    r[2, 5] = float("nan")
    w = torch.tensor([1.0, 0.5])
    adv, _ = group_advantages(r, w, "group")
    for b in range(5):
        present = ~torch.isnan(r[b]).all(-1)
        x = (r[b][present] * w).sum(-1)
        torch.testing.assert_close(adv[b][present], (x - x.mean()) / (x.std() + 1e-4))
        assert (adv[b][~present] == 0).all()
    flat = (r * w).sum(-1)[~torch.isnan(r).all(-1)]
    adv_b, _ = group_advantages(r, w, "batch")
    for b in range(5):
        present = ~torch.isnan(r[b]).all(-1)
        x = (r[b][present] * w).sum(-1)
        torch.testing.assert_close(adv_b[b][present], (x - x.mean()) / (flat.std() + 1e-4))
    adv_n, _ = group_advantages(r, w, "none")
    torch.testing.assert_close(adv_n[1], (r[1] * w).sum(-1) - (r[1] * w).sum(-1).mean())
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(r, w, "median")
    with pytest.raises(ValueError, match="multi_objective_aggregation"):
        group_advantages(r, w, "group", "max")
