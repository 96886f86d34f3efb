"""trainops.nn MoRA modules: MoRALinear, add_task, state dicts, apply_mora on a tiny HF model,
statistics, torch.compile, and the continual-learning example at a tiny size."""
import pytest
import torch
from torch import nn

from trainops.nn import (
    MoRALinear,
    add_task,
    apply_mora,
    load_mora_state_dict,
    mora_activation_stats,
    mora_modules,
    mora_state_dict,
    set_mora_stats,
)
from trainops.reference.mora import mora as ref_mora


def layer(seed=0, **kw):
    torch.manual_seed(seed)
    return MoRALinear(nn.Linear(12, 10), **kw)


def randomize(m: MoRALinear, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g))


def test_forward_is_base_plus_reference():
    m = layer(rank=6, top_k=3, temperature=0.1, scaling=2.0)
    randomize(m)
    x = torch.randn(2, 5, 12)
    for training in (True, False):
        m.train(training)
        exp = m.base(x) + ref_mora(x, m.lora_A, m.lora_B, top_k=3, temperature=0.1, threshold=0.2,
                                   training=training, scaling=2.0)
        torch.testing.assert_close(m(x), exp, rtol=1e-5, atol=1e-5)


def test_base_frozen_and_new_task_starts_at_zero_delta():
    m = layer(rank=4)
    assert not m.base.weight.requires_grad and m.lora_A.requires_grad
    x = torch.randn(7, 12)
    torch.testing.assert_close(m(x), m.base(x))  # B = 0: no change at init
    randomize(m)
    m.add_task()
    # New values are zero, but the new keys join the routing (norm and top-k over all ranks).
    with torch.no_grad():
        m.lora_A.zero_()  # keys that score 0 are never picked over positive old scores ...
    m.top_k = 2
    s = torch.nn.functional.normalize(x @ m.frozen_A[:4].t(), dim=-1)
    pos = (s.topk(2, dim=-1).values > 0).all(dim=-1)  # ... for tokens with 2 positive old scores
    exp = m.base(x) + ref_mora(x, m.frozen_A[:4], m.frozen_B[:4].t(), top_k=2, temperature=0.03, threshold=0.2)
    torch.testing.assert_close(m(x)[pos], exp[pos], rtol=1e-5, atol=1e-5)
    assert m.num_frozen == 4 and m.num_ranks == 8 and m.num_tasks == 2


def test_add_task_freezes_old_ranks_bit_identically():
    m = layer(rank=3, top_k=2, capacity=3)
    x = torch.randn(16, 12)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        m(x).pow(2).mean().backward()
        opt.step()
    task0 = (m.lora_A.detach().clone(), m.lora_B.detach().clone())
    m.add_task(rank=5)  # the bank (frozen ranks) is exactly full
    assert m.capacity == 3 and [p.shape for p in m.parameters() if p.requires_grad] == [(5, 12), (10, 5)]
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        m(x).pow(2).mean().backward()
        opt.step()
    assert m.frozen_A.grad is None
    assert torch.equal(m.frozen_A[:3], task0[0]) and torch.equal(m.frozen_B[:3], task0[1].t())
    m.add_task()  # 8 frozen ranks: the bank grows
    assert m.capacity >= 8 and m.num_frozen == 8
    assert torch.equal(m.frozen_A[:3], task0[0]) and m.task_ranks == [3, 5, 3]


def test_state_dict_round_trip_resizes():
    m = layer(rank=3, top_k=2)
    randomize(m)
    m.add_task(4)
    randomize(m, 2)
    sd = m.state_dict()
    assert sd["frozen_A"].shape == (3, 12) and sd["task_ranks"].tolist() == [3, 4]
    fresh = layer(seed=5, rank=3, top_k=2)
    fresh.load_state_dict(sd)
    assert fresh.num_frozen == 3 and fresh.task_ranks == [3, 4]
    x = torch.randn(6, 12)
    torch.testing.assert_close(fresh(x), m(x), rtol=0, atol=0)
    assert "tasks=2" in repr(fresh) and "3 frozen" in repr(fresh)


def test_from_linear_and_bad_arguments():
    base = nn.Linear(4, 3)
    m = MoRALinear.from_linear(base, rank=2)
    assert m.base is base and m.lora_A.shape == (2, 4)
    with pytest.raises(TypeError, match="base"):
        MoRALinear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="top_k"):
        MoRALinear(base, top_k=0)
    with pytest.raises(ValueError, match="temperature"):
        MoRALinear(base, temperature=0.0)
    with pytest.raises(ValueError, match="rank"):
        m.add_task(rank=0)
    with pytest.raises(ValueError, match="x must have shape|A must have shape"):
        m(torch.randn(2, 5))


