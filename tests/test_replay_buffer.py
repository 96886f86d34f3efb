"""trainops.replay.ReplayBuffer: sampler distributions (chi-square), PER weights, blending,
reservoir uniformity, priority updates, checkpoints, RLEP grouped sampling, errors."""
import math

import pytest
import torch

import trainops
from trainops.replay import ReplayBuffer

pytestmark = pytest.mark.skipif(not trainops.has_extension(), reason="trainops._C not built")

Z_1E4 = 3.719  # standard normal quantile at 1 - 1e-4


def chi2_threshold(dof: int) -> float:
    """Upper 1e-4 quantile of chi-square(dof) (Wilson-Hilferty)."""
    a = 2.0 / (9.0 * dof)
    return dof * (1.0 - a + Z_1E4 * math.sqrt(a)) ** 3


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def spec(L=6):
    return {"obs": ((L,), torch.float32), "id": ((), torch.int64), "task": ((), torch.int64)}


def items(start, n, task=0, L=6):
    ids = torch.arange(start, start + n)
    return {"obs": ids[:, None].float().repeat(1, L), "id": ids, "task": torch.full((n,), task, dtype=torch.int64)}


def draw_counts(buf, calls, batch, n_slots, **kw):
    counts = torch.zeros(n_slots)
    for _ in range(calls):
        s = buf.sample(batch, **kw)
        counts += torch.bincount(s.indices, minlength=n_slots).float()
        assert torch.equal(s.batch["id"], buf.storage["id"][s.indices])  # rows gathered from their slots
    return counts


def test_uniform_distribution_and_row_gather():
    buf = ReplayBuffer(97, spec(), sampler="uniform", seed=3)
    buf.add(items(0, 97))
    counts = draw_counts(buf, 60, 500, 97)
    probs = torch.full((97,), 1 / 97)
    assert chi2(counts, probs) < chi2_threshold(96)


def test_prioritized_distribution_and_per_weights():
    cap, alpha, beta = 150, 0.7, 0.5
    buf = ReplayBuffer(cap, spec(), sampler="prioritized", alpha=alpha, beta=beta, seed=5)
    buf.add(items(0, cap))
    prio = torch.linspace(0.05, 4.0, cap)
    buf.update_priorities(torch.arange(cap), prio)
    p = prio.double() ** alpha
    probs = p / p.sum()
    counts = draw_counts(buf, 60, 500, cap)
    assert chi2(counts, probs.float()) < chi2_threshold(cap - 1)
    # a wrong exponent is detected by the same test (the test can fail)
    wrong = prio.double() / prio.double().sum()
    assert chi2(counts, wrong.float()) > chi2_threshold(cap - 1)
    s = buf.sample(64)
    n = cap
    w = (n * probs[s.indices]) ** (-beta)
    w_max = (n * probs.min()) ** (-beta)
    torch.testing.assert_close(s.weights, (w / w_max).float(), rtol=1e-5, atol=0)
    buf.weight_norm = "batch"
    s = buf.sample(64)
    w = (n * probs[s.indices]) ** (-beta)
    torch.testing.assert_close(s.weights, (w / w.max()).float(), rtol=1e-5, atol=0)
    assert float(s.weights.max()) == 1.0


def test_recency_distribution():
    buf = ReplayBuffer(64, spec(), sampler="recency", seed=1)
    for step in range(8):  # 8 insertion steps of 8 items: ages 7..0
        buf.add(items(8 * step, 8))
    counts = draw_counts(buf, 40, 500, 64)
    age = 7 - torch.arange(64) // 8
    probs = 1.0 / (age + 1.0)
    probs = probs / probs.sum()
    assert chi2(counts, probs) < chi2_threshold(63)
    assert float(counts[56:].sum()) > 3 * float(counts[:8].sum())


