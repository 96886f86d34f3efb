"""quantized_all_reduce over real gloo process groups (2 and 3 ranks) against the reference.

Each world size is spawned once (module fixture); the worker runs every case and returns
plain arrays, and the tests below assert on them.
"""
import time
import zlib

import numpy as np
import pytest
import torch
import torch.distributed as dist

import trainops.reference as ref
from trainops.distributed import CommStats, quantized_all_reduce, spawn
from trainops.distributed.all_reduce import chunk_layout
from trainops.distributed.stats import ring_all_reduce_bytes

# name, shape, dtype, fmt, block, op
CASES = [
    ("fp4_e3m0_avg_odd", (1001,), torch.float32, "fp4_e3m0", 128, "avg"),
    ("int8_sum_tiny", (77,), torch.float32, "int8", 16, "sum"),
    ("fp4_e2m1_3d_noncontig", (5, 37, 3), torch.float32, "fp4_e2m1", 64, "avg"),
    ("fp8_bf16_sum", (300,), torch.bfloat16, "fp8_e4m3", 32, "sum"),
    ("int4_fp16_avg", (999,), torch.float16, "int4", 256, "avg"),
]
EF_N, EF_ROUNDS = 2049, 3


def _input(rank, name, shape, dtype, round_=0):
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}:{rank}:{round_}".encode()))
    return (torch.randn(shape, generator=g) * (rank + 1)).to(dtype)


def _np(t):
    return t.detach().float().numpy().copy() if t.dtype != torch.float32 else t.detach().numpy().copy()


def _worker(rank, world):
    torch.set_num_threads(1)
    out = {}
    for name, shape, dtype, fmt, bs, op in CASES:
        x = _input(rank, name, shape, dtype)
        y = x.clone()
        if name.endswith("noncontig"):
            y = x.clone().transpose(0, 2)  # reduced in its logical (transposed) element order
            assert not y.is_contiguous()
            x = y.contiguous()
        quantized_all_reduce(y, op, fmt=fmt, block_size=bs, min_numel=0)
        out[name] = (_np(x), _np(y.contiguous()))

    # error feedback over several rounds
    err = torch.zeros(EF_N)
    xs, ys, errs = [], [], []
    for r in range(EF_ROUNDS):
        x = _input(rank, "ef", (EF_N,), torch.float32, r)
        y = x.clone()
        quantized_all_reduce(y, "avg", fmt="fp4_e3m0", block_size=128, error_feedback=err, min_numel=0)
        xs.append(_np(x)), ys.append(_np(y)), errs.append(_np(err))
    out["ef"] = (xs, ys, errs)

    # byte counting and the full-precision fallback below the threshold
    stats = CommStats()
    z = torch.randn(5000)
    quantized_all_reduce(z, fmt="fp4_e3m0", min_numel=0, stats=stats)
    small = _input(rank, "small", (100,), torch.float32)
    s = small.clone()
    quantized_all_reduce(s, "avg", stats=stats)  # 100 < DEFAULT_MIN_NUMEL
    f = _input(rank, "fmt_none", (3000,), torch.float32)
    fy = f.clone()
    quantized_all_reduce(fy, "sum", fmt=None, stats=stats)
    out["stats"] = stats.as_dict()
    out["small"] = (_np(small), _np(s))
    out["fmt_none"] = (_np(f), _np(fy))

    # NaN on one rank: every rank raises, the tensor is left unchanged
    bad = _input(rank, "nan", (4096,), torch.float32)
    if rank == world - 1:
        bad[1000] = float("nan")
    before = bad.clone()
    try:
        quantized_all_reduce(bad, min_numel=0)
        out["nan_raise"] = None
    except ValueError as e:
        out["nan_raise"] = (str(e), bool(torch.equal(before.nan_to_num(7.0), bad.nan_to_num(7.0))))
    quantized_all_reduce(bad, min_numel=0, block_size=128, nan_policy="propagate")
    out["nan_propagate"] = _np(bad)

    # stochastic rounding: still bit-identical across ranks
    st = torch.randn(777, generator=torch.Generator().manual_seed(rank))
    quantized_all_reduce(st, fmt="int4", min_numel=0, stochastic=True, seed=123)
    out["stochastic"] = _np(st)

    # async: rank 0 starts first while the others are still sleeping
    a = _input(rank, "async", (4097,), torch.float32)
    ay = a.clone()
    if rank != 0:
        time.sleep(1.0)
    work = quantized_all_reduce(ay, "avg", fmt="fp4_e3m0", min_numel=0, async_op=True)
    early = work.is_completed()
    # a later synchronous call on the same group runs after the pending async one
    b = _input(rank, "after_async", (1500,), torch.float32)
    by = b.clone()
    quantized_all_reduce(by, "sum", fmt="int8", min_numel=0)
    work.wait()
    out["async"] = (_np(a), _np(ay), early, work.is_completed(), _np(b), _np(by))
    dist.barrier()
    return out


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def results(request):
    return request.param, spawn(_worker, request.param, backend="gloo")


def _same_on_all_ranks(arrays):
    return all(np.array_equal(arrays[0], a, equal_nan=True) and arrays[0].tobytes() == a.tobytes() for a in arrays)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_reference_and_bit_identical(results, case):
    world, res = results
    name, shape, dtype, fmt, bs, op = case
    xs = [torch.from_numpy(r[name][0]).to(dtype) for r in res]
    expected, _ = ref.quantized_all_reduce(xs, op, fmt, bs)
    outs = [r[name][1] for r in res]
    assert _same_on_all_ranks(outs)
    got = torch.from_numpy(outs[0]).to(dtype)
    assert got.shape == expected.shape
    assert torch.equal(got, expected)
    # and close to the exact reduction (within the format's error)
    exact = sum(x.float() for x in xs) / (world if op == "avg" else 1)
    assert (got.float() - exact).abs().max() < 0.6 * exact.abs().max() + 1e-3


