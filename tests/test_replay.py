"""Fused replay ops (C++ CPU kernels) against trainops.reference.replay, opcheck, errors."""
import numpy as np
import pytest
import torch

import trainops  # noqa: F401
from trainops.ops import replay as rops
from trainops.reference import replay as ref

pytestmark = pytest.mark.skipif(not trainops.has_extension(), reason="trainops._C not built")


def test_philox_known_answers():
    # Known-answer vectors of Philox4x32-10 (Random123 distribution, kat_vectors).
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for ctr, key, want in cases:
        got = tuple(int(x) for x in ref.philox4x32(*ctr, *key))
        assert got == want


def _weights_state(cap, size, gen):
    prio = torch.zeros(cap)
    prio[:size] = torch.rand(size, generator=gen) * 3
    prio[: size: 7] = 0.0  # zero priorities are clamped to eps
    weights = torch.zeros(cap)
    weights[:size] = ref.priority_weight(prio[:size], 0.6, 1e-6)
    sums, mins = ref.block_stats(weights)
    return weights, torch.stack([sums, mins]).contiguous()


def _storage(cap, gen):
    return [torch.randn(cap, 5, generator=gen), torch.randint(0, 1000, (cap, 9), generator=gen, dtype=torch.int32),
            torch.randint(0, 10, (cap,), generator=gen, dtype=torch.int32)]


@pytest.mark.parametrize("mode", ["uniform", "weights", "recency", "table"])
@pytest.mark.parametrize("replacement", [True, False])
@pytest.mark.parametrize("cap,size", [(1, 1), (130, 130), (200, 77)])
def test_sample_matches_reference(mode, replacement, cap, size):
    assert tuple(ref.WEIGHT_MODES) == tuple(rops.WEIGHT_MODES) == ("uniform", "weights", "recency", "table")
    gen = torch.Generator().manual_seed(cap * 31 + size)
    storage = _storage(cap, gen)
    lengths = storage[2]
    weights, block_stats = _weights_state(cap, size, gen)
    slot_key = torch.randint(0, 6, (cap,), generator=gen)
    table = torch.rand(6, generator=gen, dtype=torch.float64)
    table[2] = 0.0
    fresh = [torch.randn(3, 5, generator=gen), torch.zeros(3, 9, dtype=torch.int32), torch.ones(3, dtype=torch.int32)]
    n_replay = min(size, 33) if not replacement else 33
    kw = dict(size=size, weight_mode=mode, weights=weights, block_stats=block_stats, slot_key=slot_key, table=table,
              lengths=lengths, ragged=[False, True, False], now=5, beta=0.7, replacement=replacement, seed=1234,
              offset=9)
    for batch_max in (False, True):
        out, idx, w, rep = rops.replay_sample(storage, n_replay, fresh=fresh, batch_max=batch_max, **kw)
        kw_ref = {k: v for k, v in kw.items() if k != "block_stats"}
        r_out, r_idx, r_w, r_rep = ref.sample(storage, n_replay, fresh=fresh, batch_max=batch_max, **kw_ref)
        assert torch.equal(idx, r_idx)
        torch.testing.assert_close(w, r_w, rtol=1e-6, atol=0)
        assert torch.equal(rep, r_rep)
        for o, r in zip(out, r_out):
            assert torch.equal(o, r)
        if mode == "table":
            assert not bool((slot_key[idx[3:]] == 2).any())  # zero-weight task never drawn
        if not replacement:
            assert idx[3:].unique().numel() == n_replay
        assert bool((w[3:] > 0).all()) and float(w[3:].max()) <= 1.0 + 1e-6


def test_sample_all_zero_weights_fall_back_to_uniform():
    cap = 40
    storage = [torch.arange(cap, dtype=torch.float32).view(cap, 1)]
    weights = torch.zeros(cap)
    bs = torch.zeros(2, rops.num_blocks(cap), dtype=torch.float64)
    bs[1] = float("inf")
    out, idx, w, _ = rops.replay_sample(storage, 16, size=30, weight_mode="weights", weights=weights, block_stats=bs,
                                        beta=0.4)
    assert bool((idx < 30).all()) and torch.equal(w, torch.ones(16))
    _, r_idx, _, _ = ref.sample(storage, 16, size=30, weight_mode="weights", weights=weights, beta=0.4)
    assert torch.equal(idx, r_idx)