def test_power_law_task_distribution():
    exponent = 1.5
    buf = ReplayBuffer(120, spec(), sampler="power_law", power_law_exponent=exponent, max_tasks=8, seed=2)
    # task t added at step t, with different item counts per task
    sizes = [10, 40, 20, 30, 20]
    start = 0
    for t, n in enumerate(sizes):
        buf.add(items(start, n, task=t))
        start += n
    now = len(sizes) - 1
    task_p = torch.tensor([(now - t + 1.0) ** -exponent for t in range(len(sizes))], dtype=torch.float64)
    task_p /= task_p.sum()
    counts = torch.zeros(len(sizes))
    slot_counts = torch.zeros(120)
    for _ in range(40):
        s = buf.sample(500)
        counts += torch.bincount(s.batch["task"], minlength=len(sizes)).float()
        slot_counts += torch.bincount(s.indices, minlength=120).float()
    assert chi2(counts, task_p.float()) < chi2_threshold(len(sizes) - 1)
    # uniform within a task: task 1 (40 items)
    within = slot_counts[10:50]
    assert chi2(within, torch.full((40,), 1 / 40)) < chi2_threshold(39)


def test_blend_ratio_exact_and_fresh_first():
    buf = ReplayBuffer(50, spec(), sampler="uniform", seed=0)
    buf.add(items(0, 50))
    fresh = items(1000, 40)
    for ratio, bsz in ((0.25, 32), (0.5, 7), (0.1, 33), (0.0, 10), (1.0, 12)):
        s = buf.sample(bsz, fresh=fresh, replay_ratio=ratio)
        n_rep = int(math.floor(ratio * bsz + 0.5))
        assert int(s.is_replay.sum()) == n_rep
        n_fresh = bsz - n_rep
        assert torch.equal(s.batch["id"][:n_fresh], fresh["id"][:n_fresh])
        assert not bool(s.is_replay[:n_fresh].any()) and bool(s.is_replay[n_fresh:].all())
        assert bool((s.indices[:n_fresh] == -1).all()) and bool((s.indices[n_fresh:] >= 0).all())
        assert bool((s.generations[:n_fresh] == -1).all())
        assert bool((s.weights[:n_fresh] == 1).all())
    s = buf.sample(16, fresh=items(2000, 5))
    assert int(s.is_replay.sum()) == 11


def test_reservoir_is_uniform_over_the_stream():
    cap, stream, trials = 20, 100, 150
    counts = torch.zeros(stream)
    for seed in range(trials):
        buf = ReplayBuffer(cap, spec(), eviction="reservoir", seed=seed)
        for start in range(0, stream, 13):
            buf.add(items(start, min(13, stream - start)))
        ids = buf.storage["id"]
        assert ids.unique().numel() == cap
        counts += torch.bincount(ids, minlength=stream).float()
    assert chi2(counts, torch.full((stream,), 1 / stream)) < chi2_threshold(stream - 1)
    # FIFO, by contrast, keeps exactly the most recent items
    fifo = ReplayBuffer(cap, spec(), eviction="fifo")
    for start in range(0, stream, 13):
        fifo.add(items(start, min(13, stream - start)))
    assert torch.equal(torch.sort(fifo.storage["id"]).values, torch.arange(stream - cap, stream))


def test_stale_and_duplicate_priority_updates():
    buf = ReplayBuffer(8, spec(), sampler="prioritized", seed=0)
    buf.add(items(0, 8))
    s = buf.sample(8)
    buf.add(items(100, 3))  # overwrites slots 0, 1, 2 (FIFO)
    applied = buf.update_priorities(s.indices, torch.full((8,), 5.0), generation=s.generations)
    overwritten = s.indices < 3
    assert torch.equal(applied[overwritten], torch.zeros(int(overwritten.sum()), dtype=torch.bool))
    assert bool((buf.priorities[:3] == 1.0).all())  # new items keep their insertion priority
    idx = torch.tensor([4, 4, 4, 5])
    applied = buf.update_priorities(idx, torch.tensor([1.0, 2.0, 3.0, 0.5]))
    assert applied.tolist() == [False, False, True, True]
    assert float(buf.priorities[4]) == 3.0 and float(buf.priorities[5]) == 0.5
    # fresh rows (-1) are ignored
    assert buf.update_priorities(torch.tensor([-1, 6]), torch.tensor([9.0, 2.0])).tolist() == [False, True]
    assert float(buf.max_priority) == 5.0  # the ignored 9.0 does not count


