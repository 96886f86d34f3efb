"""CUDA kernels of the fused replay ops against the CPU kernels (same Philox stream), and the
no-host-sync property of ReplayBuffer.sample on CUDA. Run on the GPU machine (`gpu` marker)."""
import pytest
import torch

import trainops
from trainops.ops import replay as rops
from trainops.replay import ReplayBuffer
from tolerances import rounding_tolerance

pytestmark = pytest.mark.gpu


def _state(cap, size, gen):
    storage = [torch.randn(cap, 256, generator=gen), torch.randint(0, 50000, (cap, 37), generator=gen,
                                                                   dtype=torch.int32),
               torch.randint(0, 37, (cap,), generator=gen, dtype=torch.int32), torch.randn(cap, 3, generator=gen).half()]
    prio = torch.zeros(cap)
    prio[:size] = torch.rand(size, generator=gen)
    return storage, prio


def _to(xs, dev):
    return [x.to(dev) for x in xs]


def _prioritized(cap, size, prio, dev):
    weights = torch.zeros(cap, device=dev)
    bs = torch.zeros(2, rops.num_blocks(cap), dtype=torch.float64, device=dev)
    bs[1] = float("inf")
    winner = torch.full((cap,), -1, dtype=torch.int32, device=dev)
    gens = torch.arange(cap, device=dev)
    p = torch.zeros(cap, device=dev)
    rops.replay_update_priorities(p, weights, bs, winner, gens, torch.arange(size, device=dev),
                                  prio[:size].to(dev), alpha=0.6, size=size)
    return weights, bs


@pytest.mark.parametrize("mode", ["uniform", "weights", "recency", "table"])
@pytest.mark.parametrize("replacement", [True, False])
@pytest.mark.parametrize("cap,size,batch", [(1000, 1000, 257), (5000, 3001, 1024), (1 << 20, 1 << 20, 4096)])
def test_sample_cuda_matches_cpu(mode, replacement, cap, size, batch):
    gen = torch.Generator().manual_seed(size)
    storage, prio = _state(cap, size, gen)
    slot_key = torch.randint(0, 9, (cap,), generator=gen)
    table = torch.rand(9, generator=gen, dtype=torch.float64)
    fresh = [s[:5].clone() for s in storage]
    res = {}
    for dev in ("cpu", "cuda"):
        weights, bs = _prioritized(cap, size, prio, dev)
        res[dev] = rops.replay_sample(_to(storage, dev), batch, size=size, fresh=_to(fresh, dev), weight_mode=mode,
                                      weights=weights, block_stats=bs, slot_key=slot_key.to(dev),
                                      table=table.to(dev), lengths=storage[2].to(dev),
                                      ragged=[False, True, False, False], now=7, beta=0.4,
                                      replacement=replacement, seed=99, offset=3)
    (o_c, i_c, w_c, r_c), (o_g, i_g, w_g, r_g) = res["cpu"], res["cuda"]
    assert torch.equal(i_c, i_g.cpu())
    # Importance weights (N·P(i))^-β / (N·P_min)^-β are computed in double (csrc/common/replay_common.h)
    # with CUDA's and the C library's pow (a few double ulps apart) and the block-sum total, then
    # rounded once to float: at most one float ulp apart (2 allowed); indices and rows are exact.
    torch.testing.assert_close(w_c, w_g.cpu(), rtol=rounding_tolerance(torch.float32, 2), atol=0)
    assert torch.equal(r_c, r_g.cpu())
    for a, b in zip(o_c, o_g):
        assert torch.equal(a, b.cpu())


@pytest.mark.parametrize("eviction", ["fifo", "reservoir"])
def test_insert_cuda_matches_cpu(eviction):
    cap = 3000
    gen = torch.Generator().manual_seed(0)
    bufs = {}
    for dev in ("cpu", "cuda"):
        bufs[dev] = ([torch.zeros(cap, 7, device=dev), torch.zeros(cap, dtype=torch.int64, device=dev)],
                     [torch.full((cap,), -1, dtype=torch.long, device=dev), torch.zeros(cap, dtype=torch.long,
                                                                                        device=dev),
                      torch.zeros(cap, dtype=torch.float64, device=dev)])
    size = cursor = 0
    for step, n in enumerate([100, 2500, 1000, 7000, 3]):
        batch = [torch.randn(n, 7, generator=gen), torch.arange(cursor, cursor + n)]
        slots = {dev: rops.replay_insert(st, _to(batch, dev), *state, eviction=eviction, size=size, cursor=cursor,
                                         step=step, seed=4) for dev, (st, state) in bufs.items()}
        assert torch.equal(slots["cpu"], slots["cuda"].cpu())
        for a, b in zip(bufs["cpu"][0] + bufs["cpu"][1], bufs["cuda"][0] + bufs["cuda"][1]):
            assert torch.equal(a, b.cpu())
        cursor += n
        size = min(cap, size + n)


def test_update_cuda_matches_cpu():
    cap, size = 10000, 9000
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(-5, cap, (20000,), generator=gen)  # many duplicates
    vals = torch.rand(20000, generator=gen)
    gens = torch.arange(cap)
    expected = gens[idx.clamp(0)].clone()
    expected[::7] += 1
    out = {}
    for dev in ("cpu", "cuda"):
        prio, w = torch.zeros(cap, device=dev), torch.zeros(cap, device=dev)
        bs = torch.zeros(2, rops.num_blocks(cap), dtype=torch.float64, device=dev)
        bs[1] = float("inf")
        winner = torch.full((cap,), -1, dtype=torch.int32, device=dev)
        applied = rops.replay_update_priorities(prio, w, bs, winner, gens.to(dev), idx.to(dev), vals.to(dev),
                                                expected.to(dev), alpha=0.6, size=size)
        out[dev] = [applied, prio, w, bs, winner]
    for a, b in zip(out["cpu"], out["cuda"]):
        assert torch.equal(a, b.cpu())


@pytest.mark.parametrize("sampler", ["uniform", "prioritized", "recency", "power_law"])
def test_buffer_sample_has_no_host_sync(sampler):
    spec = {"obs": ((256,), torch.float32), "task": ((), torch.int64)}
    buf = ReplayBuffer(1 << 16, spec, device="cuda", sampler=sampler, max_tasks=16)
    n = 1 << 16
    buf.add({"obs": torch.randn(n, 256, device="cuda"), "task": torch.randint(0, 16, (n,), device="cuda")})
    fresh = {"obs": torch.randn(64, 256, device="cuda"), "task": torch.zeros(64, dtype=torch.int64, device="cuda")}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        s = buf.sample(4096, fresh=fresh, replay_ratio=0.75)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(s.is_replay.sum()) == 3072
    assert torch.equal(s.batch["obs"][1024:], buf.storage["obs"][s.indices[1024:]])
