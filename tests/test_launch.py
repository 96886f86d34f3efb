"""trainops.distributed.launch.spawn: results (tensors too) come back by rank; failures are reported."""
import pytest
import torch
import torch.distributed as dist

from trainops.distributed.launch import spawn


def _sum_ranks(rank, world):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return {"rank": rank, "sum": t, "big": torch.full((1000,), float(rank))}


def _fail_on_rank_one(rank, world):
    if rank == 1:
        raise ValueError("boom on rank 1")
    return rank


def test_spawn_returns_tensors_by_rank():
    out = spawn(_sum_ranks, 2)
    assert [o["rank"] for o in out] == [0, 1]
    assert all(o["sum"].item() == 1.0 for o in out)
    assert torch.equal(out[1]["big"], torch.ones(1000))


def test_spawn_reports_worker_failure():
    with pytest.raises(RuntimeError, match="(?s)worker 1 failed.*boom on rank 1"):
        spawn(_fail_on_rank_one, 2, timeout_s=20)


def test_spawn_rejects_bad_world_size():
    with pytest.raises(ValueError, match="world_size"):
        spawn(_sum_ranks, 0)
