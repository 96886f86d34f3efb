"""The replay path of a ``trainops rl`` GRPO step reads no device data on the host when the step
keeps fixed shapes and the buffer's counters stay on the device (a GPU's step, forced here on
the CPU): under a dispatch mode that raises on every op whose result the host must read
(``.item()``/``bool()``, ``nonzero``, boolean indexing, ``unique``, ...) and on ``tolist`` /
``numpy`` / copies to the CPU, sample_groups, the group assembly, the advantages, the rows, the
loss with its backward and the masked insert run through; the compacting path (the CPU's)
trips it. On a GPU the same is checked with ``torch.cuda.set_sync_debug_mode("error")``
(tests/test_rlep_gpu.py)."""
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import trainops
from trainops.runtime.grpo import answer_logprobs, group_advantages, grpo_loss
from trainops.runtime.rl_loop import replay_groups, store_rollouts, training_rows

pytestmark = pytest.mark.skipif(not trainops.has_extension(), reason="trainops._C not built")

aten = torch.ops.aten


class HostRead(RuntimeError):
    """An op whose result the host must read (a synchronization on a GPU)."""


# ops whose output size or value the host reads
_READS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.masked_scatter, aten.masked_scatter_,
          aten.unique_consecutive, aten.unique_dim, aten._unique, aten._unique2, aten.unique_dim_consecutive,
          aten.argwhere}
_TENSOR_REPEATS = {aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor}  # sized by the repeats
_INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_, aten._unsafe_index,
             aten._unsafe_index_put}