@pytest.mark.parametrize("mode", ["weights", "recency", "table"])
def test_sample_of_fresh_rows_only_matches_reference(mode):
    """n_replay = 0 with PER weights normalized over the batch: no draw to normalize by."""
    gen = torch.Generator().manual_seed(8)
    storage = _storage(40, gen)
    weights, block_stats = _weights_state(40, 40, gen)
    fresh = [torch.randn(2, 5, generator=gen), torch.zeros(2, 9, dtype=torch.int32), torch.ones(2, dtype=torch.int32)]
    kw = dict(size=40, fresh=fresh, weight_mode=mode, weights=weights, slot_key=torch.arange(40), table=torch.ones(40,
              dtype=torch.float64), now=50, beta=0.4, batch_max=True, replacement=False)
    out, idx, w, rep = rops.replay_sample(storage, 0, block_stats=block_stats, **kw)
    r_out, r_idx, r_w, r_rep = ref.sample(storage, 0, **kw)
    assert torch.equal(idx, r_idx) and torch.equal(w, r_w) and torch.equal(rep, r_rep)
    assert torch.equal(w, torch.ones(2)) and torch.equal(idx, torch.full((2,), -1))


def test_old_mode_keyword_is_still_accepted():
    """``mode=`` was replay_sample's name for weight_mode (and the reference took its number)."""
    gen = torch.Generator().manual_seed(5)
    storage = _storage(100, gen)
    weights, block_stats = _weights_state(100, 90, gen)
    kw = dict(size=90, weights=weights, beta=0.5, seed=3, offset=2)
    want = rops.replay_sample(storage, 20, weight_mode="weights", block_stats=block_stats, **kw)
    old = rops.replay_sample(storage, 20, mode="weights", block_stats=block_stats, **kw)
    for w, o in zip(want[1:], old[1:]):
        assert torch.equal(w, o)
    for old_mode in (1, "weights"):
        assert torch.equal(ref.sample(storage, 20, mode=old_mode, **kw)[1], want[1])
    assert ref.MODES == rops.MODES == {"uniform": 0, "weights": 1, "recency": 2, "table": 3}
    assert ref.uniform01 is ref.philox_uniform01


@pytest.mark.parametrize("eviction", ["fifo", "reservoir"])
def test_insert_matches_reference(eviction):
    cap = 70
    gen = torch.Generator().manual_seed(3)
    storage = [torch.zeros(cap, 3), torch.zeros(cap, dtype=torch.int64)]
    state = [torch.full((cap,), -1, dtype=torch.long), torch.zeros(cap, dtype=torch.long),
             torch.zeros(cap, dtype=torch.float64)]
    size = cursor = 0
    for step, n in enumerate([5, 60, 1, 90, 200, 3]):  # fills, wraps, batches larger than the buffer
        batch = [torch.randn(n, 3, generator=gen), torch.arange(cursor, cursor + n)]
        r_st, r_gen, r_stamp, r_keys, r_slots = ref.insert(storage, batch, *state, eviction=eviction, size=size,
                                                          cursor=cursor, step=step, seed=11)
        slots = rops.replay_insert(storage, batch, *state, eviction=eviction, size=size, cursor=cursor, step=step,
                                   seed=11)
        assert torch.equal(slots, r_slots)
        for a, b in zip(storage + state, r_st + [r_gen, r_stamp, r_keys]):
            assert torch.equal(a, b)
        stored = slots[slots >= 0]
        assert stored.unique().numel() == stored.numel()  # no slot written twice
        cursor += n
        size = min(cap, size + n)
        assert bool((state[0][:size] >= 0).all())
    # every stored item is the one its generation (stream serial) names
    assert torch.equal(storage[1], state[0])


def test_reservoir_keeps_largest_keys():
    cap, total = 50, 400
    storage = [torch.zeros(cap, dtype=torch.int64)]
    gens, stamps, keys = (torch.full((cap,), -1, dtype=torch.long), torch.zeros(cap, dtype=torch.long),
                          torch.zeros(cap, dtype=torch.float64))
    size = cursor = 0
    for n in [30, 30, 100, 240]:
        rops.replay_insert(storage, [torch.arange(cursor, cursor + n)], gens, stamps, keys, eviction="reservoir",
                           size=size, cursor=cursor, seed=5)
        cursor += n
        size = min(cap, size + n)
    all_keys = ref.reservoir_keys(5, np.arange(total))
    want = torch.sort(torch.topk(all_keys, cap).indices).values
    assert torch.equal(torch.sort(storage[0]).values, want)


def _update_state(cap, size):
    prio = torch.zeros(cap)
    weights = torch.zeros(cap)
    bs = torch.zeros(2, rops.num_blocks(cap), dtype=torch.float64)
    bs[1] = float("inf")
    winner = torch.full((cap,), -1, dtype=torch.int32)
    gens = torch.arange(cap, dtype=torch.long) + 1000
    return prio, weights, bs, winner, gens


