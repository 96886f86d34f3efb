"""``ReplayBuffer.extend(mask=...)`` against ``extend`` of the kept rows (the same state, bit for
bit), the lazy (device-resident) counters forced on the CPU, and ``sample_groups`` over the
whole capacity as a lazy buffer draws it: the same draws as with the host size, stored rows of
the requested group only, without replacement, uniform."""
import pytest
import torch

import trainops
from test_replay_buffer import chi2, chi2_threshold, items, spec
from trainops.replay import ReplayBuffer

pytestmark = pytest.mark.skipif(not trainops.has_extension(), reason="trainops._C not built")


def _buffer(lazy, cap, **kw):
    buf = ReplayBuffer(cap, spec(), seed=3, **kw)
    buf._lazy = lazy
    return buf


def _state(buf):
    return {k: v for k, v in buf.state_dict().items() if k != "config"}


def _assert_same_state(a, b):
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert (len(a), a.cursor, a.step, a.rng_offset) == (len(b), b.cursor, b.step, b.rng_offset)


def _masks(gen, n):
    yield torch.zeros(n, dtype=torch.bool)
    yield torch.ones(n, dtype=torch.bool)
    for p in (0.2, 0.5, 0.9):
        yield torch.rand(n, generator=gen) < p


@pytest.mark.parametrize("cap", [1, 5, 16, 64])
@pytest.mark.parametrize("sampler", ["uniform", "prioritized", "recency"])
@pytest.mark.parametrize("with_priority", [False, True])
def test_lazy_masked_extend_is_extend_of_the_kept_rows(cap, sampler, with_priority):
    gen = torch.Generator().manual_seed(cap)
    masked, compacted = _buffer(True, cap, sampler=sampler), _buffer(False, cap, sampler=sampler)
    start = 0
    for n in (7, 3, 20, 1, 40):  # batches smaller and larger than the buffer: the ring wraps
        for mask in _masks(gen, n):
            rows = items(start, n, task=start % 3)
            start += n
            group = torch.randint(0, 4, (n,), generator=gen)
            prio = torch.rand(n, generator=gen) * 3 if with_priority else None
            slots = masked.extend(rows, priority=prio, group=group, mask=mask)
            assert masked._host_behind  # nothing read on the host
            expected = torch.full((n,), -1, dtype=torch.int64)
            if bool(mask.any()):
                kept = {k: v[mask] for k, v in rows.items()}
                expected[mask] = compacted.extend(kept, priority=None if prio is None else prio[mask],
                                                  group=group[mask])
            assert torch.equal(slots, expected)
            _assert_same_state(masked, compacted)
    # both go on alike: plain inserts after the masked ones, and sampling
    masked.extend(items(900, 3), group=1)
    compacted.extend(items(900, 3), group=1)
    _assert_same_state(masked, compacted)
    assert torch.equal(masked.sample(8).indices, compacted.sample(8).indices)


@pytest.mark.parametrize("kw", [{"eviction": "reservoir"}, {"sampler": "power_law", "max_tasks": 4},
                                {"sampler": "prioritized", "eviction": "reservoir"}])
def test_masked_extend_on_the_cpu_is_extend_of_the_kept_rows_for_every_option(kw):
    gen = torch.Generator().manual_seed(1)
    masked, compacted = _buffer(False, 12, **kw), _buffer(False, 12, **kw)
    start = 0
    for n in (5, 9, 30):
        for mask in _masks(gen, n):
            rows = items(start, n, task=start % 4)
            start += n
            masked.extend(rows, group=start, mask=mask)
            if bool(mask.any()):
                compacted.extend({k: v[mask] for k, v in rows.items()}, group=start)
            _assert_same_state(masked, compacted)


def test_ragged_masked_extend_on_the_cpu():
    sp = {"tokens": ((8,), torch.int32), "length": ((), torch.int32)}
    a, b = (ReplayBuffer(6, sp, ragged={"tokens": "length"}) for _ in range(2))
    rows = {"tokens": torch.arange(80, dtype=torch.int32).view(10, 8),
            "length": torch.arange(10, dtype=torch.int32) % 9}
    mask = torch.arange(10) % 3 != 0
    a.extend(rows, mask=mask)
    b.extend({k: v[mask] for k, v in rows.items()})
    _assert_same_state(a, b)