def test_priorities_near_the_float32_limit_and_max_priority_tracking():
    # alpha = 2: p = 1.5e19 stores 2.25e38 (a float32), p = 1.9e19 would store 3.61e38 (not one);
    # both are past the range that update_priorities accepts without the exact check.
    buf = ReplayBuffer(8, spec(), sampler="prioritized", seed=0, alpha=2.0)
    buf.add(items(0, 8))
    state = buf.state_dict()
    assert buf.update_priorities(torch.tensor([3]), torch.tensor([1.5e19])).tolist() == [True]
    assert float(buf.weights[3]) == pytest.approx(2.25e38, rel=1e-6)
    assert float(buf.max_priority) == pytest.approx(1.5e19) and float(state["max_priority"]) == 1.0  # not aliased
    with pytest.raises(ValueError, match="overflows float32"):
        buf.update_priorities(torch.tensor([4]), torch.tensor([1.9e19]))
    assert float(buf.priorities[4]) == 1.0
    # a priority that requires grad (a loss term) is read, not differentiated
    p = torch.tensor([2.0, 3.0], requires_grad=True)
    assert buf.update_priorities(torch.tensor([5, 6]), p * 1.0).tolist() == [True, True]
    assert buf.priorities[5:7].tolist() == [2.0, 3.0] and float(buf.max_priority) == pytest.approx(1.5e19)


@pytest.mark.parametrize("sampler,eviction", [("prioritized", "reservoir"), ("power_law", "fifo")])
def test_save_load_same_batches(tmp_path, sampler, eviction):
    buf = ReplayBuffer(40, spec(), sampler=sampler, eviction=eviction, seed=9, max_tasks=4)
    for t in range(4):
        buf.add(items(20 * t, 20, task=t), priority=torch.rand(20) + 0.1, group=t % 2)
    buf.sample(10)
    path = tmp_path / "buf.safetensors"
    buf.save(path)
    other = ReplayBuffer.load(path)
    inplace = ReplayBuffer(40, spec(), sampler=sampler, eviction=eviction, seed=9, max_tasks=4)
    inplace.load(path)
    for b in (other, inplace):
        a, c = buf.sample(16), b.sample(16)
        assert torch.equal(a.indices, c.indices) and torch.equal(a.weights, c.weights)
        assert torch.equal(a.batch["obs"], c.batch["obs"])
        g1, g2 = buf.sample_groups([0, 1], per_group=3), b.sample_groups([0, 1], per_group=3)
        assert torch.equal(g1.indices, g2.indices)
        buf.add(items(500, 5, task=1))
        b.add(items(500, 5, task=1))
        assert torch.equal(buf.storage["id"], b.storage["id"])
        for k in ("generations", "priorities", "block_stats", "keys"):
            assert torch.equal(getattr(buf, k), getattr(b, k))
        buf = ReplayBuffer.load(path)  # reset the reference for the second loaded copy


def test_state_dict_round_trip_and_mismatch():
    buf = ReplayBuffer(16, spec(), sampler="recency", seed=4)
    buf.add(items(0, 10))
    state = buf.state_dict()
    other = ReplayBuffer(16, spec(), sampler="recency", seed=4)
    other.load_state_dict(state)
    assert len(other) == 10 and torch.equal(buf.sample(8).indices, other.sample(8).indices)
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(32, spec(), sampler="recency", seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="spec"):
        ReplayBuffer(16, spec(L=5), sampler="recency", seed=4).load_state_dict(state)