def test_update_priorities_matches_reference():
    cap, size = 150, 140
    prio, weights, bs, winner, gens = _update_state(cap, size)
    rops.replay_update_priorities(prio, weights, bs, winner, gens, torch.arange(size), torch.ones(size), alpha=0.6,
                                  size=size)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(-2, cap + 3, (300,), generator=gen)  # out of range and >= size entries are ignored
    idx[20:][idx[20:] == 7] = 8
    idx[10:20] = 7  # duplicates: the last valid one wins
    vals = torch.rand(300, generator=gen) * 5
    expected = gens[idx.clamp(0, cap - 1)].clone()
    expected[12] += 1  # stale entries are ignored
    expected[19] += 1
    applied = rops.replay_update_priorities(prio, weights, bs, winner, gens, idx, vals, expected, alpha=0.6, size=size)
    r_prio, r_w, r_applied = ref.update_priorities(torch.ones(cap).where(torch.arange(cap) < size, torch.zeros(())),
                                                   gens, idx, vals, expected, alpha=0.6, eps=1e-6, size=size)
    assert torch.equal(applied, r_applied)
    assert torch.equal(prio, r_prio)
    torch.testing.assert_close(weights, r_w, rtol=1e-7, atol=0)
    assert float(prio[7]) == float(vals[18]) and bool(applied[18]) and not bool(applied[19])
    assert torch.equal(winner, torch.full((cap,), -1, dtype=torch.int32))
    sums, mins = ref.block_stats(weights)
    torch.testing.assert_close(bs[0], sums, rtol=1e-15, atol=0)
    assert torch.equal(bs[1], mins)


def test_opcheck():
    cap = 20
    gen = torch.Generator().manual_seed(1)
    storage = [torch.randn(cap, 4, generator=gen), torch.randint(0, 9, (cap,), generator=gen, dtype=torch.int32)]
    out = [torch.empty(6, 4), torch.empty(6, dtype=torch.int32)]
    weights, bs = _weights_state(cap, cap, gen)
    torch.library.opcheck(torch.ops.trainops.replay_sample,
                          (storage, out, None, [False, False], weights, bs, None, None, 1, cap, 2, 4, 0, 0.4, False,
                           True, 7, 0))
    gens, stamps, keys = (torch.full((cap,), -1, dtype=torch.long), torch.zeros(cap, dtype=torch.long),
                          torch.zeros(cap, dtype=torch.float64))
    batch = [torch.randn(3, 4), torch.ones(3, dtype=torch.int32)]
    torch.library.opcheck(torch.ops.trainops.replay_insert,
                          ([s.clone() for s in storage], batch, gens, stamps, keys, 1, 0, 0, 0, 3))
    prio, w, bs2, winner, g = _update_state(cap, cap)
    torch.library.opcheck(torch.ops.trainops.replay_update_priorities,
                          (prio, w, bs2, winner, g, torch.tensor([1, 2, 2]), torch.tensor([1.0, 2.0, 3.0]), None, 0.6,
                           1e-6, cap))


def test_errors():
    storage = [torch.zeros(8, 2)]
    with pytest.raises(ValueError, match="empty"):
        rops.replay_sample(storage, 4, size=0)
    with pytest.raises(ValueError, match="without"):
        rops.replay_sample(storage, 9, size=8, replacement=False)
    for bad in ("bogus", 1, None, ["weights"]):
        with pytest.raises(ValueError, match="weight_mode must be one of"):
            rops.replay_sample(storage, 2, size=8, weight_mode=bad)
        with pytest.raises(ValueError, match="weight_mode must be one of"):
            ref.sample(storage, 2, size=8, weight_mode=bad)
    with pytest.raises(TypeError, match="weight_mode= only"):
        rops.replay_sample(storage, 2, size=8, weight_mode="recency", mode="weights")
    with pytest.raises(TypeError, match="weights"):
        rops.replay_sample(storage, 2, size=8, weight_mode="weights", weights=torch.zeros(8, dtype=torch.float64))
    with pytest.raises(TypeError, match="fresh"):
        rops.replay_sample(storage, 2, size=8, fresh=[torch.zeros(2, 2, dtype=torch.int32)])
    gens, stamps = torch.zeros(8, dtype=torch.long), torch.zeros(8, dtype=torch.long)
    keys = torch.zeros(8, dtype=torch.float64)
    for bad in ("lifo", 0, None):
        with pytest.raises(ValueError, match="eviction must be one of"):
            rops.replay_insert(storage, [torch.zeros(1, 2)], gens, stamps, keys, eviction=bad, size=0, cursor=0)
        with pytest.raises(ValueError, match="eviction must be one of"):
            ref.insert(storage, [torch.zeros(1, 2)], gens, stamps, keys, eviction=bad, size=0, cursor=0, step=0,
                       seed=0)
    with pytest.raises(ValueError, match="batch is empty"):
        rops.replay_insert(storage, [torch.zeros(0, 2)], torch.zeros(8, dtype=torch.long),
                           torch.zeros(8, dtype=torch.long), torch.zeros(8, dtype=torch.float64), size=0, cursor=0)
    prio, w, bs, winner, gens = _update_state(8, 8)
    for bad, msg in ((float("nan"), "NaN"), (-1.0, ">= 0")):
        with pytest.raises(ValueError, match=msg):
            rops.replay_update_priorities(prio, w, bs, winner, gens, torch.tensor([0]), torch.tensor([bad]),
                                          alpha=0.6, size=8)