def _is_bool_tensor(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype in (torch.bool, torch.uint8)


class _NoHostReadOps(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in _READS:
            raise HostRead(f"{func} reads device data on the host")
        if func in _TENSOR_REPEATS:
            raise HostRead(f"{func} with tensor repeats sizes its output from device data")
        if packet in _INDEXING and any(_is_bool_tensor(i) for i in (args[1] or ()) if i is not None):
            raise HostRead(f"{func} with a boolean index sizes its output from device data")
        if packet is aten._to_copy and args[0].device.type != "cpu" and \
                torch.device(kwargs.get("device") or args[0].device).type == "cpu":
            raise HostRead(f"{func}: a copy to the CPU")
        if packet is aten.copy_ and args[0].device.type == "cpu" and args[1].device.type != "cpu":
            raise HostRead(f"{func}: a copy to the CPU")
        return func(*args, **kwargs)


class _NoHostReadMethods(TorchFunctionMode):
    """Tensor methods that hand data to the host without an ATen op on the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__array__):
            raise HostRead(f"Tensor.{func.__name__} reads device data on the host")
        return func(*args, **(kwargs or {}))


class no_host_reads:
    """Raise :class:`HostRead` on anything inside that reads tensor data on the host."""

    def __enter__(self):
        self._modes = (_NoHostReadMethods(), _NoHostReadOps())
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)
        return False


# -- the detector catches what it must -------------------------------------------------------

@pytest.mark.parametrize("read", [
    lambda t: t.sum().item(), lambda t: bool(t.any()), lambda t: int(t[0]), lambda t: float(t.float().mean()),
    lambda t: t[t > 2], lambda t: t.nonzero(), lambda t: torch.where(t > 2), lambda t: t.unique(),
    lambda t: t.masked_select(t > 1), lambda t: t.repeat_interleave(t), lambda t: t.tolist(),
    lambda t: t.numpy(), lambda t: t.clone().index_put_((t > 2,), torch.tensor(0)),
], ids=["item", "bool", "int", "float", "bool_index", "nonzero", "where1", "unique", "masked_select",
        "repeat_interleave", "tolist", "numpy", "bool_index_put"])
def test_the_detector_catches_host_reads(read):
    t = torch.arange(5)
    with pytest.raises(HostRead), no_host_reads():
        read(t)


def test_the_detector_lets_fixed_size_ops_through():
    t = torch.arange(5)
    with no_host_reads():
        torch.where(t > 2, t, 0).cumsum(0)[torch.tensor([0, 3])].argsort(stable=True)
        t.repeat_interleave(2)  # a fixed count: no read
        torch.searchsorted(t, torch.tensor([1, 9])).clamp_max(t.sum())


# -- the replay path of a GRPO step ---------------------------------------------------------------

P, G, M, S, POOL = 4, 3, 2, 8, 6


def _buffer(lazy):
    from trainops.replay import ReplayBuffer
    spec = {"tokens": ((S,), torch.int64), "mask": ((S,), torch.int64), "reward": ((), torch.float32)}
    buf = ReplayBuffer(10, spec, seed=4, sampler="uniform", eviction="fifo")
    buf._lazy = lazy
    return buf


def _fresh_groups(seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, POOL, (P,), generator=gen) + 100
    rollouts = torch.randint(0, 50, (P * G, S), generator=gen)
    masks = (torch.arange(S) >= S // 2).long().expand(P * G, S).clone()
    rewards = (torch.rand(P * G, generator=gen) < 0.4).float()
    return ids, rollouts, masks, rewards


def _replay_path(buffer, fixed, seed):
    """The replay path of grpo_step between the rollouts and the step's metrics read."""
    ids, rollouts, masks, rewards = _fresh_groups(seed)
    tokens, group_masks, group_rewards = rollouts.view(P, G, S), masks.view(P, G, S), rewards.view(P, G)
    tokens, group_masks, group_rewards, valid, replayed = replay_groups(buffer, ids, tokens, group_masks,
                                                                        group_rewards, M)
    advantages = group_advantages(group_rewards, valid)
    rows, row_mask, row_adv, row_valid = training_rows(tokens, group_masks, advantages, valid, fixed)
    logits = torch.randn(rows.shape[0], S, 50, generator=torch.Generator().manual_seed(seed)).requires_grad_()
    logp = answer_logprobs(logits, rows, 1.0)
    loss = grpo_loss(logp, logp.detach(), row_mask, row_adv, row_valid, 0.2)
    loss.backward()
    store_rollouts(buffer, rollouts, masks, rewards, ids.repeat_interleave(G), rewards >= 1.0, fixed)
    return torch.stack([loss.detach().double(), replayed.double(), buffer.stored_count().double()]), rewards


def test_the_fixed_shape_replay_path_reads_nothing_on_the_host():
    buf = _buffer(lazy=True)
    expected, replayed_any = 0, False
    for seed in range(6):  # the first step samples an empty buffer, the later ones its successes
        with no_host_reads():
            numbers, rewards = _replay_path(buf, True, seed)
        assert buf._host_behind  # the counters never came to the host
        expected = min(10, expected + int(rewards.sum()))
        loss, replayed, stored = numbers.tolist()  # the step's one read, outside the path
        assert stored == expected and torch.isfinite(torch.tensor(loss))
        assert seed > 0 or replayed == 0  # an empty buffer: all-masked groups
        replayed_any = replayed_any or replayed > 0
    assert replayed_any
    assert len(buf) == expected > 0


def test_the_compacting_replay_path_trips_the_detector():
    buf = _buffer(lazy=False)
    buf.extend({"tokens": torch.zeros(2, S, dtype=torch.int64), "mask": torch.ones(2, S, dtype=torch.int64),
                "reward": torch.ones(2)}, group=torch.tensor([100, 101]))
    with pytest.raises(HostRead, match="boolean index"), no_host_reads():
        _replay_path(buf, False, 0)
    # each of its reads alone: the compacted rows, and the insert's any() / compaction
    ids, rollouts, masks, rewards = _fresh_groups(1)
    valid = torch.rand(P, G + M) < 0.5
    with pytest.raises(HostRead), no_host_reads():
        training_rows(torch.zeros(P, G + M, S), torch.zeros(P, G + M, S), torch.zeros(P, G + M), valid, False)
    with pytest.raises(HostRead), no_host_reads():
        store_rollouts(buf, rollouts, masks, rewards, ids.repeat_interleave(G), rewards >= 1.0, False)
    # a masked insert that compacts (counters on the host) reads too; the size of a lazy buffer as well
    with pytest.raises(HostRead), no_host_reads():
        store_rollouts(buf, rollouts, masks, rewards, ids.repeat_interleave(G), rewards >= 1.0, True)
    lazy = _buffer(lazy=True)
    lazy.extend({"tokens": rollouts, "mask": masks, "reward": rewards}, mask=rewards >= 0)
    with pytest.raises(HostRead), no_host_reads():
        len(lazy)