@pytest.mark.parametrize("kw", [{"eviction": "reservoir"}, {"sampler": "power_law", "max_tasks": 4}])
def test_lazy_masked_extend_refuses_what_it_cannot_do_without_the_host(kw):
    buf = _buffer(True, 8, **kw)
    with pytest.raises(ValueError, match="mask"):
        buf.extend(items(0, 4), mask=torch.ones(4, dtype=torch.bool))
    assert len(buf) == 0
    buf.extend(items(0, 4))  # without a mask: the op, counters on the host
    assert len(buf) == 4 and not buf._host_behind


def test_ragged_lazy_masked_extend_is_refused():
    sp = {"tokens": ((8,), torch.int32), "length": ((), torch.int32)}
    buf = ReplayBuffer(6, sp, ragged={"tokens": "length"})
    buf._lazy = True
    assert not buf.lazy_counters and _buffer(True, 4).lazy_counters and not _buffer(False, 4).lazy_counters
    rows = {"tokens": torch.zeros(2, 8, dtype=torch.int32), "length": torch.ones(2, dtype=torch.int32)}
    with pytest.raises(ValueError, match="mask"):
        buf.extend(rows, mask=torch.ones(2, dtype=torch.bool))
    # its counters stay on the host: sample_groups draws as with the host size
    with pytest.raises(ValueError, match="empty"):
        buf.sample_groups([0], 1)