def test_rlep_grouped_sampling():
    buf = ReplayBuffer(64, spec(), seed=1)
    # prompt p has p + 1 stored correct answers (prompt 4: none)
    for p in range(4):
        buf.add(items(100 * p, p + 1), group=p)
    buf.add(items(900, 3), group=7)
    gb = buf.sample_groups(torch.tensor([0, 1, 2, 3, 4]), per_group=2)
    assert gb.batch["obs"].shape == (5, 2, 6)
    assert gb.mask.tolist() == [[True, False], [True, True], [True, True], [True, True], [False, False]]
    for g in range(4):
        got = gb.batch["id"][g][gb.mask[g]]
        assert bool(((got >= 100 * g) & (got <= 100 * g + g)).all())  # only the group's own items
        assert got.unique().numel() == got.numel()  # without replacement
    assert bool((gb.indices[~gb.mask] == -1).all()) and bool((gb.batch["obs"][~gb.mask] == 0).all())
    # uniform within a group: prompt 3's four answers, pairs drawn many times
    counts = torch.zeros(4)
    for _ in range(400):
        ids = buf.sample_groups([3], per_group=2).batch["id"][0]
        counts += torch.bincount(ids - 300, minlength=4).float()
    assert chi2(counts, torch.full((4,), 0.25)) < chi2_threshold(3)


def test_ragged_rows_and_without_replacement():
    sp = {"tokens": ((8,), torch.int32), "length": ((), torch.int32)}
    buf = ReplayBuffer(10, sp, ragged={"tokens": "length"}, seed=0)
    tokens = torch.arange(1, 81, dtype=torch.int32).view(10, 8)
    buf.add({"tokens": tokens, "length": torch.arange(10, dtype=torch.int32) % 9})
    s = buf.sample(10, replacement=False)
    assert s.indices.unique().numel() == 10
    for row, slot in zip(s.batch["tokens"], s.indices):
        n = int(slot) % 9
        assert torch.equal(row[:n], tokens[slot, :n]) and bool((row[n:] == 0).all())
    with pytest.raises(ValueError, match="without replacement"):
        buf.sample(11, replacement=False)
    before = buf.state_dict()["storage.length"].clone()
    for bad in (9, -1):  # a length the rows cannot hold: refused (the buffer's state stays loadable)
        with pytest.raises(ValueError, match="lengths in 'length' must be in \\[0, 8\\]"):
            buf.add({"tokens": tokens[:2], "length": torch.tensor([3, bad], dtype=torch.int32)})
    assert torch.equal(buf.storage["length"], before) and buf.cursor == 10