def test_activation_stats_per_task_and_label():
    m = layer(rank=4, top_k=2)
    randomize(m)
    m.add_task(4)
    with torch.no_grad():
        m.lora_A.copy_(torch.randn(4, 12) * 5)  # task 1's keys dominate the routing
    m.enable_stats()
    m.set_stats_label("data1")
    m(torch.randn(10, 12))
    st = m.activation_stats()["data1"]
    assert st["tokens"] == 10 and int(st["rank_counts"].sum()) == 20
    assert len(st["task_frequency"]) == 2 and abs(sum(st["task_frequency"]) - 1.0) < 1e-9
    m.add_task(2)  # counts taken before a task was added still line up
    assert len(m.activation_stats()["data1"]["task_frequency"]) == 3
    m.eval()
    m.set_stats_label("eval")
    m(torch.randn(10, 12))
    assert int(m.activation_stats()["eval"]["rank_counts"].sum()) <= 20  # pruned ranks do not count
    m.enable_stats(False)
    m(torch.randn(3, 12))
    assert m.activation_stats() == {}


def test_torch_compile_matches_eager():
    m = layer(rank=5, top_k=3, temperature=0.1)
    randomize(m)
    m.add_task(3)
    randomize(m, 3)
    x = torch.randn(9, 12, requires_grad=True)
    eager = m(x)
    eager.sum().backward()
    grads = [x.grad.clone(), m.lora_A.grad.clone(), m.lora_B.grad.clone()]
    for t in (x, m.lora_A, m.lora_B):
        t.grad = None
    compiled = torch.compile(m, fullgraph=True)  # inductor; the custom op stays one graph node
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager)
    for g, t in zip(grads, (x, m.lora_A, m.lora_B)):
        torch.testing.assert_close(t.grad, g)


def test_apply_mora_names_and_regex():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4)))
    apply_mora(model, ["2.0"], rank=2)  # a qualified name matches exactly
    assert isinstance(model[2][0], MoRALinear) and isinstance(model[0], nn.Linear)
    model1 = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4))).eval()
    apply_mora(model1, ["0"], rank=2)  # a bare name matches the last component, as in PEFT
    assert isinstance(model1[0], MoRALinear) and isinstance(model1[2][0], MoRALinear)
    assert not model1[0].training
    model2 = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4)))
    apply_mora(model2, r"2\.\d+", rank=2)
    assert isinstance(model2[2][0], MoRALinear) and isinstance(model2[0], nn.Linear)
    assert not model2[0].weight.requires_grad
    with pytest.raises(ValueError, match="matched no"):
        apply_mora(nn.Sequential(nn.Linear(2, 2)), ["q_proj"])
    with pytest.raises(TypeError, match="target_modules"):
        apply_mora(model2, 3)


def tiny_llama():
    transformers = pytest.importorskip("transformers")  # in the `test` extra
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_hf_llama_apply_train_save_load():
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 7))
    base_logits = model(ids).logits
    apply_mora(model, ["q_proj", "v_proj"], rank=4, top_k=2)
    names = [n for n, _ in mora_modules(model)]
    assert len(names) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in names)
    torch.testing.assert_close(model(ids).logits, base_logits)  # B = 0 at init
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 8
    model.train()
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    add_task(model, rank=3)
    model.eval()
    set_mora_stats(model, True, label=0)
    logits = model(ids).logits
    stats = mora_activation_stats(model)
    assert set(stats) == set(names) and stats[names[0]][0]["tokens"] == 14
    sd = mora_state_dict(model)
    assert all(k.split(".")[-1] in ("frozen_A", "frozen_B", "lora_A", "lora_B", "task_ranks")
               for k in sd if k != "_mora_config")  # and the settings, as JSON
    fresh = apply_mora(tiny_llama(), ["q_proj", "v_proj"], rank=4, top_k=2)
    load_mora_state_dict(fresh, sd)
    torch.testing.assert_close(fresh(ids).logits, logits, rtol=0, atol=0)
    with pytest.raises(KeyError):
        load_mora_state_dict(fresh, {**sd, "nope.lora_A": torch.zeros(1)})


def test_continual_example_tiny():
    from trainops.examples import mora_continual

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread avoids OpenMP spin on a busy machine
    try:
        res = mora_continual.run(num_tasks=3, dim=16, hidden=24, classes=4, rank=4, top_k=4, steps=20,
                                 samples=64, seed=0, verbose=False)
    finally:
        torch.set_num_threads(threads)
    for key in ("mora", "lora"):
        acc = res[key]
        assert len(acc) == 3 and all(len(row) == 3 for row in acc)
        assert all(0.0 <= a <= 1.0 for row in acc for a in row)
    assert res["old_ranks_bit_identical"] is True
