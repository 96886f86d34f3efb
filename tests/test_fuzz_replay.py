"""Fuzz: replay_update_priorities, replay_sample and replay_insert (wrappers and raw ops, C++
CPU kernels) against trainops.reference.replay. See tests/test_fuzz_common.py for the rules."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import trainops
from trainops.ops import replay as rops
from trainops.reference import replay as ref
from test_fuzz_common import HOSTILE, case_counter, expect_clear_error, fuzz_settings

pytestmark = pytest.mark.skipif(not trainops.has_extension(), reason="trainops._C not built")

CASES, _fuzz_summary = case_counter("replay")
I64_MAX = 2**63 - 1



def _gen(*seeds):
    return torch.Generator().manual_seed(hash(seeds) % (2**31))


@st.composite
def update_case(draw):
    cap = draw(st.integers(1, 100))
    size = draw(st.one_of(st.integers(0, cap), st.sampled_from([-3, -1, cap + 1, cap + 5, 2 * cap + 40])))
    n = draw(st.integers(0, 40))
    g = _gen(cap, size, n)
    # Indices: in range, past size, past capacity (the old heap overflow), negative.
    idx = torch.randint(-5, max(cap, size, 1) + 5, (n,), generator=g)
    vals = torch.rand(n, generator=g) * 4
    if n and draw(st.integers(0, 3)) == 0:
        vals[draw(st.integers(0, n - 1))] = draw(st.sampled_from([float("nan"), float("inf"), -1.0, -0.0, 1e-45]))
    gens = torch.arange(cap, dtype=torch.long) + 100
    expected = None
    if draw(st.booleans()):
        expected = gens[idx.clamp(0, cap - 1)].clone()
        if n:
            expected[draw(st.integers(0, n - 1))] += 1  # a stale entry
    alpha = draw(st.sampled_from([0.6, 1.0, 0.0, float("nan"), float("inf")]))
    eps = draw(st.sampled_from([1e-6, 0.0, -1.0, float("nan")]))
    return cap, size, idx, vals, gens, expected, alpha, eps, draw(st.booleans())


@fuzz_settings(300)
@given(case=update_case())
def test_fuzz_replay_update_priorities(case):
    """Indices in [capacity, size) with size > capacity used to be written past every state
    buffer: size must be in [0, capacity], other out-of-range indices are ignored (not applied)."""
    CASES["replay_update_priorities"] += 1
    cap, size, idx, vals, gens, expected, alpha, eps, raw = case
    live = min(max(size, 0), cap)
    prio = torch.zeros(cap)
    prio[:live] = torch.rand(live, generator=_gen(cap, 1)) * 2
    weights = torch.zeros(cap)
    ok_alpha = alpha == alpha and abs(alpha) != float("inf")
    ok_eps = eps == eps and eps >= 0.0
    # Stored weights consistent with (alpha, eps), as a buffer's are (the reference recomputes all).
    weights[:live] = ref.priority_weight(prio[:live], alpha if ok_alpha else 0.6, eps if ok_eps else 1e-6)
    sums, mins = ref.block_stats(weights)
    bs = torch.stack([sums, mins]).contiguous()
    winner = torch.full((cap,), -1, dtype=torch.int32)
    state = [t.clone() for t in (prio, weights, bs)]
    if raw:
        call = lambda: torch.ops.trainops.replay_update_priorities(  # noqa: E731
            prio, weights, bs, winner, gens, idx, vals, expected, alpha, eps, size)
    else:
        call = lambda: rops.replay_update_priorities(prio, weights, bs, winner, gens, idx, vals,  # noqa: E731
                                                     expected, alpha=alpha, eps=eps, size=size)
    values_ok = bool(((vals >= 0) & (vals <= 3.4028234663852886e38)).all())
    if not (0 <= size <= cap and values_ok and ok_alpha and ok_eps):
        expect_clear_error(call)
        for before, after in zip(state, (prio, weights, bs)):
            assert torch.equal(before, after), "a rejected update changed the buffer"
        return
    applied = call()
    r_prio, r_w, r_applied = ref.update_priorities(state[0], gens, idx, vals, expected, alpha=alpha, eps=eps,
                                                   size=size)
    assert torch.equal(applied, r_applied)
    assert torch.equal(prio, r_prio)
    torch.testing.assert_close(weights, r_w, rtol=1e-7, atol=0)
    r_sums, r_mins = ref.block_stats(weights)
    torch.testing.assert_close(bs[0], r_sums, rtol=1e-12, atol=0)
    assert torch.equal(bs[1], r_mins)
    assert torch.equal(winner, torch.full((cap,), -1, dtype=torch.int32))


@st.composite
def sample_case(draw):
    cap = draw(st.integers(1, 60))
    g = _gen(cap, 2)
    storage = [torch.randn(cap, 3, generator=g), torch.randint(0, 100, (cap, 5), generator=g, dtype=torch.int32)]
    ragged = [False, draw(st.booleans())]
    lengths = torch.randint(-3, 9, (cap,), generator=g, dtype=torch.int32)  # negative and too long too
    size = draw(st.one_of(st.integers(1, cap), st.sampled_from([0, -1, cap + 1])))
    n_replay = draw(st.integers(0, 40))
    weight_mode = draw(st.sampled_from(ref.WEIGHT_MODES))
    w = torch.rand(cap, generator=g) * 2
    w[::5] = 0.0
    w[max(size, 0):] = 0.0  # empty slots weigh 0 in a buffer (maintained block_stats cover them)
    if draw(st.integers(0, 5)) == 0:
        w.zero_()  # all zero: uniform fallback
    sums, mins = ref.block_stats(w)
    slot_key = torch.randint(-2, 7, (cap,), generator=g)  # keys outside the table weigh 0
    table = torch.rand(5, generator=g, dtype=torch.float64)
    if draw(st.integers(0, 4)) == 0:
        table[1] = draw(st.sampled_from(HOSTILE[:3]))
    fresh = None
    if draw(st.booleans()):
        nf = draw(st.integers(0, 3))
        fresh = [torch.randn(nf, 3, generator=g), torch.zeros(nf, 5, dtype=torch.int32)]
    beta = draw(st.sampled_from([0.0, 0.4, 1.0, -0.5, float("nan"), float("inf")]))
    return dict(storage=storage, n_replay=n_replay, size=size, fresh=fresh, weight_mode=weight_mode, weights=w,
                block_stats=torch.stack([sums, mins]).contiguous(), slot_key=slot_key, table=table, lengths=lengths,
                ragged=ragged, now=draw(st.integers(-5, 10)), beta=beta, batch_max=draw(st.booleans()),
                replacement=draw(st.booleans()), seed=draw(st.integers(-(2**63), I64_MAX)),
                offset=draw(st.integers(0, 2**40)))


@fuzz_settings(250)
@given(kw=sample_case())
def test_fuzz_replay_sample(kw):
    CASES["replay_sample"] += 1
    cap = kw["storage"][0].shape[0]
    call = lambda: rops.replay_sample(**kw)  # noqa: E731
    beta = kw["beta"]
    if (not 1 <= kw["size"] <= cap or (not kw["replacement"] and kw["n_replay"] > kw["size"])
            or not (beta >= 0.0 and beta != float("inf"))):
        expect_clear_error(call)
        return
    out, idx, isw, is_replay = call()
    kw_ref = {k: v for k, v in kw.items() if k != "block_stats"}
    r_out, r_idx, r_isw, r_rep = ref.sample(**kw_ref)
    assert torch.equal(idx, r_idx)
    assert torch.equal(is_replay, r_rep)
    torch.testing.assert_close(isw, r_isw, rtol=1e-6, atol=0, equal_nan=True)
    for got, want in zip(out, r_out):
        assert torch.equal(got, want)
    assert idx.numel() == 0 or int(idx.max()) < kw["size"]


@st.composite
def raw_sample_case(draw):
    """The raw op with inconsistent arguments the wrapper would have caught."""
    cap = draw(st.integers(1, 20))
    storage = [torch.randn(cap, 2)]
    rows_ok = draw(st.booleans())
    n_fresh, n_replay = draw(st.integers(-2, 3)), draw(st.integers(-2, 10))
    rows = max(n_fresh + n_replay, 0) + (0 if rows_ok else 1)
    out = [torch.empty(rows, 2)]
    mode = draw(st.sampled_from([0, 1, 2, 3, 4, -1]))
    weights = draw(st.sampled_from([None, torch.ones(cap), torch.ones(cap + 1), torch.ones(cap, dtype=torch.float64)]))
    bs = None if weights is None else torch.zeros(2, rops.num_blocks(cap), dtype=torch.float64)
    slot_key = draw(st.sampled_from([None, torch.zeros(cap, dtype=torch.long), torch.zeros(cap + 2, dtype=torch.long)]))
    table = draw(st.sampled_from([None, torch.ones(3, dtype=torch.float64), torch.ones(3)]))
    return (storage, out, None, [False], weights, bs, slot_key, table, mode, draw(st.integers(-1, cap + 1)), n_fresh,
            n_replay, 0, draw(st.sampled_from([0.0, 0.5, float("nan"), -1.0])), False, draw(st.booleans()), 1, 0)


def _raw_sample_valid(args) -> bool:
    storage, out, _, _, weights, bs, slot_key, table, mode, size, n_fresh, n_replay, _, beta, _, repl, _, _ = args
    cap = storage[0].shape[0]
    if not (1 <= size <= cap and n_fresh >= 0 and n_replay >= 0 and 0 <= mode <= 3 and beta >= 0.0):
        return False
    if (not repl and n_replay > size) or out[0].shape[0] != n_fresh + n_replay:
        return False
    if mode == 1 and (weights is None or weights.dtype != torch.float32 or weights.numel() != cap):
        return False
    if mode in (2, 3) and (slot_key is None or slot_key.numel() != cap):
        return False
    return not (mode == 3 and (table is None or table.dtype != torch.float64))


@fuzz_settings(200)
@given(args=raw_sample_case())
def test_fuzz_raw_replay_sample_op(args):
    CASES["raw replay_sample op"] += 1
    call = lambda: torch.ops.trainops.replay_sample(*args)  # noqa: E731
    if not _raw_sample_valid(args):
        expect_clear_error(call)
        return
    idx = call()[0]
    size, n_fresh = args[9], args[10]
    assert bool((idx[:n_fresh] == -1).all()) and bool(((idx[n_fresh:] >= 0) & (idx[n_fresh:] < size)).all())


@st.composite
def insert_case(draw):
    cap = draw(st.integers(0, 20))
    n = draw(st.integers(0, 30))
    size = draw(st.one_of(st.integers(0, max(cap, 0)), st.sampled_from([-1, cap + 1])))
    cursor = draw(st.one_of(st.integers(max(size, 0), max(size, 0) + 50), st.sampled_from([size - 1, I64_MAX - 3])))
    g = _gen(cap, n, 3)
    storage = [torch.randn(cap, 2, generator=g), torch.zeros(cap, dtype=torch.int32)]
    batch = [torch.randn(n, 2, generator=g), torch.arange(n, dtype=torch.int32)]
    keys = torch.rand(cap, generator=g, dtype=torch.float64)
    return (storage, batch, torch.full((cap,), -1, dtype=torch.long), torch.zeros(cap, dtype=torch.long), keys,
            draw(st.sampled_from([0, 1, 2])), size, cursor, draw(st.integers(0, 9)), draw(st.integers(0, 2**40)))


@fuzz_settings(250)
@given(args=insert_case())
def test_fuzz_raw_replay_insert_op(args):
    """torch.ops.trainops.replay_insert directly (capacity 0 used to divide by zero)."""
    CASES["raw replay_insert op"] += 1
    storage, batch, gens, stamps, keys, mode, size, cursor, step, seed = args
    cap, n = storage[0].shape[0], batch[0].shape[0]
    call = lambda: torch.ops.trainops.replay_insert(storage, batch, gens, stamps, keys, mode, size, cursor,  # noqa
                                                    step, seed)
    if not (mode in (0, 1) and cap >= 1 and 0 <= size <= cap and cursor >= size and cursor + n <= I64_MAX):
        expect_clear_error(call)
        return
    want = ref.insert(storage, batch, gens, stamps, keys, eviction=("fifo", "reservoir")[mode], size=size,
                      cursor=cursor, step=step, seed=seed)
    slots = call()
    assert torch.equal(slots, want[4])
    for got, exp in zip(storage + [gens, stamps, keys], want[0] + list(want[1:4])):
        assert torch.equal(got, exp)