def test_errors():
    with pytest.raises(ValueError, match="sampler"):
        ReplayBuffer(4, spec(), sampler="lifo")
    with pytest.raises(ValueError, match="eviction"):
        ReplayBuffer(4, spec(), eviction="lru")
    with pytest.raises(TypeError, match="spec"):
        ReplayBuffer(4, {"x": torch.float32})
    buf = ReplayBuffer(4, spec(), sampler="prioritized")
    with pytest.raises(ValueError, match="empty"):
        buf.sample(2)
    bad = items(0, 2)
    bad.pop("task")
    with pytest.raises(ValueError, match="missing fields"):
        buf.add(bad)
    bad = items(0, 2)
    bad["obs"] = bad["obs"].double()
    with pytest.raises(TypeError, match="obs"):
        buf.add(bad)
    bad = items(0, 2)
    bad["obs"] = bad["obs"][:, :3]
    with pytest.raises(ValueError, match="obs"):
        buf.add(bad)
    with pytest.raises(ValueError, match="NaN"):
        buf.add(items(0, 2), priority=torch.tensor([1.0, float("nan")]))
    buf.add(items(0, 2))
    with pytest.raises(ValueError, match=">= 0"):
        buf.update_priorities(torch.tensor([0]), torch.tensor([-1.0]))
    with pytest.raises(ValueError, match="capacity"):
        buf.update_priorities(torch.tensor([4]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="is on meta"):
        buf.add(items(0, 2), priority=torch.ones(2, device="meta"))
    with pytest.raises(ValueError, match="replay_ratio"):
        buf.sample(4, replay_ratio=0.5)
    with pytest.raises(ValueError, match="fresh"):
        buf.sample(4, fresh=items(0, 1), replay_ratio=0.25)
    with pytest.raises(ValueError, match="max_tasks"):
        ReplayBuffer(4, spec(), sampler="power_law", max_tasks=2).add(items(0, 2, task=5))


@pytest.mark.parametrize("name", ["alpha", "beta", "priority_eps", "power_law_exponent"])
@pytest.mark.parametrize("value,error", [(float("inf"), ValueError), (float("nan"), ValueError),
                                         (-0.1, ValueError), ("0.5", TypeError), (True, TypeError),
                                         (None, TypeError)])
def test_hostile_exponents_are_refused(name, value, error):
    with pytest.raises(error, match=name):
        ReplayBuffer(4, spec(), sampler="prioritized", **{name: value})
    buf = ReplayBuffer(4, spec(), sampler="prioritized")
    before = getattr(buf, name)
    with pytest.raises(error, match=name):  # e.g. annealing beta by assignment
        setattr(buf, name, value)
    assert getattr(buf, name) == before
    buf.beta = 1  # an int is a number
    assert buf.beta == 1.0 and isinstance(buf.beta, float)


@pytest.mark.parametrize("kw,error,pattern", [
    (dict(max_tasks=0), ValueError, "max_tasks"), (dict(max_tasks=2.5), TypeError, "max_tasks"),
    (dict(max_tasks=2**40), ValueError, "max_tasks"), (dict(task_field=3), TypeError, "task_field"),
    (dict(ragged=["obs"]), TypeError, "ragged"), (dict(seed=1.5), TypeError, "seed"),
])
def test_hostile_constructor_options_are_refused(kw, error, pattern):
    with pytest.raises(error, match=pattern):
        ReplayBuffer(4, spec(), **kw)


@pytest.mark.parametrize("indices,priorities,generation,pattern", [
    ([0], [float("nan")], None, "NaN"),
    ([0], [float("inf")], None, "finite|Inf"),
    ([0], [-1.0], None, ">= 0"),
    ([0], float("inf"), None, "finite|Inf"),
    ([-2], [1.0], None, "-1 .*capacity"),
    ([8], [1.0], None, "capacity"),
    ([0, 1], [1.0], None, "one value per item"),
    ([0, 1], [1.0, 2.0], [0], "one value per item"),
    ([0], [1e30], None, "overflows float32"),  # finite, but 1e30^alpha is not a float32
])
def test_bad_priority_updates_change_nothing(indices, priorities, generation, pattern):
    buf = ReplayBuffer(8, spec(), sampler="prioritized", seed=0, alpha=2.0)
    buf.add(items(0, 8), priority=torch.arange(1, 9).float())
    before = {k: getattr(buf, k).clone() for k in ("priorities", "weights", "block_stats", "max_priority")}
    if isinstance(priorities, list):
        priorities = torch.tensor(priorities)
    gen = None if generation is None else torch.tensor(generation)
    with pytest.raises(ValueError, match=pattern):
        buf.update_priorities(torch.tensor(indices), priorities, generation=gen)
    for k, v in before.items():
        assert torch.equal(getattr(buf, k), v), k
    with pytest.raises(ValueError, match="finite|Inf"):
        buf.add(items(0, 1), priority=float("inf"))
    with pytest.raises(ValueError, match="overflows float32"):
        buf.add(items(0, 1), priority=1e30)
    assert torch.equal(buf.priorities, before["priorities"])
    buf.update_priorities(torch.tensor([0]), torch.tensor([1e15]))  # 1e30 fits a float32: kept, and saved
    buf.load_state_dict(buf.state_dict())                            # states stay loadable