def test_error_feedback_rounds(results):
    world, res = results
    errors = [torch.zeros(EF_N) for _ in range(world)]
    for r in range(EF_ROUNDS):
        xs = [torch.from_numpy(w["ef"][0][r]) for w in res]
        expected, errors = ref.quantized_all_reduce(xs, "avg", "fp4_e3m0", 128, errors=errors)
        assert _same_on_all_ranks([w["ef"][1][r] for w in res])
        assert torch.equal(torch.from_numpy(res[0]["ef"][1][r]), expected)
        for rank in range(world):
            assert torch.equal(torch.from_numpy(res[rank]["ef"][2][r]), errors[rank])
    assert any(e.abs().sum() > 0 for e in errors)


def test_bytes_and_full_precision_fallback(results):
    world, res = results
    st = res[0]["stats"]
    _, code_bytes, nscales = chunk_layout(5000, world, "fp4_e3m0", 128)
    quantized = 2 * (world - 1) * (code_bytes + 4 * nscales)
    fp = ring_all_reduce_bytes(100 * 4, world) + ring_all_reduce_bytes(3000 * 4, world)
    assert st["bytes_sent"] == quantized + fp
    assert st["quantized_calls"] == 1 and st["full_precision_calls"] == 2
    assert quantized < ring_all_reduce_bytes(5000 * 4, world) / 6  # ~7.5x fewer for FP4
    small = [torch.from_numpy(r["small"][0]) for r in res]
    torch.testing.assert_close(torch.from_numpy(res[0]["small"][1]), sum(small) / world)
    full = [torch.from_numpy(r["fmt_none"][0]) for r in res]
    torch.testing.assert_close(torch.from_numpy(res[1]["fmt_none"][1]), sum(full))
    assert _same_on_all_ranks([r["small"][1] for r in res])


def test_non_finite_input_raises_on_every_rank(results):
    world, res = results
    for r in res:
        assert r["nan_raise"] is not None, "NaN on one rank must raise on every rank"
        msg, unchanged = r["nan_raise"]
        assert "NaN" in msg and unchanged
        prop = r["nan_propagate"]
        assert np.isnan(prop[896:1024]).all() and not np.isnan(prop[:896]).any()
        assert np.isfinite(prop[1024:]).all()
    assert _same_on_all_ranks([r["nan_propagate"] for r in res])


def test_stochastic_bit_identical(results):
    _, res = results
    assert _same_on_all_ranks([r["stochastic"] for r in res])


def test_async_returns_before_completion(results):
    world, res = results
    assert res[0]["async"][2] is False  # returned while the other ranks had not joined yet
    for r in res:
        assert r["async"][3] is True
    xs = [torch.from_numpy(r["async"][0]) for r in res]
    expected, _ = ref.quantized_all_reduce(xs, "avg", "fp4_e3m0", 128)
    assert torch.equal(torch.from_numpy(res[0]["async"][1]), expected)
    bs = [torch.from_numpy(r["async"][4]) for r in res]
    expected_b, _ = ref.quantized_all_reduce(bs, "sum", "int8", 128)
    for r in res:
        assert torch.equal(torch.from_numpy(r["async"][5]), expected_b)


# --- argument checks (no process group needed: they fail before any collective) -----------

@pytest.mark.parametrize("kwargs, exc, word", [
    (dict(tensor=torch.arange(10)), TypeError, "tensor"),
    (dict(tensor=[1.0, 2.0]), TypeError, "tensor"),
    (dict(tensor=torch.empty(0)), ValueError, "empty"),
    (dict(op="max"), ValueError, "op"),
    (dict(fmt="fp5"), ValueError, "fmt"),
    (dict(block_size=24), ValueError, "block_size"),
    (dict(block_size=8), ValueError, "block_size"),
    (dict(error_feedback=torch.zeros(10, dtype=torch.float64)), TypeError, "error_feedback"),
    (dict(error_feedback=torch.zeros(11)), ValueError, "error_feedback"),
    (dict(min_numel=-1), ValueError, "min_numel"),
    (dict(nan_policy="ignore"), ValueError, "nan_policy"),
])
def test_bad_arguments(kwargs, exc, word):
    kwargs = {"tensor": torch.zeros(10), **kwargs}
    with pytest.raises(exc, match=word):
        quantized_all_reduce(**kwargs)


def test_needs_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="process group"):
        quantized_all_reduce(torch.zeros(10))


# --- CUDA + NCCL (GPU machine only) -------------------------------------------------------------

def _cuda_worker(rank, world):
    g = torch.Generator(device="cuda").manual_seed(rank)
    x = torch.randn(5000, device="cuda", generator=g)
    y = x.clone()
    quantized_all_reduce(y, "avg", min_numel=0)
    z = x.clone()
    work = quantized_all_reduce(z, "avg", min_numel=0, async_op=True)
    work.wait()
    return x.cpu().numpy(), y.cpu().numpy(), z.cpu().numpy()


@pytest.mark.gpu
def test_nccl_cuda_matches_reference():
    world = max(1, min(2, torch.cuda.device_count()))
    res = spawn(_cuda_worker, world, backend="nccl")
    xs = [torch.from_numpy(r[0]) for r in res]
    expected, _ = ref.quantized_all_reduce(xs, "avg", "fp4_e3m0", 128)
    for r in res:
        assert torch.equal(torch.from_numpy(r[1]), expected)
        assert torch.equal(torch.from_numpy(r[2]), expected)
