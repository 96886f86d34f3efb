"""ReplayBuffer for TorchRL users: TensorDict and nested-dict rows, a spec taken from the first
rows, extend / single-item add, len, indexing, iteration, update_priority; checkpoints of
such buffers; stored-only files (a file grows with the stored rows, not with the capacity)."""
import os
import subprocess
import sys

import pytest
import torch
from tensordict import TensorDict

import trainops
from trainops.replay import ReplayBuffer

pytestmark = pytest.mark.skipif(not trainops.has_extension(), reason="trainops._C not built")


def td_batch(start, n):
    x = torch.arange(start, start + n)
    return TensorDict({"obs": x[:, None].float().repeat(1, 3), "action": x % 4,
                       "next": {"obs": -x[:, None].float().repeat(1, 3), "reward": x.float() / 10}}, [n])


def test_importing_trainops_does_not_import_tensordict():
    code = "import sys, trainops, trainops.replay; sys.exit('tensordict' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_tensordicts_in_tensordicts_out():
    buf = ReplayBuffer(16, None, sampler="prioritized", seed=1)  # spec from the first rows
    slots = buf.extend(td_batch(0, 5))
    assert slots.tolist() == [0, 1, 2, 3, 4]
    assert buf.spec == {"obs": ((3,), torch.float32), "action": ((), torch.int64),
                        "next.obs": ((3,), torch.float32), "next.reward": ((), torch.float32)}
    slot = buf.add(td_batch(5, 1)[0])  # one item: batch size []
    assert slot.dim() == 0 and int(slot) == 5 and len(buf) == 6
    item = buf[2]
    assert isinstance(item, TensorDict) and item.batch_size == torch.Size([])
    assert torch.equal(item["next", "obs"], -torch.full((3,), 2.0)) and int(item["action"]) == 2
    assert float(buf[-1]["next", "reward"]) == pytest.approx(0.5)
    rows = buf[torch.tensor([4, 0])]
    assert rows.batch_size == torch.Size([2]) and rows["action"].tolist() == [0, 0]
    assert buf[1:3]["obs"][:, 0].tolist() == [1.0, 2.0] and buf[[3]]["action"].tolist() == [3]
    assert [int(x["action"]) for x in buf] == [0, 1, 2, 3, 0, 1]  # iteration: slot order
    s = buf.sample(8)
    assert isinstance(s.batch, TensorDict) and s.batch.batch_size == torch.Size([8])
    assert torch.equal(s.batch["next", "obs"][:, 0], -s.indices.float())  # rows of their slots
    buf.update_priority(s.indices, 2.0)  # TorchRL's name
    buf.update_priority(0, 3.0)
    assert float(buf.priorities[0]) == 3.0


def test_plain_nested_dicts_and_tuple_keys():
    spec = {"obs": ((2,), torch.float32), ("next", "obs"): ((2,), torch.float32)}
    buf = ReplayBuffer(4, spec)
    buf.add({"obs": torch.ones(2), "next": {"obs": torch.zeros(2)}})  # one item, nested dict
    buf.extend([{"obs": torch.full((2,), 2.0), ("next", "obs"): torch.ones(2)}] * 2)  # a list of items
    assert len(buf) == 3
    item = buf[0]
    assert isinstance(item, dict) and set(item) == {"obs", ("next", "obs")}
    assert buf.sample(5).batch[("next", "obs")].shape == (5, 2)
    assert torch.equal(buf[torch.tensor([1, 2])][("next", "obs")], torch.ones(2, 2))