try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    given = None

if given is not None:

    @settings(max_examples=25, deadline=None)
    @given(cap=st.integers(1, 300), frac=st.floats(0.01, 1.0), n_replay=st.integers(1, 80),
           mode=st.sampled_from(ref.WEIGHT_MODES), replacement=st.booleans(), seed=st.integers(0, 2**63 - 1),
           offset=st.integers(0, 2**40), beta=st.sampled_from([0.0, 0.4, 1.0]))
    def test_sample_matches_reference_random(cap, frac, n_replay, mode, replacement, seed, offset, beta):
        size = max(1, int(cap * frac))
        if not replacement:
            n_replay = min(n_replay, size)
        gen = torch.Generator().manual_seed(cap + n_replay)
        storage = [torch.randn(cap, 3, generator=gen).half()]
        weights, block_stats = _weights_state(cap, size, gen)
        slot_key = torch.randint(-1, 5, (cap,), generator=gen)
        table = torch.rand(4, generator=gen, dtype=torch.float64)
        kw = dict(size=size, weights=weights, slot_key=slot_key, table=table, now=3, beta=beta,
                  replacement=replacement, seed=seed, offset=offset)
        out, idx, w, _ = rops.replay_sample(storage, n_replay, weight_mode=mode, block_stats=block_stats, **kw)
        r_out, r_idx, r_w, _ = ref.sample(storage, n_replay, weight_mode=mode, **kw)
        assert torch.equal(idx, r_idx)
        torch.testing.assert_close(w, r_w, rtol=1e-6, atol=0)
        assert torch.equal(out[0], r_out[0])


def test_update_priorities_size_beyond_capacity_raises():
    # size > capacity used to make indices in [capacity, size) valid: the CPU kernel wrote past
    # priorities, weights, winner and block_stats (heap overflow; scripts/asan_check.sh).
    cap = 8
    prio, w, bs, winner, gens = _update_state(cap, cap)
    state = [t.clone() for t in (prio, w, bs, winner)]
    for size in (cap + 8, -1):
        with pytest.raises(ValueError, match="'size' must be in"):
            torch.ops.trainops.replay_update_priorities(prio, w, bs, winner, torch.zeros(cap, dtype=torch.long),
                                                        torch.tensor([cap + 3, 2 * cap]), torch.tensor([1.0, 2.0]),
                                                        None, 0.6, 1e-6, size)
        with pytest.raises(ValueError, match="size must be"):
            rops.replay_update_priorities(prio, w, bs, winner, gens, torch.tensor([cap + 3]), torch.tensor([1.0]),
                                          alpha=0.6, size=size)
    for before, after in zip(state, (prio, w, bs, winner)):
        assert torch.equal(before, after)


def test_insert_and_sample_raw_ops_reject_bad_sizes():
    storage = [torch.zeros(0, 2)]
    empty = torch.zeros(0, dtype=torch.long)
    with pytest.raises(ValueError, match="capacity 0"):  # FIFO slot = cursor % capacity
        torch.ops.trainops.replay_insert(storage, [torch.ones(3, 2)], empty, empty, empty.double(), 0, 0, 0, 0, 0)
    storage = [torch.zeros(4, 2)]
    gens = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="overflows"):
        torch.ops.trainops.replay_insert(storage, [torch.ones(3, 2)], gens, gens.clone(), gens.double(), 0, 0,
                                         2**63 - 2, 0, 0)
    out = [torch.empty(2, 2)]
    for beta in (float("nan"), -1.0):
        with pytest.raises(ValueError, match="beta"):
            torch.ops.trainops.replay_sample(storage, out, None, [False], None, None, None, None, 0, 4, 0, 2, 0, beta,
                                             False, True, 0, 0)