@pytest.mark.parametrize("lazy", [False, True])
def test_bad_masks_are_refused_and_change_nothing(lazy):
    buf = _buffer(lazy, 8)
    with pytest.raises(TypeError, match="mask"):
        buf.extend(items(0, 3), mask=torch.ones(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="mask"):
        buf.extend(items(0, 3), mask=[True, True, False])
    with pytest.raises(ValueError, match="mask"):
        buf.extend(items(0, 3), mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        buf.extend(items(0, 3), mask=torch.ones(3, 1, dtype=torch.bool))
    assert len(buf) == 0 and buf.step == 0


def test_lazy_counters_are_read_only_when_the_host_needs_them(tmp_path):
    buf = _buffer(True, 10)
    buf.extend(items(0, 4), group=0, mask=torch.tensor([True, False, True, True]))
    assert buf._host_behind and int(buf.stored_count()) == 3
    assert buf._host_behind  # stored_count is a device tensor: no host read
    assert len(buf) == 3 and not buf._host_behind and (buf.cursor, buf.step) == (3, 1)
    buf.extend(items(10, 12), group=1)  # wraps
    assert int(buf.stored_count()) == 10 and buf._host_behind
    path = tmp_path / "b.safetensors"
    buf.save(path)  # catches the counters up
    other = ReplayBuffer.from_file(path)
    assert (len(other), other.cursor, other.step) == (10, 15, 2)
    assert torch.equal(other.storage["id"], buf.storage["id"])
    # a loaded state reaches the device counters before the next device insert
    lazy = _buffer(True, 10)
    lazy.load_state_dict(buf.state_dict())
    lazy.extend(items(50, 2), group=2, mask=torch.tensor([False, True]))
    other.extend(items(51, 1), group=2)
    _assert_same_state(lazy, other)


def test_eager_stored_count_and_empty_mask_are_no_ops():
    buf = _buffer(False, 10)
    assert int(buf.stored_count()) == 0
    assert buf.extend(items(0, 3), mask=torch.zeros(3, dtype=torch.bool)).tolist() == [-1, -1, -1]
    assert buf.spec is not None and len(buf) == 0 and buf.step == 0


# -- sample_groups over the whole capacity -------------------------------------------------------

def _filled(lazy, cap, n, groups=4, seed=3):
    buf = ReplayBuffer(cap, spec(), seed=seed)
    buf._lazy = lazy
    if n:
        buf.extend(items(0, n), group=torch.arange(n) % groups)
    return buf


@pytest.mark.parametrize("cap,n", [(50, 10), (50, 50), (50, 73), (7, 3), (200, 150)])
def test_lazy_group_draws_equal_the_host_size_draws_on_the_cpu(cap, n):
    lazy, eager = _filled(True, cap, n), _filled(False, cap, n)
    for per_group in (1, 3, 100):
        a = lazy.sample_groups(torch.arange(-1, 6), per_group)
        b = eager.sample_groups(torch.arange(-1, 6), per_group)
        for x, y in zip((a.indices, a.mask, a.generations, a.batch["id"]), (b.indices, b.mask, b.generations,
                                                                          b.batch["id"])):
            assert torch.equal(x, y)


def test_lazy_group_draws_of_an_empty_buffer_are_all_masked():
    buf = _filled(True, 8, 0)
    buf.extend(items(0, 2), group=5, mask=torch.zeros(2, dtype=torch.bool))
    got = buf.sample_groups([5, 0, -1], 2)
    assert not bool(got.mask.any()) and bool((got.indices == -1).all()) and bool((got.batch["obs"] == 0).all())
    with pytest.raises(ValueError, match="empty"):
        _filled(False, 8, 0).sample_groups([0], 2)


def test_lazy_group_draws_are_stored_rows_of_the_group_without_replacement():
    top = torch.iinfo(torch.int64).max
    buf = _filled(True, 64, 0)
    gen = torch.Generator().manual_seed(0)
    serial = 0
    for _ in range(30):
        n = 9
        group = torch.randint(0, 6, (n,), generator=gen)
        group[0] = top  # a group id of int64 max: the key of empty slots, which must not join it
        buf.extend(items(serial, n), group=group, mask=torch.rand(n, generator=gen) < 0.6)
        serial += n
        stored = buf.groups[buf.generations >= 0]
        for per_group in (2, 5, 64):
            got = buf.sample_groups(torch.tensor([0, 3, 5, 6, top]), per_group)
            for row, gid in enumerate((0, 3, 5, 6, top)):
                have = int((stored == gid).sum())
                idx = got.indices[row][got.mask[row]]
                assert idx.numel() == min(have, per_group)  # all of a group's rows when it has <= M
                assert idx.unique().numel() == idx.numel()  # without replacement
                assert bool((buf.generations[idx] >= 0).all()) and bool((buf.groups[idx] == gid).all())
                assert torch.equal(got.batch["id"][row][got.mask[row]], buf.storage["id"][idx])


def test_lazy_group_draws_are_uniform_within_a_group():
    buf = _filled(True, 40, 0)
    # group 1: ten rows spread over a wrapped ring among other groups
    for t in range(6):
        group = torch.tensor([1, 2, 1, 3, 2, 1, 0, 0])
        buf.extend(items(8 * t, 8), group=group, mask=torch.tensor([True, True, False, True, True, True, False,
                                                                    True]))
    members = (buf.groups == 1) & (buf.generations >= 0)
    slots = members.nonzero().flatten()
    assert slots.numel() >= 8
    counts = torch.zeros(buf.capacity)
    first = torch.zeros(buf.capacity)
    for _ in range(600):
        got = buf.sample_groups([1], 3)
        assert bool(got.mask.all())
        counts += torch.bincount(got.indices[0], minlength=buf.capacity).float()
        first[got.indices[0, 0]] += 1
    uniform = torch.full((slots.numel(),), 1.0 / slots.numel())
    assert counts[~members].sum() == 0
    assert chi2(counts[slots], uniform) < chi2_threshold(slots.numel() - 1)
    assert chi2(first[slots], uniform) < chi2_threshold(slots.numel() - 1)  # the order is random too
    # the check fails for a biased draw: the first M rows of the group by slot every time
    biased = torch.zeros(buf.capacity)
    biased[slots[:3]] = 600
    assert chi2(biased[slots], uniform) > chi2_threshold(slots.numel() - 1)