def test_checkpoints_keep_tensordict_rows_and_nested_keys(tmp_path):
    buf = ReplayBuffer(16, None, sampler="prioritized", eviction="reservoir", seed=2)
    buf.extend(td_batch(0, 10), priority=torch.linspace(0.1, 1, 10))
    path = tmp_path / "buf.safetensors"
    buf.save(path)
    for loaded in (ReplayBuffer.load(path), ReplayBuffer(16, None, sampler="prioritized", eviction="reservoir",
                                                         seed=2).load(path)):
        assert loaded.spec == buf.spec and len(loaded) == 10 and isinstance(loaded[0], TensorDict)
        a, b = buf.sample(6), loaded.sample(6)
        assert torch.equal(a.indices, b.indices) and torch.equal(a.weights, b.weights)
        assert (a.batch == b.batch).all()
        buf = ReplayBuffer.load(path)
    with pytest.raises(ValueError, match="spec"):  # another spec: refused
        ReplayBuffer(16, {"obs": ((3,), torch.float32)}, sampler="prioritized", eviction="reservoir",
                     seed=2).load(path)


def test_saving_writes_only_the_stored_rows(tmp_path):
    cap, row = 1 << 14, 256  # 16 MiB of capacity for the obs field
    buf = ReplayBuffer(cap, {"obs": ((row,), torch.float32), "id": ((), torch.int64)}, sampler="prioritized", seed=0)
    buf.add({"obs": torch.randn(64, row), "id": torch.arange(64)})
    path = tmp_path / "small.safetensors"
    buf.save(path)
    per_slot_bytes = row * 4 + 8 + 8 + 8 + 8 + 4 + 4 + 8  # obs, id, generations, stamps, keys, prio, weight, group
    fixed = 2 * 8 * (cap // 32) + 8 * buf.max_tasks + 4 + 32  # block stats, task clocks, max priority, counters
    assert os.path.getsize(path) < 64 * per_slot_bytes + fixed + 16384  # + header
    assert os.path.getsize(path) < cap * row * 4 / 100
    loaded = ReplayBuffer.load(path)
    assert loaded.capacity == cap and len(loaded) == 64 and loaded.storage["obs"].shape == (cap, row)
    assert torch.equal(loaded.storage["obs"][:64], buf.storage["obs"][:64])
    assert bool((loaded.storage["obs"][64:] == 0).all()) and bool((loaded.generations[64:] == -1).all())
    for k in ("priorities", "weights", "block_stats", "generations", "groups"):
        assert torch.equal(getattr(loaded, k), getattr(buf, k)), k
    loaded.add({"obs": torch.ones(3, row), "id": torch.arange(3)})  # goes on where it stopped
    assert loaded.storage["id"][64:67].tolist() == [0, 1, 2] and len(loaded) == 67


def test_bad_rows_are_refused():
    buf = ReplayBuffer(8, None)
    with pytest.raises(ValueError, match="no spec yet"):
        buf.add({"x": torch.zeros(3)})  # one item or three? a dict does not say
    assert buf.spec is None
    with pytest.raises(ValueError, match="takes a batch"):
        buf.extend(td_batch(0, 2)[0])
    with pytest.raises(ValueError, match="at most one batch dimension"):
        buf.extend(TensorDict({"x": torch.zeros(2, 2)}, [2, 2]))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        buf.extend({"x": [1, 2]})
    with pytest.raises(ValueError, match="without '.'"):
        buf.extend({"a.b": torch.zeros(2)})
    assert buf.spec is None  # nothing refused left a spec behind
    buf.extend(td_batch(0, 3))
    with pytest.raises(ValueError, match="missing fields"):
        buf.extend(TensorDict({"obs": torch.zeros(2, 3)}, [2]))
    with pytest.raises(TypeError, match="dtype"):
        bad = td_batch(0, 2)
        bad["action"] = bad["action"].float()
        buf.extend(bad)
    for index, error in ((3, IndexError), (-4, IndexError), (torch.tensor([0, 3]), IndexError),
                         (torch.tensor([0.0]), TypeError), ("0", TypeError)):
        with pytest.raises(error):
            buf[index]
    with pytest.raises(ValueError, match="sampler 'power_law' needs the task field"):
        ReplayBuffer(8, None, sampler="power_law").extend(td_batch(0, 2))
